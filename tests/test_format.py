"""The on-disk format: key grammar, checksums (format version 2), version 1 files, damage found before the model is
touched, inspect on unchanged and damaged units, and missing adapters failing fast."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from tiny_models import multibit_switches, tiny_bert, tiny_bert_classifier, token_batch

import switch_adapter
from switch_adapter import AdapterNotFoundError, CodecError, TSwitchConfig, from_finetuned, inspect_adapter
from switch_adapter.cli import main
from switch_adapter.codec import sass
from switch_adapter.format import (
    FORMAT_VERSION,
    PLAIN_FORMAT_VERSION,
    AdapterFile,
    Unit,
    iter_dense_deltas,
    parse_key,
    required_format_version,
    storage_summary,
    unit_checksum,
    verify_adapter_file,
)
from switch_adapter.tswitch.model_card import card_section

DATA = Path(__file__).parent / "data"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    no_layers = not any(isinstance(module, BaseTunerLayer) for module in model.modules())
    return no_layers and after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- key grammar ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "base_model.model.encoder.layer.0.output.dense.tswitch_weight_code",
            ("encoder.layer.0.output.dense", "weight", "code"),
        ),
        ("base_model.model.a.b.tswitch_bias_scale", ("a.b", "bias", "scale")),
        (
            "model.layers.1.mlp.up_proj.tswitch_weight_checksum.default",
            ("model.layers.1.mlp.up_proj", "weight", "checksum"),
        ),
        ("base_model.model.classifier.weight", None),
        ("base_model.model.x.tswitch_weight_other", None),
    ],
)
def test_key_grammar(key, expected):
    parsed = parse_key(key)
    assert (parsed is None and expected is None) or (parsed[0].module, parsed[0].param, parsed[1]) == expected
    if parsed is not None and not key.endswith(".default"):
        assert parsed[0].key(parsed[1]) == key


# -- format version 2: checksums ------------------------------------------------------------------------------


def test_saved_files_carry_a_checksum_per_unit(saved_switch):
    tensors = load_file(saved_switch / "adapter_model.safetensors")
    config = json.loads((saved_switch / "adapter_config.json").read_text())
    assert config["format_version"] == PLAIN_FORMAT_VERSION == 2 and FORMAT_VERSION == 5
    units = {parse_key(k)[0] for k in tensors if parse_key(k) and parse_key(k)[1] == "code"}
    assert units and all(isinstance(u, Unit) for u in units)
    entries = [entry for params in config["unit_layout"].values() for entry in params.values()]
    assert {entry["value_bits"] for entry in entries} == {1} and "grouped_coo" not in {e["encoding"] for e in entries}
    assert {int(tensors[unit.key("code")][4]) for unit in units} == {2}  # blob version 2: older readers load it
    for unit in units:
        stored = tensors[unit.key("checksum")]
        assert stored.dtype == torch.uint8 and torch.equal(
            stored, unit_checksum(tensors[unit.key("code")], tensors[unit.key("scale")])
        )


def test_flipped_payload_bytes_are_refused_before_the_base_is_touched(saved_switch):
    path = saved_switch / "adapter_model.safetensors"
    tensors = load_file(path)
    key = max((k for k in tensors if k.endswith("_code")), key=lambda k: tensors[k].numel())
    blob = tensors[key].clone()
    blob[30:94] ^= 0xFF  # 64 payload bytes flipped: a valid-looking blob that decodes to another switch
    tensors[key] = blob
    save_file(tensors, path)
    base = tiny_bert()
    before = _state(base)
    with pytest.raises(CodecError, match="checksum mismatch"):
        PeftModel.from_pretrained(base, saved_switch)
    assert _untouched(base, before)


def test_a_flipped_scale_byte_is_refused(saved_switch):
    path = saved_switch / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("tswitch_weight_scale"))
    raw = tensors[key].view(torch.uint8).clone()
    raw[3] ^= 0x40  # the exponent: a scale of about 3e-4 would become about -2e4
    tensors[key] = raw.view(torch.float32)
    save_file(tensors, path)
    base = tiny_bert()
    before = _state(base)
    with pytest.raises(CodecError, match=r"\.weight: checksum mismatch"):
        PeftModel.from_pretrained(base, saved_switch)
    assert _untouched(base, before)
    report = inspect_adapter(saved_switch)
    assert report.damaged and "checksum mismatch" in report.problems[0]
    assert "DAMAGED" in report.to_table()


def test_transformers_load_adapter_refuses_a_damaged_file_and_leaves_the_model_as_it_was(saved_switch):
    path = saved_switch / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("tswitch_weight_scale"))
    tensors[key] = tensors[key] * 2
    save_file(tensors, path)
    base = tiny_bert()
    before = _state(base)
    with pytest.raises(CodecError, match="checksum mismatch"):
        base.load_adapter(str(saved_switch))
    assert _untouched(base, before)


def test_a_missing_checksum_in_a_version_2_file_is_refused(saved_switch):
    path = saved_switch / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith("query.tswitch_weight_checksum")}
    save_file(tensors, path)
    with pytest.raises(CodecError, match="no checksum"):
        TSwitchConfig.from_pretrained(str(saved_switch))


def test_trained_scales_are_saved_with_a_fresh_checksum(saved_switch, tmp_path):
    model = PeftModel.from_pretrained(tiny_bert(), saved_switch, is_trainable=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "tswitch_" in name and name.endswith("_scale.default"):
                param.mul_(1.5)
    model.save_pretrained(tmp_path / "trained")
    verify_adapter_file(tmp_path / "trained" / "adapter_model.safetensors", model.peft_config["default"].unit_layout, 2)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "trained")
    torch.testing.assert_close(reloaded(**token_batch()).last_hidden_state, model(**token_batch()).last_hidden_state)


def test_sizes_count_the_checksum(saved_switch):
    config = TSwitchConfig.from_pretrained(str(saved_switch))
    summary = storage_summary(config)
    report = inspect_adapter(saved_switch)
    assert summary.switch_bytes == report.switch_bytes
    assert summary.switch_bytes == sum(
        e["code_bytes"] + 4 * e["scales"] + 4 for p in config.unit_layout.values() for e in p.values()
    )


# -- format version 1 -----------------------------------------------------------------------------------------


def test_version_1_files_keep_loading_and_stay_version_1(tmp_path):
    folder = DATA / "v1_tiny_bert_switch"
    assert json.loads((folder / "adapter_config.json").read_text())["format_version"] == 1
    model = PeftModel.from_pretrained(tiny_bert_classifier(), folder)
    with torch.no_grad():
        logits = model(**token_batch()).logits
    torch.testing.assert_close(logits, load_file(DATA / "v1_expected_logits.safetensors")["logits"])
    report = inspect_adapter(folder)
    assert report.format_version == 1 and not report.damaged and {u.checksum for u in report.units} == {"absent"}
    model.save_pretrained(tmp_path)
    assert not any(k.endswith("_checksum") for k in load_file(tmp_path / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format_version"] == 1


def test_version_1_payload_damage_is_found_by_decoding_before_the_model_is_touched(tmp_path):
    folder = tmp_path / "v1"
    folder.mkdir()
    for name in ("adapter_config.json", "README.md"):
        (folder / name).write_bytes((DATA / "v1_tiny_bert_switch" / name).read_bytes())
    tensors = load_file(DATA / "v1_tiny_bert_switch" / "adapter_model.safetensors")
    key = max((k for k in tensors if k.endswith("_code")), key=lambda k: tensors[k].numel())
    blob = tensors[key].clone()
    blob[-1] = 0xFF  # nonzero padding bits / an inconsistent stream
    tensors[key] = blob
    save_file(tensors, folder / "adapter_model.safetensors")
    base = tiny_bert_classifier()
    before = _state(base)
    with pytest.raises(CodecError, match="corrupt"):
        PeftModel.from_pretrained(base, folder)
    assert _untouched(base, before)


# -- a targeted tensor the fine-tune left unchanged -------------------------------------------------------------


def test_inspect_and_cli_accept_a_switch_with_unchanged_tensors(tmp_path, capsys):
    base = tiny_bert()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.encoder.layer[0].attention.self.query.weight.add_(0.01)
    model = from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(target_modules="all-linear"), progress=False)
    model.save_pretrained(tmp_path)
    report = inspect_adapter(tmp_path)
    assert not report.damaged and [u.name for u in report.units] == ["encoder.layer.0.attention.self.query.weight"]
    assert len(report.unchanged) > 5
    assert main(["inspect", str(tmp_path)]) == 0
    assert "without a switch" in capsys.readouterr().out
    PeftModel.from_pretrained(tiny_bert(), tmp_path)  # loads as before


def test_cli_inspect_exits_non_zero_on_damage(saved_switch, capsys):
    path = saved_switch / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("_code") and tensors[k].numel())
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, path)
    assert main(["inspect", str(saved_switch), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"]


# -- missing adapters fail fast -----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("offline", ["0", "1"])
def test_a_missing_adapter_name_fails_at_once_without_hub_retries(tmp_path, offline):
    script = (
        "import sys, torch, switch_adapter\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from tiny_models import tiny_bert\n"
        "calls = (\n"
        "    lambda: switch_adapter.TSwitchConfig.from_pretrained('my-switch-typo'),\n"
        "    lambda: switch_adapter.inspect_adapter('my-switch-typo'),\n"
        "    lambda: switch_adapter.AutoSwitchModel.from_pretrained(\n"
        "        tiny_bert(), adapters={'a': 'my-switch-typo'},\n"
        "        query_sets={'a': torch.ones(2, 4, dtype=torch.long)}),\n"
        "    lambda: switch_adapter.AutoSwitchModel.from_pretrained('my-router-typo', base_model=tiny_bert()),\n"
        ")\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except switch_adapter.AdapterNotFoundError as error:\n"
        "        print('NOT FOUND:', str(error).splitlines()[0])\n"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",  # nothing listens: the Hub is unreachable
        "HF_HUB_OFFLINE": offline,
        "HF_HOME": str(tmp_path),
    }
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("NOT FOUND:") for line in lines), result.stdout
    assert ["'my-switch-typo'" in line for line in lines] == [True, True, True, False] and "'my-router-typo'" in lines[
        3
    ]
    assert "Retrying" not in result.stderr  # huggingface_hub's backoff (about 23 s) was not entered


def test_errors_share_one_base_and_the_builtins_callers_catch():
    assert issubclass(CodecError, ValueError) and issubclass(AdapterNotFoundError, FileNotFoundError)
    for name in ("CodecError", "LayoutMismatchError", "AdapterNotFoundError", "OutputExistsError"):
        assert issubclass(getattr(switch_adapter, name), switch_adapter.SwitchAdapterError)


# -- format version 3: multi-bit units ------------------------------------------------------------------------------


def test_required_format_version():
    plain = {"a": {"weight": {"value_bits": 1, "encoding": "positions"}, "bias": {"encoding": "bitmap"}}}
    assert required_format_version({}) == required_format_version(plain) == PLAIN_FORMAT_VERSION == 2
    assert required_format_version({**plain, "b": {"weight": {"value_bits": 4, "encoding": "bitmap"}}}) == 3
    assert required_format_version({"b": {"weight": {"value_bits": 1, "encoding": "grouped_coo"}}}) == 3


def _dense(switch) -> torch.Tensor:
    """``scale * multipliers`` at the kept positions, built here independently of the library."""
    dense = torch.zeros(switch.numel)
    dense[switch.mask] = switch.multipliers.to(torch.float32)
    return dense.view(switch.shape) * switch.scale


def test_multibit_units_save_reload_and_merge_exactly(multibit_switch):
    folder, switches = multibit_switch
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["format_version"] == 3 and FORMAT_VERSION == 5
    for (module, param), switch in switches.items():
        entry = config["unit_layout"][module][param]
        assert (entry["value_bits"], entry["kept"]) == (switch.value_bits, switch.kept)
    others = [e for m, ps in config["unit_layout"].items() for p, e in ps.items() if (m, p) not in switches]
    assert others and {entry["value_bits"] for entry in others} == {1}

    base = tiny_bert()
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder)  # a fresh load
    for (module, param), switch in switches.items():
        assert torch.equal(model.get_base_model().get_submodule(module).get_delta("default", param), _dense(switch))
    with torch.no_grad():
        unmerged = model(**token_batch()).last_hidden_state
    merged = model.merge_and_unload()
    for (module, param), switch in switches.items():
        expected = getattr(base.get_submodule(module), param) + _dense(switch)
        assert torch.equal(getattr(merged.get_submodule(module), param), expected)
    with torch.no_grad():
        torch.testing.assert_close(merged(**token_batch()).last_hidden_state, unmerged)


def test_dense_deltas_of_multibit_units(multibit_switch):
    folder, switches = multibit_switch
    config = TSwitchConfig.from_pretrained(str(folder))
    with AdapterFile(folder / "adapter_model.safetensors") as file:
        deltas = dict(iter_dense_deltas(file, config.unit_layout))
    for (module, param), switch in switches.items():
        assert torch.equal(deltas[Unit(module, param)], _dense(switch))


def test_older_readers_refuse_version_3_with_an_upgrade_message(multibit_switch, monkeypatch):
    folder, _ = multibit_switch
    tensors = load_file(folder / "adapter_model.safetensors")
    code = tensors["base_model.model.encoder.layer.0.attention.self.query.tswitch_weight_code"]
    assert int(code[4]) == 3 and int(code[6]) == 4  # blob version 3, 4 value bits
    # What a reader of versions up to 2 does, simulated with this library's own checks set to version 2:
    monkeypatch.setattr("switch_adapter.tswitch.config.FORMAT_VERSION", 2)
    with pytest.raises(ValueError, match="format version 3.*Upgrade it"):
        TSwitchConfig.from_pretrained(str(folder))
    monkeypatch.setattr(sass, "FORMAT_VERSION", 2)
    monkeypatch.setattr(sass, "_HEADER_STRUCTS", {v: sass._HEADER_STRUCTS[v] for v in (1, 2)})
    with pytest.raises(CodecError, match="format version 3.*upgrade switch-adapter"):
        sass.decode(code)


def test_a_layout_disagreeing_with_the_value_bits_is_refused(multibit_switch):
    folder, _ = multibit_switch
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["unit_layout"]["encoder.layer.0.attention.self.query"]["weight"]["value_bits"] = 2
    path.write_text(json.dumps(config))
    with pytest.raises(CodecError, match="stores 4-bit values, the config says 2 value bits"):
        TSwitchConfig.from_pretrained(str(folder))


def test_saving_raises_the_format_version_to_what_the_units_need(saved_switch, tmp_path):
    model = PeftModel.from_pretrained(tiny_bert(), saved_switch)
    switches = multibit_switches(model)
    model.peft_config["default"].format_version = 2  # a trainer that forgot to set it
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["format_version"] == 3
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "out")
    module, param = next(iter(switches))
    delta = reloaded.get_base_model().get_submodule(module).get_delta("default", param)
    assert torch.equal(delta, _dense(switches[(module, param)]))


def test_sizes_and_inspect_of_multibit_units(multibit_switch):
    folder, switches = multibit_switch
    config = TSwitchConfig.from_pretrained(str(folder))
    summary = storage_summary(config)
    report = inspect_adapter(folder)
    assert not report.damaged and summary.switch_bytes == report.switch_bytes
    assert summary.mean_value_bits == pytest.approx(report.mean_value_bits) and report.mean_value_bits > 1
    assert summary.bound_bytes == pytest.approx(report.bound_bytes)
    bits = {unit.name: unit.value_bits for unit in report.units}
    for (module, param), switch in switches.items():
        assert bits[f"{module}.{param}"] == switch.value_bits
    assert set(bits.values()) == {1, 2, 4, 8}
    expected_mean = sum(u.kept * u.value_bits for u in report.units) / report.kept
    assert report.to_dict()["totals"]["mean_value_bits"] == pytest.approx(expected_mean)
    table = report.to_table()
    assert "value bits" in table.splitlines()[3] and "value bits: " in table
    assert "value bits (mean per kept entry)" in (folder / "README.md").read_text()


def test_plain_switch_shows_no_mean_value_bits(saved_switch):
    assert "value bits: " not in inspect_adapter(saved_switch).to_table()
    config = TSwitchConfig.from_pretrained(str(saved_switch))
    assert "value bits" not in card_section(config) and "## T-Switch adapter" in card_section(config)


def test_model_card_of_a_flexswitch(multibit_switch):
    folder, _ = multibit_switch
    config = TSwitchConfig.from_pretrained(str(folder))
    config.flexswitch = {"budget": "0.5 bits/param", "budget_bytes": 12_000, "file_bytes": 11_500, "steps": 500,
                         "examples": 100, "final_loss": 0.01234, "seed": 0}  # fmt: skip
    text = card_section(config)
    assert "## FlexSwitch adapter" in text and "learned per-unit sparsity and bit-width" in text
    assert "| budget asked | 0.5 bits/param (12,000 bytes) |" in text
    assert "| file size reached | 11,500 bytes |" in text and "500 steps, 100 examples" in text
    assert "value bits (mean per kept entry)" in text
    config.flexswitch = {"file_bytes": 10}  # any key may be missing
    assert "| file size reached | 10 bytes |" in card_section(config)


# -- low-rank pairs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def low_rank_switch(tmp_path_factory):
    """A switch converted from a random LoRA of a tiny BERT in factors mode (2-bit low-rank pairs)."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("low-rank")
    tiny_bert().save_pretrained(folder / "base")
    torch.manual_seed(0)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["query", "dense"], init_lora_weights=False)
    get_peft_model(tiny_bert(), config).save_pretrained(folder / "lora")
    switch_adapter.convert_lora(folder / "base", folder / "lora", folder / "switch", TSwitchConfig(density=1.0),
                                mode="factors", value_bits=2, progress=False)  # fmt: skip
    return folder / "switch"


