"""Plain ``torch.nn.Module`` models (not transformers models) in the converter, inspect, materialize, the LoRA export,
the model card and the CLI: in memory, or safetensors state dicts with a model factory."""

from __future__ import annotations

import copy
import json
import logging
import os
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from switch_adapter import (
    TSwitchConfig,
    convert_finetuned,
    convert_lora,
    from_finetuned,
    inspect_adapter,
    materialize,
    to_lora,
)
from switch_adapter.cli import main
from switch_adapter.tswitch.model_card import write_model_card

FACTORY = "test_plain_modules:tiny_net"


class TinyNet(nn.Module):
    """Two convolutions, a hidden linear layer and an output head named ``fc`` (no transformers config)."""

    def __init__(self, classes: int = 4, batch_norm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(16, 16)
        self.fc = nn.Linear(16, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv2(torch.relu(self.norm(self.conv1(images)))))
        return self.fc(torch.relu(self.proj(self.pool(hidden).flatten(1))))


def tiny_net() -> TinyNet:
    return TinyNet()


def tiny_bn_net() -> TinyNet:
    return TinyNet(batch_norm=True)


def _finetune(base: nn.Module, seed: int = 1) -> nn.Module:
    """A copy of ``base`` with every parameter moved (and BatchNorm statistics updated by a forward in train mode)."""
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
        tuned.train()
        tuned(torch.randn(6, 3, 8, 8, generator=generator))
    return tuned.eval()


def _images() -> torch.Tensor:
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def _files_equal(folder_a, folder_b) -> None:
    a = load_file(os.path.join(folder_a, "adapter_model.safetensors"))
    b = load_file(os.path.join(folder_b, "adapter_model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    config_a = json.loads(open(os.path.join(folder_a, "adapter_config.json")).read())
    config_b = json.loads(open(os.path.join(folder_b, "adapter_config.json")).read())
    config_a.pop("base_model_name_or_path"), config_b.pop("base_model_name_or_path")
    assert config_a == config_b


def _reference(base: nn.Module, tuned: nn.Module, folder, config: TSwitchConfig | None = None):
    model = from_finetuned(copy.deepcopy(base), tuned, config or TSwitchConfig(density=0.3), progress=False)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny plain net and a fine-tune, in memory and saved as safetensors (one file each, and the fine-tune also as
    two shards with an index)."""
    root = tmp_path_factory.mktemp("plain")
    torch.manual_seed(0)
    base = tiny_net().eval()
    tuned = _finetune(base)
    save_model(base, str(root / "base.safetensors"))
    save_model(tuned, str(root / "tuned.safetensors"))
    state = tuned.state_dict()
    shards = root / "tuned-sharded"
    shards.mkdir()
    names = sorted(state)
    weight_map = {}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file_name = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({name: state[name].contiguous() for name in part}, str(shards / file_name))
        weight_map.update(dict.fromkeys(part, file_name))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _reference(base, tuned, root / "reference")
    return root, base, tuned


# -- convert_finetuned ---------------------------------------------------------------------------------------------


def test_in_memory_plain_modules_equal_from_finetuned_and_keep_the_head(pair, tmp_path, caplog):
    root, base, tuned = pair
    with caplog.at_level(logging.INFO, logger="switch_adapter"):
        summary = convert_finetuned(base, tuned, tmp_path / "out", TSwitchConfig(density=0.3), progress=False)
    _files_equal(tmp_path / "out", root / "reference")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["fc"] and "fc" not in saved["unit_layout"]  # the head: full precision
    assert set(saved["unit_layout"]) == {"conv1", "conv2", "proj"}
    assert saved["auto_mapping"] == {"base_model_class": "TinyNet", "parent_library": "test_plain_modules"}
    assert summary.heads == ["fc"] and summary.head_bytes == (4 * 16 + 4) * 4 and not summary.skipped
    assert any("Treating fc as output head" in record.getMessage() for record in caplog.records)
    assert not hasattr(base, "peft_config") and all(p.device.type == "cpu" for p in base.parameters())

    fresh = TinyNet().eval()  # a fresh base with the base weights, the adapter loaded with plain peft
    load_model(fresh, str(root / "base.safetensors"))
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "out")
        expected = from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(density=0.3), progress=False)
        torch.testing.assert_close(loaded(_images()), expected(_images()), rtol=0, atol=0)
        assert torch.equal(loaded.base_model.model.fc.modules_to_save["default"].weight, tuned.fc.weight)


@pytest.mark.parametrize("factory", [TinyNet, tiny_net, FACTORY], ids=["class", "function", "import-path"])
def test_safetensors_files_with_a_factory_equal_from_finetuned(pair, tmp_path, factory):
    root, _, _ = pair
    convert_finetuned(
        root / "base.safetensors", root / "tuned.safetensors", tmp_path / "out", progress=False, model_factory=factory
    )
    _files_equal(tmp_path / "out", root / "reference")


def test_sharded_checkpoint_folder_and_mixed_sources(pair, tmp_path):
    root, base, _ = pair
    convert_finetuned(root / "base.safetensors", root / "tuned-sharded", tmp_path / "a", model_factory=tiny_net)
    _files_equal(tmp_path / "a", root / "reference")
    # a loaded base gives the architecture: no factory needed for the fine-tune's file
    convert_finetuned(base, root / "tuned-sharded" / "model.safetensors.index.json", tmp_path / "b", progress=False)
    _files_equal(tmp_path / "b", root / "reference")


def test_batch_norm_statistics_equal_from_finetuned(tmp_path):
    torch.manual_seed(0)
    base = tiny_bn_net().eval()
    tuned = _finetune(base)
    assert not torch.equal(base.norm.running_mean, tuned.norm.running_mean)
    _reference(base, tuned, tmp_path / "reference")
    save_model(base, str(tmp_path / "base.safetensors"))
    save_model(tuned, str(tmp_path / "tuned.safetensors"))
    summary = convert_finetuned(
        tmp_path / "base.safetensors",
        tmp_path / "tuned.safetensors",
        tmp_path / "out",
        model_factory=tiny_bn_net,
        progress=False,
    )
    _files_equal(tmp_path / "out", tmp_path / "reference")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["norm_statistics"] == {"norm": {"running_mean": [8], "running_var": [8]}}
    assert saved["format_version"] == 4 and summary.statistics == ["norm"]
    assert not any("num_batches_tracked" in item.name for item in summary.skipped)
    stored = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert torch.equal(stored["base_model.model.norm.tswitch_stat_running_var"], tuned.norm.running_var)


def test_head_with_other_labels_and_explicit_modules_to_save(pair, tmp_path):
    root, base, _ = pair
    tuned = TinyNet(classes=6).eval()
    tuned.load_state_dict({k: v for k, v in _finetune(base).state_dict().items() if not k.startswith("fc.")}, False)
    summary = convert_finetuned(base, tuned, tmp_path / "resized", progress=False)
    saved = json.loads((tmp_path / "resized" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["fc"]
    assert saved["modules_to_save_shapes"] == {"fc": {"weight": [6, 16], "bias": [6]}}
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "resized")
        torch.testing.assert_close(loaded(_images()).shape, torch.Size([3, 6]))
    assert summary.heads == ["fc"]

    # explicit modules_to_save: the caller's choice stands, the changed head is dropped and reported
    summary = convert_finetuned(
        base, _finetune(base), tmp_path / "explicit", TSwitchConfig(modules_to_save=["proj"]), progress=False
    )
    saved = json.loads((tmp_path / "explicit" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["proj"] and "fc" not in saved["unit_layout"]
    assert {item.name for item in summary.skipped} == {"fc.weight", "fc.bias"}


def test_explicitly_targeted_head_is_switched_with_a_warning(pair, tmp_path, caplog):
    root, base, tuned = pair
    config = TSwitchConfig(target_modules=["conv1", "fc"], density=0.3)
    with caplog.at_level(logging.WARNING, logger="switch_adapter"):
        convert_finetuned(base, tuned, tmp_path / "out", config, progress=False)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(saved["unit_layout"]) == {"conv1", "fc"} and saved["modules_to_save"] is None
    assert any("looks like the model's output head" in record.getMessage() for record in caplog.records)
    _reference(base, tuned, tmp_path / "reference", TSwitchConfig(target_modules=["conv1", "fc"], density=0.3))
    _files_equal(tmp_path / "out", tmp_path / "reference")


def test_lora_of_a_plain_module(pair, tmp_path):
    root, base, _ = pair
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["conv1", "proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
        expected = {n: lora.base_model.model.get_submodule(n).get_delta_weight("default") for n in ("conv1", "proj")}
    lora.save_pretrained(tmp_path / "lora")
    config = TSwitchConfig(density=1.0, scale_granularity="row")
    convert_lora(base, tmp_path / "lora", tmp_path / "in-memory", config, progress=False)
    convert_lora(
        root / "base.safetensors",
        tmp_path / "lora",
        tmp_path / "factory",
        config,
        model_factory=FACTORY,
        progress=False,
    )
    _files_equal(tmp_path / "in-memory", tmp_path / "factory")
    saved = json.loads((tmp_path / "factory" / "adapter_config.json").read_text())
    assert set(saved["unit_layout"]) == {"conv1", "proj"} and saved["auto_mapping"]["base_model_class"] == "TinyNet"
    with torch.no_grad():
        switched = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "factory").merge_and_unload()
        for name, delta in expected.items():  # density 1 keeps every entry: signs times a per-row scale
            got = switched.get_submodule(name).weight - base.get_submodule(name).weight
            assert torch.equal(torch.sign(got), torch.sign(delta))


# -- bad input -------------------------------------------------------------------------------------------------------


def _nothing_written(tmp_path) -> None:
    assert not (tmp_path / "out").exists()
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


def test_bad_plain_inputs_write_nothing(pair, tmp_path):
    root, base, tuned = pair
    files = (root / "base.safetensors", root / "tuned.safetensors")
    with pytest.raises(ValueError, match="pass model_factory="):
        convert_finetuned(*files, tmp_path / "out", progress=False)
    with pytest.raises(TypeError, match="returned a dict, not a torch.nn.Module"):
        convert_finetuned(*files, tmp_path / "out", model_factory=lambda: {}, progress=False)
    with pytest.raises(ImportError, match="no attribute 'missing'"):
        convert_finetuned(*files, tmp_path / "out", model_factory="test_plain_modules:missing", progress=False)
    with pytest.raises(ValueError, match="not an import path"):
        convert_finetuned(*files, tmp_path / "out", model_factory="test_plain_modules.tiny_net", progress=False)
    with pytest.raises(ValueError, match=r"missing from the checkpoint \(5\): norm.bias, norm.num_batches_tracked"):
        convert_finetuned(*files, tmp_path / "out", model_factory=tiny_bn_net, progress=False)

    class Renamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = TinyNet()

    expected = r"The loaded fine-tuned Renamed does not fit TinyNet:\n  not in the model \(8\): body\.conv1\.bias, "
    with pytest.raises(ValueError, match=expected):
        convert_finetuned(base, Renamed(), tmp_path / "out", progress=False)
    (tmp_path / "weights.pt").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        convert_finetuned(tmp_path / "weights.pt", tuned, tmp_path / "out", model_factory=tiny_net, progress=False)
    _nothing_written(tmp_path)


# -- inspect, materialize, LoRA export, model card -------------------------------------------------------------------


def test_inspect_names_the_plain_base_class(pair):
    root, _, _ = pair
    report = inspect_adapter(root / "reference")
    assert report.base_class == "test_plain_modules:TinyNet" and not report.damaged
    assert "a torch.nn.Module: test_plain_modules:TinyNet" in report.to_table()
    assert report.to_dict()["base_class"] == "test_plain_modules:TinyNet"
    assert [t.name for t in report.full_precision] == ["fc.bias", "fc.weight"]


def test_materialize_a_plain_module(pair, tmp_path):
    root, base, _ = pair
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(base), root / "reference").merge_and_unload()(_images())
    materialize(base, root / "reference", tmp_path / "merged", progress=False)
    from_files = materialize(
        root / "base.safetensors", root / "reference", tmp_path / "merged2", model_factory=FACTORY, progress=False
    )
    for folder in (tmp_path / "merged", from_files):
        assert sorted(os.listdir(folder)) == ["README.md", "model.safetensors", "model_class.json"]
        note = json.loads(open(os.path.join(folder, "model_class.json")).read())
        assert note["model_class"] == "test_plain_modules:TinyNet"
        model = TinyNet().eval()
        load_model(model, os.path.join(folder, "model.safetensors"))
        with torch.no_grad():
            torch.testing.assert_close(model(_images()), expected, rtol=1e-6, atol=1e-6)
    assert note["factory"] == FACTORY
    assert "from test_plain_modules import TinyNet" in open(os.path.join(from_files, "README.md")).read()
    assert all(p.device.type == "cpu" for p in base.parameters()) and not hasattr(base, "peft_config")
    with pytest.raises(ValueError, match="pass model_factory="):
        materialize(root / "base.safetensors", root / "reference", tmp_path / "merged3", progress=False)
    assert not (tmp_path / "merged3").exists()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.norm = nn.BatchNorm2d(16)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(hidden)))


class TwoNorms(nn.Module):
    """BatchNorms named ``norm`` and ``block.norm`` of other sizes (as EfficientNet's ``_bn0`` and
    ``_blocks.1._bn0``): loading must match module names exactly, not by suffix."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.block = Block()
        self.fc = nn.Linear(16, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.block(torch.relu(self.norm(self.conv(images))))
        return self.fc(hidden.mean(dim=(2, 3)))


def test_batch_norm_statistics_in_materialize_and_lora_export(tmp_path):
    torch.manual_seed(0)
    base = TwoNorms().eval()
    tuned = _finetune(base)
    convert_finetuned(base, tuned, tmp_path / "switch", TSwitchConfig(density=0.5), progress=False)
    saved = json.loads((tmp_path / "switch" / "adapter_config.json").read_text())
    assert set(saved["norm_statistics"]) == {"norm", "block.norm"}
    with torch.no_grad():
        switched = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "switch").eval()
        expected = switched(_images())
        materialize(base, tmp_path / "switch", tmp_path / "merged", progress=False)
        merged = TwoNorms().eval()
        load_model(merged, str(tmp_path / "merged" / "model.safetensors"))
        torch.testing.assert_close(merged(_images()), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(merged.block.norm.running_var, tuned.block.norm.running_var)

    frozen = _finetune(base)  # a frozen stem norm: no switch for `norm`, one for `block.norm` (names by suffix)
    frozen.norm.load_state_dict(base.norm.state_dict())
    convert_finetuned(base, frozen, tmp_path / "frozen", TSwitchConfig(density=0.5), progress=False)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "frozen").eval()
        reference = from_finetuned(copy.deepcopy(base), frozen, TSwitchConfig(density=0.5), progress=False).eval()
        torch.testing.assert_close(loaded(_images()), reference(_images()), rtol=0, atol=0)

    without = to_lora(tmp_path / "switch", base, tmp_path / "lora", rank=2, progress=False)
    assert any("running statistics (BatchNorm) of 2 norm layer(s)" in note for note in without.notes)
    with_norms = to_lora(tmp_path / "switch", base, tmp_path / "lora-norms", rank=2, include_norms=True, progress=False)
    assert not with_norms.notes and set(with_norms.modules_to_save) >= {"norm", "block.norm", "fc"}
    stored = load_file(str(tmp_path / "lora-norms" / "adapter_model.safetensors"))
    assert torch.equal(stored["base_model.model.block.norm.running_mean"], tuned.block.norm.running_mean)


def test_lora_export_of_a_plain_module(pair, tmp_path):
    root, base, _ = pair
    report = to_lora(root / "reference", base, tmp_path / "lora", rank=4, progress=False)
    assert {m.name for m in report.modules} == {"conv1", "conv2", "proj"} and report.modules_to_save == ["fc"]
    from_factory = to_lora(root / "reference", None, tmp_path / "lora2", rank=4, model_factory=FACTORY, progress=False)
    assert [m.relative_error for m in from_factory.modules] == [m.relative_error for m in report.modules]
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")
        assert loaded(_images()).shape == (3, 4)


def test_model_card_snippet_rebuilds_the_base(pair, tmp_path):
    root, _, _ = pair
    convert_finetuned(
        root / "base.safetensors",
        root / "tuned.safetensors",
        tmp_path / "out",
        model_factory=tiny_net,
        progress=False,
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| base model class | `test_plain_modules:TinyNet` |" in card
    assert "| base model factory | `test_plain_modules:tiny_net` |" in card
    assert "AutoModel" not in card
    snippet = re.search(r"### Load it.*?```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    assert "from test_plain_modules import tiny_net" in snippet and "base = tiny_net()" in snippet
    assert f'load_model(base, "{root / "base.safetensors"}")' in snippet
    namespace: dict = {}
    exec(snippet.replace("<this repository id or folder>", str(tmp_path / "out")), namespace)  # noqa: S102
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(pair[1]), tmp_path / "out")(_images())
        torch.testing.assert_close(namespace["model"](_images()), expected, rtol=0, atol=0)

    # the card push_to_hub writes in a folder of its own (the config loaded from the adapter, the old card copied)
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "README.md").write_text(card)
    write_model_card(str(tmp_path / "card"), TSwitchConfig.from_pretrained(str(tmp_path / "out")), repo_id="you/net")
    pushed = (tmp_path / "card" / "README.md").read_text()
    assert "base = tiny_net()" in pushed and 'PeftModel.from_pretrained(base, "you/net")' in pushed

    # from_finetuned(...).save_pretrained writes the class snippet too (no factory known there)
    card = (root / "reference" / "README.md").read_text()
    assert "from test_plain_modules import TinyNet" in card and "base = TinyNet()" in card


# -- command line ----------------------------------------------------------------------------------------------------


def test_cli_convert_inspect_merge_with_a_model_factory(pair, tmp_path, capsys):
    root, base, _ = pair
    files = [str(root / "base.safetensors"), str(root / "tuned.safetensors")]
    assert main(["convert", *files, "-o", str(tmp_path / "out"), "--model-factory", FACTORY, "-q"]) == 0
    _files_equal(tmp_path / "out", root / "reference")
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "test_plain_modules:TinyNet" in capsys.readouterr().out
    merged = str(tmp_path / "merged")
    assert main(["merge", files[0], str(tmp_path / "out"), "-o", merged, "--model-factory", FACTORY, "-q"]) == 0
    assert "model.safetensors + model_class.json" in capsys.readouterr().out
    assert main(["convert", *files, "-o", str(tmp_path / "bad"), "-q"]) == 1
    assert "--model-factory" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
