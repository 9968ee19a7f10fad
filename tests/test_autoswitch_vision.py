"""Auto-Switch on image models and plain modules: features from block lists, a named module or a callable; image
query sets in every supported form; per-sample execution of mixed image batches; bundles; bad input.

Synthetic image tasks are separable by construction: task t's images are noise around the brightness ``2 (t - 1)``.
Each task's switch is built with ``from_finetuned`` from a distinct noisy copy of the base model.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from tiny_models import finetune_copy, tiny_bert
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from switch_adapter import AutoSwitchConfig, AutoSwitchModel, TSwitchConfig, from_finetuned
from switch_adapter.autoswitch import FeatureMismatchError, InputMismatchError

TASKS = ("alpha", "beta", "gamma")
ATOL = 1e-5
SIZE = 16


class ConvNet(nn.Module):
    """A tiny plain conv net: three conv blocks (optionally with BatchNorm), mean pooling, a linear head."""

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, padding=1)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            return nn.Sequential(*layers, nn.ReLU())

        self.blocks = nn.Sequential(block(3, 8), block(8, 8), block(8, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def conv_net_bn() -> nn.Module:
    torch.manual_seed(0)
    model = ConvNet(batch_norm=True)
    with torch.no_grad():  # running statistics away from (0, 1), so that carrying them matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=SIZE, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return ViTForImageClassification(config).eval()


def tiny_convnext() -> nn.Module:
    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, image_size=SIZE)
    return ConvNextForImageClassification(config).eval()


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config).eval()


MODELS = {"conv": conv_net, "conv_bn": conv_net_bn, "vit": tiny_vit, "convnext": tiny_convnext, "resnet": tiny_resnet}


def images(task: int, count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * task + seed)
    return torch.randn(count, 3, SIZE, SIZE, generator=generator) * 0.5 + 2.0 * (task - 1)


def query_sets(count: int = 12) -> dict[str, torch.Tensor]:
    return {name: images(t, count) for t, name in enumerate(TASKS)}


def mixed_images(seed: int = 7) -> torch.Tensor:
    """Two images per task, interleaved."""
    return torch.cat([images(t, 1, seed=seed + i) for i in range(2) for t in range(len(TASKS))])


def save_switches(make, folder) -> dict[str, str]:
    paths = {}
    for t, name in enumerate(TASKS):
        base = make()
        model = from_finetuned(base, finetune_copy(base, seed=t + 1, noise=0.05), TSwitchConfig(density=0.3),
                               progress=False)  # fmt: skip
        model.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


@pytest.fixture(scope="module")
def switches(tmp_path_factory):
    cache: dict[str, dict[str, str]] = {}

    def get(kind: str) -> dict[str, str]:
        if kind not in cache:
            cache[kind] = save_switches(MODELS[kind], tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def make_router(kind: str, paths: dict[str, str], queries=None, **config) -> AutoSwitchModel:
    config.setdefault("metric", "euclidean")
    return AutoSwitchModel.from_pretrained(
        MODELS[kind](), adapters=paths, query_sets=queries if queries is not None else query_sets(),
        config=AutoSwitchConfig(**config), progress=False,
    )  # fmt: skip


def logits_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


# -- feature sources -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "source", "module", "input_kind"),
    [
        ("conv", "blocks", "blocks", "tensor"),
        ("vit", "hidden_states", None, "pixel_values"),
        ("convnext", "hidden_states", None, "pixel_values"),  # its config counts the stages as layers
        ("resnet", "blocks", "resnet.encoder.stages", "pixel_values"),
    ],
)
def test_feature_source_and_auto_layer_for_any_model(switches, kind, source, module, input_kind):
    router = make_router(kind, switches(kind))
    spec = router.feature_spec
    assert (spec.source, spec.module, spec.input_kind) == (source, module, input_kind)
    assert spec.input_shape == (3, SIZE, SIZE)
    choice = router.feature_choice
    assert choice is not None and set(choice.scores["euclidean"]) == set(range(1, spec.num_layers + 1))
    assert spec.layer == choice.layer and spec.hidden_size == router.query_features["alpha"].features.shape[1]
    assert router.route(mixed_images()).top_task == list(TASKS) * 2


def test_block_features_equal_the_hidden_states_of_convnext(switches):
    """For ConvNeXt the block list's outputs are exactly its output_hidden_states."""
    router = make_router("convnext", switches("convnext"), feature_layer=2)
    x = mixed_images()
    with torch.no_grad():
        hidden = tiny_convnext()(pixel_values=x, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(router.features(pixel_values=x), hidden.mean((2, 3)))


def test_feature_module_is_hooked_and_the_pass_stops_there(switches):
    router = make_router("conv", switches("conv"), feature_module="blocks.1")
    x = mixed_images()
    calls = []
    handle = router.inner.blocks[2].register_forward_hook(lambda *args: calls.append(1))
    try:
        features = router.features(x)
    finally:
        handle.remove()
    assert calls == []  # stopped after blocks.1
    base = conv_net()
    with torch.no_grad():
        expected = base.blocks[1](base.blocks[0](x)).mean((2, 3))
    torch.testing.assert_close(features, expected)
    assert router.feature_spec.source == "module" and router.feature_choice is None


def test_feature_fn_routes_and_the_bundle_asks_for_it_again(switches, tmp_path):
    def colour_means(model, batch):
        return batch.mean((2, 3))  # [B, 3]: a user's own feature

    router = AutoSwitchModel.from_pretrained(
        conv_net(), adapters=switches("conv"), query_sets=query_sets(), feature_fn=colour_means, progress=False
    )
    x = mixed_images()
    torch.testing.assert_close(router.features(x), x.mean((2, 3)))
    assert router.route(x).top_task == list(TASKS) * 2
    router.save_pretrained(tmp_path / "bundle")
    with pytest.raises(ValueError, match="feature_fn"):
        AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=conv_net())
    loaded = AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=conv_net(), feature_fn=colour_means)
    torch.testing.assert_close(logits_of(loaded(x)), logits_of(router(x)))