def test_low_rank_pairs_are_version_5_with_checked_layouts(low_rank_switch):
    from switch_adapter.format import LOW_RANK_UNITS, low_rank_problems

    config = TSwitchConfig.from_pretrained(low_rank_switch)
    assert config.format_version == 5 == required_format_version(config.unit_layout)
    module, params = next(iter(config.unit_layout.items()))
    assert sorted(params) == sorted(LOW_RANK_UNITS) and low_rank_problems(params) == []
    left, right = params["weight_left"], params["weight_right"]
    assert left["shape"][1] == right["shape"][0] == 3 and left["target_shape"] == [left["shape"][0], right["shape"][1]]
    assert "only one" in low_rank_problems({"weight_left": left})[0]
    assert "both a weight unit" in low_rank_problems({**params, "weight": left})[0]
    assert "do not chain" in low_rank_problems({"weight_left": left, "weight_right": {**right, "shape": [2, 16]}})[0]
    wrong = {"weight_left": {**left, "target_shape": [99, 16]}, "weight_right": right}
    assert "make no weight" in low_rank_problems(wrong)[0]
    # The file's dense deltas come as the weight's change: the product of the factors, as the loaded layer has it.
    model = PeftModel.from_pretrained(tiny_bert(), low_rank_switch)
    with AdapterFile(low_rank_switch / "adapter_model.safetensors") as file:
        deltas = dict(iter_dense_deltas(file, config.unit_layout))
    layer = model.base_model.model.get_submodule(module)
    torch.testing.assert_close(deltas[Unit(module, "weight")], layer.get_delta("default", "weight"))
    assert not any(unit.param in LOW_RANK_UNITS for unit in deltas)
    assert "## Low-rank switch adapter" in (low_rank_switch / "README.md").read_text()


