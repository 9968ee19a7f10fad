"""Switches decode on the device and in the dtype of the weights they modify."""

import copy

import pytest
import torch
from tiny_models import finetune_copy, tiny_llama

from switch_adapter import TSwitchConfig, from_finetuned

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_merge_in_weight_dtype_and_device(dtype, device):
    base = tiny_llama()
    tuned = finetune_copy(base, noise=0.05)
    model = from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(density=0.3), progress=False)
    model = model.to(device=device, dtype=dtype)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.tswitch_weight_code["default"].dtype == torch.uint8  # codes are never cast
    assert layer.tswitch_weight_code["default"].device.type == device
    delta = layer.get_delta_weight("default")
    assert delta.dtype == dtype and delta.device.type == device
    prompt = torch.tensor([[1, 5, 9, 17]], device=device)
    with torch.no_grad():
        unmerged = model(input_ids=prompt).logits
        model.merge_adapter()
        merged = model(input_ids=prompt).logits
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged, unmerged, rtol=tolerance, atol=tolerance)


def test_switches_built_from_half_precision_checkpoints_compute_in_float32():
    base = tiny_llama()
    tuned = finetune_copy(base, noise=0.05)
    full = from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(density=0.3), progress=False)
    half = from_finetuned(
        copy.deepcopy(base),
        {k: v.to(torch.bfloat16) for k, v in tuned.state_dict().items()},
        TSwitchConfig(density=0.3),
        progress=False,
    )
    layer_full = full.base_model.model.model.layers[1].mlp.down_proj
    layer_half = half.base_model.model.model.layers[1].mlp.down_proj
    assert layer_half.tswitch_weight_scale["default"].dtype == torch.float32
    torch.testing.assert_close(
        layer_half.tswitch_weight_scale["default"],
        layer_full.tswitch_weight_scale["default"],
        rtol=2e-2,
        atol=1e-4,
    )
