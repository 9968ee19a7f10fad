"""The ``switch-adapter`` command line: subprocesses for the entry point, help, errors and Hub ids; ``main(argv)``
in-process for the rest (same code path, without paying a Python start-up per command)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import finetune_copy, tiny_bert, tiny_llama, token_batch
from transformers import AutoModelForCausalLM

from switch_adapter import TSwitchConfig, from_finetuned
from switch_adapter.cli import main

COMMANDS = ("convert", "convert-lora", "flex", "inspect", "merge", "export-lora", "push")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed ``switch-adapter`` entry point (or ``python -m switch_adapter.cli``) in a subprocess."""
    entry = shutil.which("switch-adapter")
    command = [entry] if entry else [sys.executable, "-m", "switch_adapter.cli"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A saved tiny Llama base and a T-Switch made on it, with the switch's logits."""
    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    model = from_finetuned(
        copy.deepcopy(base),
        finetune_copy(base, noise=0.05),
        TSwitchConfig(density=0.2, task_type="CAUSAL_LM"),
        progress=False,
    )
    model.save_pretrained(root / "switch")
    with torch.no_grad():
        torch.save(model(**token_batch(vocab_size=128)).logits, root / "switch_logits.pt")
    return root


def _logits(folder) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(**token_batch(vocab_size=128)).logits


# -- subprocesses -----------------------------------------------------------------------------------------


def test_help_lists_commands_and_examples(capsys):
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout
    assert "examples:" in result.stdout and "HF_TOKEN" in result.stdout

    for command in COMMANDS:
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"switch-adapter {command}" in text
    assert main(["merge"]) == 2  # usage error: argparse's message and exit code 2
    assert "required" in capsys.readouterr().err


def test_error_is_one_message_without_traceback(llama, tmp_path):
    result = _cli("merge", str(llama / "base"), str(tmp_path / "missing-switch"), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("switch-adapter merge: error:")]
    assert len(message) == 1 and "missing-switch" in message[0] and "does not exist" in message[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError):  # --debug shows the real exception
        main(["merge", str(llama / "base"), str(tmp_path / "missing-switch"), "-o", str(tmp_path / "out"), "--debug"])


def test_push_then_merge_by_hub_ids(llama, tmp_path, hub_repo_id, capsys):
    base_repo, switch_repo = hub_repo_id + "-base", hub_repo_id + "-switch"
    AutoModelForCausalLM.from_pretrained(llama / "base").push_to_hub(base_repo)
    assert main(["push", str(llama / "switch"), switch_repo, "--token", "hf_test_token", "-v"]) == 0
    assert switch_repo in capsys.readouterr().out
    files = set(HfApi().list_repo_files(switch_repo))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files

    result = _cli("merge", base_repo, switch_repo, "-o", str(tmp_path / "merged"), "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote a transformers model folder" in result.stdout
    torch.testing.assert_close(_logits(tmp_path / "merged"), torch.load(llama / "switch_logits.pt"))

    assert main(["inspect", switch_repo, "--revision", "main"]) == 0
    assert "model.layers.0.self_attn.q_proj.weight" in capsys.readouterr().out


# -- in-process main() ----------------------------------------------------------------------------------


def test_inspect_table_and_json(llama, capsys):
    assert main(["inspect", str(llama / "switch")]) == 0
    table = capsys.readouterr().out
    assert "bits/param" in table and "total (" in table and "entropy bound" in table
    assert main(["inspect", str(llama / "switch"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["task_type"] == "CAUSAL_LM" and data["totals"]["units"] == len(data["units"]) > 10
    assert 0.15 < data["totals"]["density"] < 0.25 and data["totals"]["fraction_of_fp32"] < 0.1


def test_merge_weights_and_existing_output(llama, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(llama / "base"), str(llama / "switch"), "-o", str(out), "--weights", "2", "-q"]) == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["merge", str(llama / "base"), str(llama / "switch"), "-o", str(out), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err and "--overwrite" not in os.listdir(out)
    assert (out / "model.safetensors").stat().st_mtime_ns == before  # untouched
    args = ["merge", str(llama / "base"), str(llama / "switch"), str(llama / "switch"), "-o", str(tmp_path / "x")]
    assert main([*args, "--weights", "1"]) == 1
    assert "--weights got 1 values for 2 adapters" in capsys.readouterr().err

    assert main(["merge", str(llama / "base"), str(llama / "switch"), "-o", str(out), "--overwrite", "-q"]) == 0
    torch.testing.assert_close(_logits(out), torch.load(llama / "switch_logits.pt"))
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_export_lora(llama, tmp_path, capsys):
    out = tmp_path / "lora"
    args = ["export-lora", str(llama / "switch"), "--base", str(llama / "base"), "-o", str(out), "--rank", "64"]
    assert main([*args, "--include-norms", "-q"]) == 0
    assert "relative error" in capsys.readouterr().out
    lora = PeftModel.from_pretrained(tiny_llama(), out)
    with torch.no_grad():
        got = lora(**token_batch(vocab_size=128)).logits
    torch.testing.assert_close(got, torch.load(llama / "switch_logits.pt"), rtol=1e-4, atol=1e-5)

    assert main([*args, "-q"]) == 1 and "already exists" in capsys.readouterr().err
    assert main([*args, "-q", "--overwrite", "--rank", "4", "--json", "--exclude-modules", "lm_head"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank"] == 4 and 0 < report["lora_relative_error"] < 1
    assert any(d["name"] == "lm_head.weight" and d["reason"] == "excluded" for d in report["dropped"])


def test_push_refuses_what_is_not_a_switch(tmp_path, hub_repo_id, capsys):
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2)).save_pretrained(tmp_path / "lora")
    assert main(["push", str(tmp_path / "lora"), hub_repo_id]) == 1
    assert "not a T-Switch adapter" in capsys.readouterr().err
    assert main(["push", "you/not-a-folder", hub_repo_id]) == 1
    assert "not a local folder" in capsys.readouterr().err
    assert not HfApi().repo_exists(hub_repo_id)


# -- converters (written in parallel; skipped where they are missing) ---------------------------------


def test_convert_full_checkpoint(tmp_path, capsys):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    finetune_copy(base).save_pretrained(tmp_path / "tuned")
    args = ["convert", str(tmp_path / "base"), str(tmp_path / "tuned"), "-o", str(tmp_path / "switch"), "-q"]
    assert main([*args, "--density", "0.1", "--target-modules", "query,value", "--scale-granularity", "row"]) == 0
    assert "T-Switch written" in capsys.readouterr().out
    config = json.loads((tmp_path / "switch" / "adapter_config.json").read_text())
    assert config["density"] == 0.1 and config["scale_granularity"] == "row"
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert main(args) == 1 and "exist" in capsys.readouterr().err  # no --overwrite
    assert main([*args[:-1], "--density", "2"]) == 1 and "density" in capsys.readouterr().err


def test_convert_lora_and_force(tmp_path, capsys):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    lora_config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    lora = get_peft_model(copy.deepcopy(base), lora_config)
    lora.peft_config["default"].base_model_name_or_path = "someone/another-model"
    lora.save_pretrained(tmp_path / "lora")
    args = ["convert-lora", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "switch"), "-q"]
    assert main(args) == 1 and "another-model" in capsys.readouterr().err
    assert not (tmp_path / "switch").exists()
    assert main([*args, "--force", "--mode", "factors", "--value-bits", "4", "--density", "1.0"]) == 0
    assert "T-Switch written" in capsys.readouterr().out
    switch = PeftModel.from_pretrained(tiny_llama(), tmp_path / "switch")
    assert switch.peft_config["default"].density == 1.0
    entries = switch.peft_config["default"].unit_layout["model.layers.0.self_attn.q_proj"]
    assert sorted(entries) == ["weight_left", "weight_right"] and entries["weight_left"]["value_bits"] == 4


@pytest.mark.parametrize("command", ["convert", "convert-lora"])
def test_switch_options_take_their_defaults_from_the_config(command, capsys):
    from switch_adapter._cli_commands import switch_config
    from switch_adapter.cli import build_parser
    from switch_adapter.tswitch.config import DEFAULT_DENSITY

    assert main([command, "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {DEFAULT_DENSITY:g})" in help_text and "(default norm)" in help_text
    assert "(default --no-keep-ties)" in help_text
    parser = build_parser()
    plain = parser.parse_args([command, "base", "tuned", "-o", "out"])
    assert switch_config(plain) is None  # the converters then use TSwitchConfig(): one set of defaults
    given = parser.parse_args([command, "base", "tuned", "-o", "out", "--scale-rule", "rms", "--keep-ties"])
    config = switch_config(given)
    assert (config.scale_rule, config.keep_ties, config.density) == ("rms", True, DEFAULT_DENSITY)
    config = switch_config(parser.parse_args([command, "base", "tuned", "-o", "out", "--no-keep-ties"]))
    assert config.keep_ties is False and config.scale_rule == TSwitchConfig().scale_rule == "norm"


# -- inspect of multi-bit units: value bits, encodings, plots ----------------------------------------------------


def test_inspect_json_shows_density_value_bits_encoding_and_bytes(multibit_switch, capsys):
    folder, switches = multibit_switch
    assert main(["inspect", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    units = {unit["name"]: unit for unit in data["units"]}
    for (module, param), switch in switches.items():
        unit = units[f"{module}.{param}"]
        assert unit["value_bits"] == switch.value_bits and unit["kept"] == switch.kept
        assert unit["density"] == pytest.approx(switch.kept / switch.numel)
        assert unit["encoding"] in {"bitmap", "positions", "complement", "grouped_coo"} and unit["bytes"] > 0
    assert {unit["value_bits"] for unit in data["units"]} == {1, 2, 4, 8}
    assert data["format_version"] == 3 and data["totals"]["mean_value_bits"] > 1
    assert main(["inspect", str(folder)]) == 0
    table = capsys.readouterr().out
    assert "value bits" in table and "value bits: " in table  # the column and the mean (shown when above 1)


def test_inspect_plot_writes_a_png(multibit_switch, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder, _ = multibit_switch
    target = tmp_path / "units.png"
    assert main(["inspect", str(folder), "--json", "--plot", str(target)]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays JSON; the note goes to stderr
    assert "units.png" in captured.err
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 5_000


def test_plot_units_takes_reports_statuses_and_json(multibit_switch, tmp_path):
    pytest.importorskip("matplotlib")
    from switch_adapter import inspect_adapter
    from switch_adapter.export.plot import layer_groups, plot_units, unit_points
    from switch_adapter.format import AdapterFile

    folder, _ = multibit_switch
    report = inspect_adapter(folder)
    config = TSwitchConfig.from_pretrained(str(folder))
    with AdapterFile(folder / "adapter_model.safetensors") as file:
        statuses = file.check(config.unit_layout, config.format_version)
    expected = unit_points(report)
    assert len(expected) == len(report.units) and {p.value_bits for p in expected} == {1, 2, 4, 8}
    assert unit_points(statuses) == expected and unit_points(report.to_dict()) == expected
    assert plot_units(statuses, tmp_path / "from_statuses.png") == str(tmp_path / "from_statuses.png")
    assert (tmp_path / "from_statuses.png").stat().st_size > 5_000
    labels = [label for label, _, _ in layer_groups([p.name for p in expected])]
    assert labels[:3] == ["embeddings", "0", "1"] and labels[-1] == "pooler"
    with pytest.raises(ValueError, match="no switched unit"):
        plot_units([], tmp_path / "empty.png")


def test_inspect_plot_without_matplotlib_names_the_extra(saved_switch, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["inspect", str(saved_switch), "--plot", str(tmp_path / "units.png")]) == 1
    assert 'pip install "switch-adapter[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "units.png").exists()