def test_a_layout_with_half_a_pair_is_refused_before_loading(low_rank_switch, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("adapter_model.safetensors", "README.md"):
        (broken / name).write_bytes((low_rank_switch / name).read_bytes())
    config = json.loads((low_rank_switch / "adapter_config.json").read_text())
    module = next(iter(config["unit_layout"]))
    del config["unit_layout"][module]["weight_right"]
    (broken / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_bert()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(CodecError, match="low-rank pair needs both weight_left and weight_right"):
        PeftModel.from_pretrained(base, broken)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_a_low_rank_switch_exports_merges_and_inspects(low_rank_switch, tmp_path):
    """The exports take a pair as its weight's change: a LoRA of the pair's rank holds it exactly, a merged model has
    it in its weights; inspect lists the two units of each pair."""
    base_folder = low_rank_switch.parent / "base"
    model = PeftModel.from_pretrained(tiny_bert(), low_rank_switch)
    module = next(iter(TSwitchConfig.from_pretrained(low_rank_switch).unit_layout))
    change = model.base_model.model.get_submodule(module).get_delta("default", "weight")
    report = switch_adapter.to_lora(low_rank_switch, base_folder, tmp_path / "lora", rank=3, progress=False)
    assert report.relative_error < 1e-5  # rank 3 is the pairs' rank: nothing is dropped
    merged_folder = switch_adapter.materialize(base_folder, low_rank_switch, tmp_path / "merged", progress=False)
    merged = type(tiny_bert()).from_pretrained(merged_folder)
    weight = merged.get_submodule(module.removeprefix("bert.")).weight
    torch.testing.assert_close(weight, tiny_bert().get_submodule(module).weight + change, rtol=1e-6, atol=1e-6)
    inspection = inspect_adapter(low_rank_switch)
    assert {unit.name.rsplit(".", 1)[-1] for unit in inspection.units} == {"weight_left", "weight_right"}
