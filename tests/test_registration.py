"""The TSWITCH member added to peft's closed PeftType enum behaves like peft's own members.

If peft changes how its enum or its method registry works, this is the test that should fail first.
"""

import json

from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import switch_adapter
from switch_adapter._peft_registration import add_peft_type


def test_tswitch_is_a_real_peft_type_member():
    member = PeftType.TSWITCH
    assert PeftType("TSWITCH") is member
    assert PeftType["TSWITCH"] is member
    assert member in list(PeftType)
    assert member == "TSWITCH" and member.value == "TSWITCH"
    assert json.dumps(member) == '"TSWITCH"'
    assert add_peft_type("TSWITCH") is member  # idempotent


def test_tswitch_is_registered_with_peft():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TSWITCH] is switch_adapter.TSwitchConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TSWITCH] is switch_adapter.TSwitchModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TSWITCH] == "tswitch_"
    assert switch_adapter.TSwitchModel.prefix == "tswitch_"


def test_config_round_trips_through_peft_config(tmp_path):
    config = switch_adapter.TSwitchConfig(density=0.2, density_pattern={"query": 0.1})
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, switch_adapter.TSwitchConfig)
    assert loaded.peft_type is PeftType.TSWITCH
    assert loaded.density == 0.2 and loaded.density_for("encoder.layer.0.query") == 0.1