# -- per-sample execution ------------------------------------------------------------------------------------


def _switched(kind: str, paths: dict[str, str]) -> dict[str, nn.Module]:
    """Each switch active on its own copy of the base model (plain PEFT, no router code)."""
    return {name: PeftModel.from_pretrained(MODELS[kind](), path).eval() for name, path in paths.items()}


@pytest.mark.parametrize(
    ("kind", "execution"),
    [("conv", "delta"), ("conv_bn", "compose"), ("conv_bn", "delta"), ("vit", "auto"), ("vit", "delta"),
     ("convnext", "auto"), ("resnet", "auto")],
)  # fmt: skip
def test_mixed_image_batch_equals_each_image_run_alone_with_its_switch(switches, kind, execution):
    paths = switches(kind)
    router = make_router(kind, paths, execution=execution)
    x = mixed_images()
    outputs, routing = router(x, return_routing=True)
    assert len(routing.groups()) == len(TASKS)
    merged = _switched(kind, paths)
    key = {"tensor": None}.get(router.feature_spec.input_kind, "pixel_values")
    for i in range(x.shape[0]):
        reference = merged[routing.top_task[i]]
        with torch.no_grad():
            expected = reference(x[i : i + 1]) if key is None else reference(pixel_values=x[i : i + 1])
        torch.testing.assert_close(logits_of(outputs)[i : i + 1], logits_of(expected), rtol=ATOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["conv_bn"])
def test_soft_compositions_of_a_mixed_batch_equal_each_image_alone(switches, kind):
    """Soft weights (several tasks per image): the batch equals each image run alone with its composition."""
    router = make_router(kind, switches(kind), mode="soft", k=20, execution="delta")
    x = torch.cat([mixed_images(), 0.5 * (images(0, 2, seed=3) + images(1, 2, seed=4))])
    outputs, routing = router(x, return_routing=True)
    assert any(len(routing.composition(i)) > 1 for i in range(len(routing)))
    for i in range(x.shape[0]):
        alone = router(x[i : i + 1], routing=routing.select([i]))
        torch.testing.assert_close(logits_of(outputs)[i : i + 1], logits_of(alone), rtol=ATOL, atol=ATOL)


def test_pixel_values_keyword_positional_and_single_image_agree(switches):
    router = make_router("vit", switches("vit"))
    x = mixed_images()
    by_keyword = router(pixel_values=x).logits
    torch.testing.assert_close(router(x).logits, by_keyword)
    torch.testing.assert_close(router(list(x)).logits, by_keyword)
    torch.testing.assert_close(router(x[2]).logits, by_keyword[2:3])
    assert router.route({"pixel_values": x}).top_task == list(TASKS) * 2


# -- query sets ------------------------------------------------------------------------------------------------


