"""Bad input gets a clear error that names the problem, and leaves files and models as they were."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from tiny_models import finetune_copy, tiny_bert, tiny_bert_classifier, token_batch

from switch_adapter import CodecError, ConfigError, LayoutMismatchError, TSwitchConfig, from_finetuned
from switch_adapter.codec import sass
from switch_adapter.format import add_checksums


def _has_adapter_layers(model) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_switch_loaded_onto_a_base_of_other_shapes(saved_switch):
    other = tiny_bert(hidden_size=48, intermediate_size=96)
    with pytest.raises(
        LayoutMismatchError,
        match=r"word_embeddings\.weight: switch made for shape \[100, 32\], base model has \[100, 48\]",
    ):
        PeftModel.from_pretrained(other, saved_switch)
    assert not _has_adapter_layers(other)


def test_truncated_file_fails_before_the_model_is_touched(saved_switch):
    path = saved_switch / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    base = tiny_bert()
    with pytest.raises(CodecError, match="truncated or corrupt"):
        PeftModel.from_pretrained(base, saved_switch)
    assert not _has_adapter_layers(base)


def test_corrupt_switch_blob_names_the_tensor(saved_switch):
    path = saved_switch / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("query.tswitch_weight_code"))
    tensors[key] = tensors[key][:-3].clone()
    save_file(add_checksums(tensors), path)  # a consistent checksum: the codec itself must find the damage
    base = tiny_bert()
    with pytest.raises(CodecError, match=r"query\.weight: switch blob for this unit is truncated"):
        PeftModel.from_pretrained(base, saved_switch)
    assert not _has_adapter_layers(base)


@pytest.mark.parametrize(("offset", "value", "message"), [(5, 0, "unknown encoding"), (4, 99, "format version 99")])
def test_unknown_encoding_or_version(saved_switch, offset, value, message):
    path = saved_switch / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("_code"))
    blob = tensors[key].clone()
    blob[offset] = value if offset == 4 else 77
    tensors[key] = blob
    save_file(add_checksums(tensors), path)
    with pytest.raises(CodecError, match=message if offset == 4 else "unknown encoding id 77"):
        PeftModel.from_pretrained(tiny_bert(), saved_switch)
    assert sass.HEADER_BYTES >= 6


def test_newer_format_version_in_config_is_refused(saved_switch):
    config_path = saved_switch / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["format_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99.*Upgrade"):
        PeftModel.from_pretrained(tiny_bert(), saved_switch)


QUERY = "encoder.layer.0.attention.self.query"


def _edit_config(folder, edit) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _set_entry(key, value):
    return lambda config: config["unit_layout"][QUERY]["weight"].__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [  # records written at save time that a hand edit (or a damaged download) broke
        (_set_entry("code_bytes", "152"), ConfigError, r"\['weight'\]\['code_bytes'\] must be a whole number >= 0"),
        (_set_entry("shape", "32x32"), ConfigError, r"\['shape'\] must be a list of sizes"),
        (_set_entry("scales", 0), ConfigError, r"\['scales'\] must be a whole number >= 1"),
        (lambda c: c.__setitem__("unit_layout", [QUERY]), ConfigError, "unit_layout must map module names"),
        (lambda c: c["unit_layout"].__setitem__(QUERY, "weight"), ConfigError, "must map parameter names"),
        (lambda c: c.__setitem__("format_version", "2"), ConfigError, "format_version must be a whole number"),
        (lambda c: c.__setitem__("norm_statistics", 7), ConfigError, "norm_statistics must map module names"),
        # well-formed records that disagree with the weights file
        (_set_entry("code_bytes", 151), CodecError, r"query\.weight: holds a code of \d+ bytes, the config says 151"),
        (_set_entry("kept", 3), CodecError, r"query\.weight: keeps \d+ entries, the config says 3"),
        (lambda c: c["unit_layout"][QUERY].pop("weight"), CodecError, "query.weight: holds a switch that the config"),
        (lambda c: c["unit_layout"].pop(QUERY), CodecError, "query.bias: holds a switch that the config"),
    ],
)
def test_an_edited_config_is_refused_before_the_model_is_touched(saved_switch, edit, error, message):
    _edit_config(saved_switch, edit)
    base = tiny_bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(error, match=message) as raised:
        PeftModel.from_pretrained(base, saved_switch)
    if error is ConfigError:
        assert "edited or damaged" in str(raised.value) and "Save the adapter again" in str(raised.value)
    assert not _has_adapter_layers(base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_null_records_read_as_empty(saved_switch):
    _edit_config(saved_switch, lambda c: c.update(modules_to_save_shapes=None, norm_statistics=None))
    model = PeftModel.from_pretrained(tiny_bert(), saved_switch)
    assert model.peft_config["default"].norm_statistics == {}
    assert torch.isfinite(model(**token_batch()).last_hidden_state).all()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(target_modules=5), "target_modules must be a module name, a regex, or a list of module names"),
        (dict(exclude_modules=[1]), "exclude_modules must be"),
        (dict(modules_to_save="classifier"), r"modules_to_save must be a list of module names, e\.g\. \[.classifier"),
        (dict(layers_to_transform="0,1"), "layers_to_transform must be a layer index or a list of them"),
        (dict(layers_to_transform=[0, -1]), "layers_to_transform must be"),
        (dict(switch_bias="no"), "switch_bias must be True or False, got 'no'"),
        (dict(density_pattern=[("query", 0.1)]), "density_pattern must map module regexes to densities"),
    ],
)
def test_settings_of_the_wrong_type_are_named(setting, message):
    with pytest.raises(ConfigError, match=message) as raised:
        TSwitchConfig(**setting)
    assert "edited or damaged" not in str(raised.value)  # a setting in code, not a damaged file


def test_nan_in_the_fine_tuned_model_leaves_the_base_untouched():
    base = tiny_bert()
    tuned = finetune_copy(base)
    with torch.no_grad():
        tuned.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.weight.*NaN/Inf"):
        from_finetuned(base, tuned, TSwitchConfig(), progress=False)
    assert not _has_adapter_layers(base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_an_error_after_the_heads_were_stored_leaves_the_base_head():
    from switch_adapter.tswitch.build import head_updates, store_switches, switch_adapter_for

    base = tiny_bert_classifier()
    tuned = finetune_copy(base)  # its classifier differs from the base's
    before = {k: v.clone() for k, v in base.state_dict().items()}
    config = TSwitchConfig(task_type="SEQ_CLS", modules_to_save=["classifier"])
    with pytest.raises(RuntimeError, match="stop"):
        with switch_adapter_for(base, config, "default") as model:
            heads = head_updates(model.get_base_model(), "default", tuned.state_dict())
            store_switches(model, "default", [], heads)  # as FlexSwitch does before it trains
            raise RuntimeError("stop")
    assert not _has_adapter_layers(base) and type(base.classifier) is torch.nn.Linear
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_fine_tuned_model_of_other_shapes():
    base = tiny_bert()
    with pytest.raises(ValueError, match=r"fine-tuned shape \[48, 48\] != base \[32, 32\]"):
        from_finetuned(base, tiny_bert(hidden_size=48, intermediate_size=96), progress=False)
    assert not _has_adapter_layers(base)


@pytest.mark.parametrize("density", [0, 1.01, -1, "0.5", True])
def test_density_outside_range(density):
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        TSwitchConfig(density=density)
    with pytest.raises(ValueError, match=r"density_pattern\['query'\]"):
        TSwitchConfig(density_pattern={"query": density})


def test_target_modules_that_match_nothing():
    base = tiny_bert()
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(base, TSwitchConfig(target_modules=["does_not_exist"]))
    assert not _has_adapter_layers(base)


def test_unsupported_layer_type_is_named():
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.LSTM(4, 4))
    with pytest.raises(TypeError, match=r"Target module 2 \(LSTM\) is not supported"):
        get_peft_model(base, TSwitchConfig(target_modules=["2"]))


def test_corrupt_blob_reaching_a_forward_names_the_module(saved_switch):
    model = PeftModel.from_pretrained(tiny_bert(), saved_switch)
    layer = model.base_model.model.encoder.layer[0].attention.self.key
    layer.tswitch_weight_code["default"] = layer.tswitch_weight_code["default"][:-1].clone()
    with pytest.raises(CodecError, match=r"encoder\.layer\.0\.attention\.self\.key"):
        model(**token_batch())