def test_every_query_set_form_gives_the_same_features(switches):
    pil = pytest.importorskip("PIL.Image")
    datasets = pytest.importorskip("datasets")
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": SIZE, "width": SIZE}, do_normalize=False, do_rescale=True)
    reference = make_router("conv", switches("conv"), feature_layer=2)
    tensors = query_sets()
    expected = reference.query_features

    loader = torch.utils.data.DataLoader
    labelled = torch.utils.data.TensorDataset
    forms = {
        "list": {name: list(x) for name, x in tensors.items()},
        "dict": {name: {"inputs": x} for name, x in tensors.items()},
        "loader": {name: loader(x, batch_size=5) for name, x in tensors.items()},
        "pairs": {name: loader(labelled(x, torch.zeros(len(x))), batch_size=5) for name, x in tensors.items()},
        "dicts": {name: loader([{"image": row} for row in x], batch_size=5) for name, x in tensors.items()},
    }
    for form, queries in forms.items():
        router = make_router("conv", switches("conv"), queries, feature_layer=2)
        for name in TASKS:
            torch.testing.assert_close(router.query_features[name].features, expected[name].features, msg=form)

    # A Dataset of PIL images with an image processor: the same features as the processed tensors.
    generator = torch.Generator().manual_seed(0)
    pictures = {
        name: [pil.fromarray((torch.rand(SIZE, SIZE, 3, generator=generator) * (60 + 60 * t)).byte().numpy())
               for _ in range(6)]
        for t, name in enumerate(TASKS)
    }  # fmt: skip
    dataset_queries = {name: datasets.Dataset.from_dict({"image": imgs}) for name, imgs in pictures.items()}
    router = AutoSwitchModel.from_pretrained(
        tiny_vit(), adapters=switches("vit"), query_sets=dataset_queries, image_processor=processor,
        config=AutoSwitchConfig(metric="euclidean", feature_layer=1), progress=False,
    )  # fmt: skip
    for name, imgs in pictures.items():
        processed = processor(imgs, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(
            router.query_features[name].features.float(), router.features(processed).half().float(), atol=1e-3,
            rtol=1e-3,
        )  # fmt: skip
    assert router.route(pictures["beta"][:2]).top_task == ["beta", "beta"]  # PIL inputs through the processor


# -- bundles ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vit"])
def test_image_router_bundle_round_trip(switches, tmp_path, kind):
    router = make_router(kind, switches(kind), metric="auto")
    router.save_pretrained(tmp_path / "bundle")
    description = json.loads((tmp_path / "bundle" / "autoswitch_config.json").read_text())
    assert description["format_version"] == 3
    assert description["features"]["input_kind"] == router.feature_spec.input_kind
    loaded = AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=MODELS[kind]())
    assert loaded.feature_spec == router.feature_spec
    x = mixed_images()
    torch.testing.assert_close(logits_of(loaded(x)), logits_of(router(x)))


def test_add_task_to_an_image_router_checks_the_image_shape(switches):
    paths = switches("conv")
    router = make_router("conv", {name: paths[name] for name in TASKS[:2]}, {n: query_sets()[n] for n in TASKS[:2]})
    with pytest.raises(InputMismatchError, match="query examples had"):
        router.add_task("gamma", paths["gamma"], torch.randn(6, 3, 8, 8))
    assert router.tasks == list(TASKS[:2])
    router.add_task("gamma", paths["gamma"], images(2, 12))
    assert router.route(mixed_images()).top_task == list(TASKS) * 2


def test_feature_module_bundle_round_trip(switches, tmp_path):
    router = make_router("conv", switches("conv"), feature_module="blocks.0")
    router.save_pretrained(tmp_path / "bundle")
    loaded = AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=conv_net())
    assert loaded.config.feature_module == "blocks.0" and loaded.feature_spec == router.feature_spec
    with pytest.raises(FeatureMismatchError, match="source"):
        AutoSwitchModel.from_pretrained(
            tmp_path / "bundle", base_model=conv_net(), config=AutoSwitchConfig(metric="euclidean")
        )


def test_text_bundles_keep_the_old_format(tmp_path):
    from test_autoswitch import _save_switches
    from test_autoswitch import query_sets as text_query_sets

    paths = _save_switches(tiny_bert, tmp_path / "switches")
    router = AutoSwitchModel.from_pretrained(
        tiny_bert(), adapters=paths, query_sets=text_query_sets(), config=AutoSwitchConfig(metric="euclidean"),
        progress=False,
    )  # fmt: skip
    router.save_pretrained(tmp_path / "bundle")
    description = json.loads((tmp_path / "bundle" / "autoswitch_config.json").read_text())
    assert description["format_version"] == 1
    assert "feature_module" not in description["config"] and "image_column" not in description["config"]


# -- bad input -------------------------------------------------------------------------------------------------


def _untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not any("tswitch" in name for name, _ in model.named_modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


class TwoLayers(nn.Module):
    """A plain MLP with no block list: Auto-Switch cannot guess where its features are."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    return TwoLayers().eval()


def test_a_model_without_blocks_gets_both_ways_named(tmp_path):
    base = two_layers()
    from_finetuned(base, finetune_copy(base), TSwitchConfig(density=0.5), progress=False).save_pretrained(
        tmp_path / "a"
    )
    adapters, queries = {"a": str(tmp_path / "a")}, {"a": torch.randn(4, 6)}
    fresh = two_layers()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(TypeError, match="feature_module=.*feature_fn="):
        AutoSwitchModel.from_pretrained(fresh, adapters=adapters, query_sets=queries, progress=False)
    _untouched(fresh, before)
    by_module = AutoSwitchModel.from_pretrained(  # the two fixes the message names
        two_layers(), adapters=adapters, query_sets=queries, config=AutoSwitchConfig(feature_module="fc1"),
        progress=False,
    )  # fmt: skip
    assert by_module.route(torch.randn(2, 6)).top_task == ["a", "a"] and by_module.feature_spec.hidden_size == 12
    by_fn = AutoSwitchModel.from_pretrained(
        fresh, adapters=adapters, query_sets=queries, feature_fn=lambda model, x: model(x), progress=False
    )
    assert by_fn.route(torch.randn(2, 6)).top_task == ["a", "a"] and by_fn.feature_spec.hidden_size == 6


def test_unknown_feature_module_is_refused(switches):
    base = conv_net()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="no such submodule.*'blocks'"):
        AutoSwitchModel.from_pretrained(
            base, adapters=switches("conv"), query_sets=query_sets(),
            config=AutoSwitchConfig(feature_module="blocks.9"), progress=False,
        )  # fmt: skip
    _untouched(base, before)


@pytest.mark.parametrize(
    ("queries", "match"),
    [
        ({name: ["a text", "another"] for name in TASKS}, "holds text"),
        ({name: torch.randn(4, 1, SIZE, SIZE) for name in TASKS}, "1 channels"),
    ],
)
def test_query_sets_of_the_wrong_modality_or_channels_are_refused(switches, queries, match):
    base = tiny_vit()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(InputMismatchError, match=match):
        AutoSwitchModel.from_pretrained(base, adapters=switches("vit"), query_sets=queries, progress=False)
    _untouched(base, before)


def test_images_for_a_text_model_are_refused(tmp_path):
    from test_autoswitch import _save_switches

    paths = _save_switches(tiny_bert, tmp_path / "switches")
    base = tiny_bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(InputMismatchError, match="takes text"):
        AutoSwitchModel.from_pretrained(
            base, adapters=paths, query_sets={name: images(0, 4) for name in TASKS}, progress=False
        )
    _untouched(base, before)


def test_inputs_of_the_wrong_shape_channels_or_modality_are_refused(switches):
    router = make_router("conv", switches("conv"))
    with pytest.raises(InputMismatchError, match="2 channels"):
        router(torch.randn(2, 2, SIZE, SIZE))
    with pytest.raises(InputMismatchError, match=r"query examples had \[3, 16, 16\]"):
        router(torch.randn(2, 3, 8, 8))
    vit_router = make_router("vit", switches("vit"))
    with pytest.raises(InputMismatchError, match="Text was given"):
        vit_router(["a text"])
    with pytest.raises(InputMismatchError, match="takes images.*token ids"):
        vit_router(input_ids=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(InputMismatchError, match="not token_type_ids"):
        vit_router.route(pixel_values=mixed_images(), token_type_ids=torch.ones(6, 4, dtype=torch.long))
    with pytest.raises(InputMismatchError, match="floating point"):
        vit_router(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(InputMismatchError, match="images must be"):
        vit_router(torch.randn(3, SIZE))
    with pytest.raises(TypeError, match="generate needs"):
        vit_router.generate(mixed_images())
