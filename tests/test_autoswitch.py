"""Auto-Switch: routing, per-sample composition in mixed batches (forward and generate), bundles, bad input.

Synthetic tasks are separable by construction: task t uses token ids from its own small vocabulary range. Each
task's switch is built with ``from_finetuned`` from a distinct noisy copy of the base model. References are
computed independently of the router: ``base + sum_t w_t * (merged switch_t - base)`` from plain PEFT models.
"""

from __future__ import annotations

import copy
import json
import re
import threading

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from tiny_models import finetune_copy, tiny_bert, tiny_bert_classifier, tiny_llama
from transformers.generation.streamers import BaseStreamer

from switch_adapter import (
    AutoSwitchConfig,
    AutoSwitchModel,
    FlexSwitchConfig,
    TSwitchConfig,
    convert_lora,
    flexswitch,
    from_finetuned,
)
from switch_adapter.autoswitch import (
    AdapterMismatchError,
    BundleError,
    DuplicateTaskError,
    EmptyQuerySetError,
    FeatureMismatchError,
    InputMismatchError,
    execute,
    features,
    kernels,
    knn,
    streamed,
    tables,
)
from switch_adapter.autoswitch.features import FeatureExtractor, FeatureSpec, base_fingerprint, find_layer_stack
from switch_adapter.autoswitch.tables import NormGroups

TASKS = ("alpha", "beta", "gamma")
ATOL = 1e-5


def task_ids(task: int, count: int, length: int = 10, seed: int = 0) -> torch.Tensor:
    """Token ids of task ``task``: drawn from its own range ``[10 + 10 t, 15 + 10 t)``."""
    generator = torch.Generator().manual_seed(1000 * task + seed)
    return torch.randint(10 + 10 * task, 15 + 10 * task, (count, length), generator=generator)


def query_sets(count: int = 24) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {"input_ids": task_ids(t, count)} for t, name in enumerate(TASKS)}


def _save_switches(make_base, folder, make_tuned=None, config=None) -> dict[str, str]:
    paths = {}
    for t, name in enumerate(TASKS):
        base = make_base()
        tuned = make_tuned(t) if make_tuned else finetune_copy(base, seed=t + 1, noise=0.05)
        model = from_finetuned(base, tuned, config or TSwitchConfig(density=0.3), progress=False)
        model.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


@pytest.fixture(scope="module")
def bert_switches(tmp_path_factory):
    return _save_switches(tiny_bert, tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama_switches(tmp_path_factory):
    return _save_switches(tiny_llama, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def classifier_switches(tmp_path_factory):
    """Sequence-classification switches whose heads have 2, 3 and 4 labels."""

    def tuned(t):
        return finetune_copy(tiny_bert_classifier(num_labels=2 + t), seed=t + 1, noise=0.05)

    config = TSwitchConfig(density=0.3, task_type="SEQ_CLS", modules_to_save=["classifier"])
    return _save_switches(lambda: tiny_bert_classifier(num_labels=2), tmp_path_factory.mktemp("cls"), tuned, config)


def make_router(make_base, switches, **config) -> AutoSwitchModel:
    """A router over the synthetic tasks; the plain Euclidean metric unless ``metric`` is given (the execution
    tests build soft compositions from its geometry)."""
    config.setdefault("metric", "euclidean")
    if config.get("execution") in ("compose", "delta"):  # the composed-parameter paths: keep what they build
        config.setdefault("cache_budget_bytes", 1 << 30)
    return AutoSwitchModel.from_pretrained(
        make_base(), adapters=switches, query_sets=query_sets(), config=AutoSwitchConfig(**config), progress=False
    )


def merged_models(make_base, switches) -> dict[str, torch.nn.Module]:
    """Each switch merged into its own copy of the base model (plain PEFT, no router code)."""
    return {
        name: PeftModel.from_pretrained(make_base(), path).merge_and_unload().eval() for name, path in switches.items()
    }


def reference_model(base: torch.nn.Module, merged: dict, weights: dict[str, float], head: str | None):
    """``base + sum_t w_t * (merged_t - base)``, with task ``head``'s classifier (or the base's)."""
    model = copy.deepcopy(base).eval()
    base_state = base.state_dict()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("classifier."):
                continue
            for task, weight in weights.items():
                param.add_(weight * (merged[task].state_dict()[name] - base_state[name]))
        if head is not None and hasattr(model, "classifier"):
            model.classifier = copy.deepcopy(merged[head].classifier)
    return model


def mixed_batch(length: int = 10, seed: int = 5) -> dict[str, torch.Tensor]:
    """Two samples per task, interleaved, right-padded to different lengths."""
    rows = [task_ids(t, 1, length, seed=seed + i)[0] for i in range(2) for t in range(3)]
    mask = torch.ones(len(rows), length, dtype=torch.long)
    for i in range(len(rows)):
        mask[i, length - (i % 3) :] = 0
    ids = torch.stack(rows) * mask
    return {"input_ids": ids, "attention_mask": mask}


# -- config, features, knn ---------------------------------------------------------------------------------


def test_config_json_round_trip_and_validation():
    config = AutoSwitchConfig(k=5, metric="cosine", mode="top1", feature_layer=-1, pooling="last", weight_step=0.25)
    assert AutoSwitchConfig.from_json_string(config.to_json_string()) == config
    assert config.resolve_feature_layer(6) == 6 and AutoSwitchConfig(feature_layer=0).resolve_feature_layer(6) == 0
    assert AutoSwitchConfig().resolve_feature_layer(6) == 1  # default depth 1/6
    assert AutoSwitchConfig().resolve_feature_layer(30) == 5 and AutoSwitchConfig().resolve_feature_layer(2) == 1
    with pytest.raises(ValueError, match="metric must be one of"):
        AutoSwitchConfig(metric="manhattan")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        AutoSwitchConfig(k=0)
    with pytest.raises(ValueError, match="out of range"):
        AutoSwitchConfig(feature_layer=9).resolve_feature_layer(6)
    with pytest.raises(ValueError, match="Unknown AutoSwitchConfig field"):
        AutoSwitchConfig.from_dict({"k": 3, "colour": "red"})
    for field, value in (("seed", "0"), ("ood_fallback", "yes"), ("text_column", 3)):
        with pytest.raises(ValueError, match=f"AutoSwitchConfig.{field} must be"):
            AutoSwitchConfig(**{field: value})


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_early_stopped_features_equal_hidden_states(make):
    model = make()
    batch = {"input_ids": task_ids(0, 3), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    layers = len(find_layer_stack(model))
    for layer in range(layers + 1):
        spec = FeatureSpec(layer, "mean", layers, 32, base_fingerprint(model))
        torch.testing.assert_close(FeatureExtractor(model, spec)(batch), hidden[layer].mean(1), rtol=1e-5, atol=1e-5)
    # the model is left without hooks: a plain forward still runs every layer
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, output_hidden_states=True).hidden_states[-1], hidden[-1])


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_features_are_padding_aware_left_and_right(pooling):
    model = tiny_llama()
    spec = FeatureSpec(1, pooling, 2, 32, base_fingerprint(model))
    extractor = FeatureExtractor(model, spec)
    ids = task_ids(1, 1, 6)
    alone = extractor({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    left_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(extractor({"input_ids": left, "attention_mask": left_mask}), alone, atol=1e-5, rtol=1e-5)
    right_mask = left_mask.flip(1)
    torch.testing.assert_close(
        extractor({"input_ids": right, "attention_mask": right_mask}), alone, atol=1e-5, rtol=1e-5
    )


def test_knn_weights_top_task_ties_and_rounding():
    neighbors = torch.tensor([[1, 0, 0, 1], [2, 2, 2, 2], [0, 1, 2, 2]])
    weights = knn.task_weights(neighbors, 3)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5, 0], [0, 0, 1.0], [0.25, 0.25, 0.5]]))
    assert knn.top_tasks(weights, neighbors).tolist() == [1, 2, 2]  # tie 0/1: the nearest neighbour's task wins
    rounded = knn.round_weights(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3]]), 0.5)
    torch.testing.assert_close(rounded, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]))
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    assert knn.calibrate_radius(bank, "euclidean", 1.0, 1.0) == pytest.approx(2.0)
    assert knn.calibrate_radius(bank[:1], "euclidean", 1.0, 1.0) == float("inf")


def test_add_weighted_deltas_matches_dense_deltas():
    base = tiny_bert()
    model = from_finetuned(
        base, finetune_copy(base, seed=1), TSwitchConfig(density=0.3), adapter_name="a", progress=False
    )
    model = from_finetuned(model, finetune_copy(tiny_bert(), seed=2), TSwitchConfig(density=0.3), adapter_name="b",
                           progress=False)  # fmt: skip
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    weight = layer.get_base_layer().weight
    composed = layer.add_weighted_deltas("weight", weight, {"a": 0.3, "b": 0.7})
    expected = weight + 0.3 * layer.get_delta("a", "weight") + 0.7 * layer.get_delta("b", "weight")
    torch.testing.assert_close(composed, expected)
    assert composed.data_ptr() != weight.data_ptr() and not composed.requires_grad
    assert layer.add_weighted_deltas("weight", weight, {"a": 0.0}) is None


# -- routing -----------------------------------------------------------------------------------------------


def test_route_picks_the_task_of_separable_inputs_and_flags_ood(bert_switches):
    router = make_router(tiny_bert, bert_switches, mode="top1")
    batch = torch.cat([task_ids(t, 2, seed=7) for t in range(3)] + [torch.full((1, 10), 95)])
    routing = router.route(batch)
    assert routing.top_task == ["alpha", "alpha", "beta", "beta", "gamma", "gamma", None]
    assert routing.ood.tolist() == [False] * 6 + [True]
    assert routing.weights[-1].sum() == 0 and routing.weights[:6].sum(1).tolist() == [1.0] * 6
    assert routing.distances.shape == (7, 10) and bool((routing.distances[:, :-1] <= routing.distances[:, 1:]).all())
    assert [g.indices for g in routing.groups()] == [[0, 1], [2, 3], [4, 5], [6]]
    assert routing.to_list()[-1]["ood"] and routing.to_list()[0]["weights"] == {"alpha": 1.0}

    no_fallback = make_router(tiny_bert, bert_switches, mode="top1", ood_fallback=False)
    routed = no_fallback.route(batch)
    assert routed.ood[-1] and routed.top_task[-1] is not None  # flagged, but routed anyway


# -- execution: forward --------------------------------------------------------------------------------------


def _assert_samples_match_reference(router, batch, make_base, switches, output_of):
    base = make_base()
    merged = merged_models(make_base, switches)
    outputs, routing = router(**batch, return_routing=True)
    assert len(routing.groups()) > 1
    for i in range(len(routing)):
        length = int(batch["attention_mask"][i].sum())
        single = {key: value[i : i + 1, :length] for key, value in batch.items()}
        reference = reference_model(base, merged, routing.composition(i), routing.top_task[i])
        with torch.no_grad():
            expected = output_of(reference(**single))[0]
        got = output_of(outputs)[i]
        if got.dim() >= 2 and got.shape[0] != expected.shape[0]:
            got = got[:length]
        torch.testing.assert_close(got[..., : expected.shape[-1]], expected, rtol=ATOL, atol=ATOL)
    return outputs, routing


def _save_flexswitches(make_base, folder) -> dict[str, str]:
    """FlexSwitch adapters with 2- and 4-bit units (learned for a few steps on each task's inputs)."""
    paths = {}
    for t, name in enumerate(TASKS):
        base = make_base()
        tuned = finetune_copy(base, seed=t + 1, noise=0.05)
        config = FlexSwitchConfig(budget="60%", bit_widths=(2, 4), steps=3, seed=t)
        flexswitch(base, tuned, {"input_ids": task_ids(t, 8)}, config, progress=False).save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


@pytest.fixture(scope="module")
def flex_bert_switches(tmp_path_factory):
    return _save_flexswitches(tiny_bert, tmp_path_factory.mktemp("flex"))


@pytest.mark.parametrize("execution", ["stream", "compose", "delta"])
def test_mixed_batch_forward_with_multibit_flexswitch_adapters(flex_bert_switches, execution):
    router = make_router(tiny_bert, flex_bert_switches, mode="soft", k=6, feature_layer=0, execution=execution)
    batch = mixed_batch()
    _assert_samples_match_reference(router, batch, tiny_bert, flex_bert_switches, lambda out: out.last_hidden_state)
    bits = {
        entry["value_bits"]
        for path in flex_bert_switches.values()
        for params in TSwitchConfig.from_pretrained(path).unit_layout.values()
        for entry in params.values()
    }
    assert bits - {1} and bits <= {2, 4}


@pytest.mark.parametrize("execution", ["stream", "compose", "delta"])
def test_mixed_batch_forward_is_exact_per_sample_soft(bert_switches, execution):
    router = make_router(tiny_bert, bert_switches, mode="soft", k=6, feature_layer=0, execution=execution)
    batch = mixed_batch()
    batch["input_ids"][0, :5] = task_ids(1, 1, 5)[0]  # samples between two tasks: genuinely soft compositions
    batch["input_ids"][4, :4] = task_ids(2, 1, 4)[0]
    outputs, routing = _assert_samples_match_reference(
        router, batch, tiny_bert, bert_switches, lambda out: out.last_hidden_state
    )
    assert sum(len(routing.composition(i)) > 1 for i in range(len(routing))) >= 2
    info = router.cache_info()
    if execution == "stream":  # no composed parameters outlive the call
        assert info.entries == 0 and router.memory_footprint()["cache"] == 0
        return
    distinct = {g.key[0] for g in routing.groups()}
    built = len(distinct) if execution == "compose" else len({t for key in distinct for t, _ in key})
    assert info.entries == built and info.misses == info.entries
    router(**batch)  # unchanged compositions cost nothing: all hits
    assert router.cache_info().hits == info.entries and router.cache_info().misses == info.misses


@pytest.fixture(params=["numba", "torch"])
def kernel_backend(request, monkeypatch):
    """The streamed execution's kernels: numba (when installed) or forced torch ops."""
    if request.param == "numba":
        pytest.importorskip("numba", reason="pip install numba (the kernels' fast path)")
    else:
        monkeypatch.setenv("SWITCH_ADAPTER_KERNELS", "torch")
    kernels._numba_kernels.cache_clear()
    yield request.param
    kernels._numba_kernels.cache_clear()


@pytest.mark.parametrize("path", ["entry-wise", "composed", "both"])
def test_streamed_paths_are_exact_per_sample(bert_switches, kernel_backend, path, monkeypatch):
    """Every row entry-wise (decoding-like), every group composed in a scratch buffer (prefill-like), or one big group
    composed and the small ones entry-wise in the same call: each sample still equals its own model."""
    router = make_router(tiny_bert, bert_switches, mode="soft", k=6, feature_layer=0)
    batch = {k: v[[0, 3, 1, 4, 2, 5, 0, 3]] for k, v in mixed_batch().items()}  # 4 x alpha, 2 x beta, 2 x gamma
    batch["input_ids"][2, :5] = task_ids(2, 1, 5)[0]  # a genuinely soft sample
    density = 0.3  # the switches' density (see _save_switches)
    limit = {"entry-wise": 1e9, "composed": 0.0, "both": 30 * density}[path]  # 10 tokens: 20 rows light, 40 heavy
    monkeypatch.setattr(streamed, "LIGHT_ENTRIES_PER_WEIGHT", limit)
    monkeypatch.setattr(streamed, "LIGHT_ENTRIES_PER_WEIGHT_TORCH", limit)
    _assert_samples_match_reference(router, batch, tiny_bert, bert_switches, lambda out: out.last_hidden_state)
    assert router.memory_footprint()["cache"] == 0


class _OffsetRMSNorm(torch.nn.Module):
    """Gemma's RMSNorm: scales by ``1 + weight`` (a norm whose output is not zero for a zero weight)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (normalised * (1.0 + self.weight.float())).to(x.dtype)


@pytest.mark.parametrize(
    "make_norm", [lambda: torch.nn.LayerNorm(16), lambda: torch.nn.RMSNorm(16), lambda: _OffsetRMSNorm(16)]
)
@pytest.mark.parametrize("shape", [(5, 7, 16), (35, 16), (1, 7, 16)])
def test_channel_norm_runs_every_group_in_one_or_two_calls(make_norm, shape):
    """One call of a channel norm (two for a norm with an offset, Gemma's ``1 + w``) serves every group: each row
    equals the norm run with its own group's parameters (3-D, flattened rows, and a broadcast row)."""
    torch.manual_seed(0)
    norm = make_norm()
    plan = streamed.StreamPlan(("a", "b", "c"), [{"a": 1.0}, {"b": 0.5, "c": 0.5}, {"c": 1.0}], [0, 1, 2, 1, 0])
    targets = []
    for _ in plan.groups:
        params = {"weight": (norm.weight + torch.randn(16) * 0.2).detach()}
        if getattr(norm, "bias", None) is not None:
            params["bias"] = (norm.bias + torch.randn(16) * 0.2).detach()
        targets.append(params)
    calls = []
    norm.register_forward_hook(lambda *_: calls.append(1))  # before the stand-in: its probe must not show here
    grouped = execute._GroupedCall(norm, [(norm, params) for params in targets], plan.rows)
    channel = streamed._ChannelNormCall(norm, NormGroups(targets).stacks(norm), plan, grouped)
    x = torch.randn(shape)
    if shape[0] == 1:  # a broadcast row follows a call of the batch's rows
        plan.rows.last_rows = 5
    with torch.no_grad():
        got = channel(x)
        assert len(calls) == (2 if isinstance(norm, _OffsetRMSNorm) else 1)
        expected = grouped(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(norm._parameters["weight"], torch.nn.Parameter)  # the layer's own parameters are back


def test_scales_channels_only_for_last_dimension_norms():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert streamed.scales_channels(torch.nn.LayerNorm(8))
    assert streamed.scales_channels(LlamaRMSNorm(8))
    assert streamed.scales_channels(_OffsetRMSNorm(8))
    assert not streamed.scales_channels(torch.nn.LayerNorm((4, 8)))
    assert not streamed.scales_channels(torch.nn.GroupNorm(2, 8))
    assert not streamed.scales_channels(torch.nn.BatchNorm1d(8))
    assert not streamed.scales_channels(torch.nn.LayerNorm(8, elementwise_affine=False))


@pytest.mark.parametrize("path", ["entry-wise", "composed"])
def test_streamed_generate_paths_equal_single_adapter_runs(llama_switches, kernel_backend, path, monkeypatch):
    limit = 1e9 if path == "entry-wise" else 0.0
    monkeypatch.setattr(streamed, "LIGHT_ENTRIES_PER_WEIGHT", limit)
    monkeypatch.setattr(streamed, "LIGHT_ENTRIES_PER_WEIGHT_TORCH", limit)
    router = make_router(tiny_llama, llama_switches, mode="top1")
    prompts = _prompts()
    settings = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    sequences = router.generate(**prompts, **settings)
    for t, name in enumerate(TASKS):
        rows = [t, t + 3]
        single = PeftModel.from_pretrained(tiny_llama(), llama_switches[name]).eval()
        with torch.no_grad():
            expected = single.generate(**{k: v[rows] for k, v in prompts.items()}, **settings)
        assert torch.equal(sequences[rows], expected), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["entry-wise", "composed"])
def test_streamed_execution_on_cuda_equals_cpu(bert_switches, llama_switches, path, monkeypatch):
    limit = 1e9 if path == "entry-wise" else 0.0
    monkeypatch.setattr(streamed, "LIGHT_ENTRIES_PER_WEIGHT", limit)
    monkeypatch.setattr(streamed, "LIGHT_ENTRIES_PER_WEIGHT_TORCH", limit)
    router = make_router(tiny_bert, bert_switches, mode="soft", k=6, feature_layer=0)
    batch = mixed_batch()
    expected = router(**batch).last_hidden_state
    router.to("cuda")
    got = router(**{k: v.cuda() for k, v in batch.items()}).last_hidden_state
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    llama = make_router(tiny_llama, llama_switches, mode="top1")
    settings = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    expected = llama.generate(**_prompts(), **settings)
    llama.to("cuda")
    assert torch.equal(llama.generate(**{k: v.cuda() for k, v in _prompts().items()}, **settings).cpu(), expected)


@pytest.mark.parametrize("path", ["entry-wise", "composed"])
def test_streamed_execution_in_bfloat16(llama_switches, path, monkeypatch):
    limit = 1e9 if path == "entry-wise" else 0.0
    monkeypatch.setattr(streamed, "LIGHT_ENTRIES_PER_WEIGHT", limit)
    monkeypatch.setattr(streamed, "LIGHT_ENTRIES_PER_WEIGHT_TORCH", limit)
    router = make_router(tiny_llama, llama_switches, mode="top1").to(torch.bfloat16)
    prompts = _prompts()
    with torch.no_grad():
        logits = router(**prompts).logits
        for t, name in enumerate(TASKS):
            single = PeftModel.from_pretrained(tiny_llama(), llama_switches[name]).eval().to(torch.bfloat16)
            rows = [t, t + 3]
            expected = single(**{k: v[rows] for k, v in prompts.items()}).logits
            torch.testing.assert_close(logits[rows].float(), expected.float(), rtol=0.05, atol=0.05)
        assert router.generate(**prompts, max_new_tokens=3, pad_token_id=0).shape == (6, 9)


def test_single_composition_is_added_in_place_and_restored_exactly(llama_switches, single_adapter_models):
    router = make_router(tiny_llama, llama_switches, mode="top1")
    before = {name: value.clone() for name, value in router.model.state_dict().items()}
    prompts = {k: v[[1, 4]] for k, v in _prompts().items()}  # both beta: one composition for the call
    settings = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    with torch.no_grad():
        sequences = router.generate(**prompts, **settings)
        expected = single_adapter_models["beta"].generate(**prompts, **settings)
        logits = router(**prompts).logits
        torch.testing.assert_close(logits, single_adapter_models["beta"](**prompts).logits, rtol=ATOL, atol=ATOL)
    assert torch.equal(sequences, expected)
    assert router.memory_footprint()["cache"] == 0
    after = router.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # base weights restored bit for bit
    with torch.no_grad(), pytest.raises(Exception):  # noqa: B017 - any failure inside the model's call
        router(**prompts, position_ids=torch.zeros(5, 5, dtype=torch.long))  # wrong shape: the model raises
    after = router.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # restored when the call raises too


def test_mixed_batch_forward_selects_heads_with_different_label_counts(classifier_switches):
    make = lambda: tiny_bert_classifier(num_labels=2)  # noqa: E731
    router = make_router(make, classifier_switches, mode="top1")
    batch = mixed_batch()
    batch["input_ids"][5] = 97  # an out-of-distribution sample: base model and base head
    outputs, routing = _assert_samples_match_reference(router, batch, make, classifier_switches, lambda o: o.logits)
    assert routing.num_labels == [2, 3, 4, 2, 3, 2] and routing.top_task[5] is None
    assert outputs.logits.shape == (6, 4)
    for i, count in enumerate(routing.num_labels):
        assert torch.isfinite(outputs.logits[i, :count]).all() and torch.isinf(outputs.logits[i, count:]).all()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_mixed_batch_forward_is_exact_for_a_decoder_lm(llama_switches, tmp_path, tied):
    make = (lambda: tiny_llama(tie_word_embeddings=True)) if tied else tiny_llama
    switches = _save_switches(make, tmp_path) if tied else llama_switches
    router = make_router(make, switches, mode="soft", k=6, feature_layer=0, execution="delta")
    batch = mixed_batch()
    batch["input_ids"][1, :4] = task_ids(0, 1, 4)[0]
    _assert_samples_match_reference(router, batch, make, switches, lambda out: out.logits)


def test_delta_execution_with_layers_a_task_left_unchanged(tmp_path):
    """A targeted layer whose task vector is zero for a task has no switch for it: the sparse-delta path skips it."""

    def tuned(t):
        model = tiny_llama()
        with torch.no_grad():  # only the first block's query projection changes
            model.model.layers[0].self_attn.q_proj.weight.add_(0.05 * (t + 1))
        return model

    switches = _save_switches(tiny_llama, tmp_path, tuned)
    router = make_router(tiny_llama, switches, mode="top1", execution="delta")
    _assert_samples_match_reference(router, mixed_batch(), tiny_llama, switches, lambda out: out.logits)
    prompts = _prompts()
    settings = dict(max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
    sequences = router.generate(**prompts, **settings)
    single = PeftModel.from_pretrained(tiny_llama(), switches["beta"]).eval()
    with torch.no_grad():
        expected = single.generate(**{k: v[[1, 4]] for k, v in prompts.items()}, **settings)
    assert torch.equal(sequences[[1, 4]], expected)


def test_mixed_batch_forward_gpt2_conv1d_and_broadcast_position_embeddings(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def make():
        torch.manual_seed(0)
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, pad_token_id=0)
        return GPT2LMHeadModel(config).eval()

    switches = _save_switches(make, tmp_path)
    for execution in ("compose", "delta"):
        router = make_router(make, switches, mode="top1", execution=execution)
        _assert_samples_match_reference(router, mixed_batch(), make, switches, lambda out: out.logits)


def test_single_task_batch_and_batch_mode(bert_switches):
    router = make_router(tiny_bert, bert_switches, mode="batch")
    batch = mixed_batch()
    outputs, routing = router(**batch, return_routing=True)
    assert len(routing.groups()) == 1 and routing.weights[0].tolist() == pytest.approx([1 / 3] * 3, abs=0.05)
    single = {key: value[[0, 3]] for key, value in batch.items()}  # both alpha samples
    top1 = make_router(tiny_bert, bert_switches, mode="top1")
    out, single_routing = top1(**single, return_routing=True)
    assert [g.weights for g in single_routing.groups()] == [{"alpha": 1.0}]
    expected = PeftModel.from_pretrained(tiny_bert(), bert_switches["alpha"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(out.last_hidden_state, expected(**single).last_hidden_state, rtol=ATOL, atol=ATOL)


# -- execution: generate ---------------------------------------------------------------------------------------


def _prompts(length: int = 6) -> dict[str, torch.Tensor]:
    """Left-padded prompts of the three tasks, interleaved (padding lengths 0..2)."""
    rows = [task_ids(t, 1, length, seed=20 + i)[0] for i in range(2) for t in range(3)]
    mask = torch.ones(len(rows), length, dtype=torch.long)
    for i in range(len(rows)):
        mask[i, : i % 3] = 0
    return {"input_ids": torch.stack(rows) * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def llama_router(llama_switches):
    return make_router(tiny_llama, llama_switches, mode="top1")


@pytest.fixture(scope="module")
def single_adapter_models(llama_switches):
    return {name: PeftModel.from_pretrained(tiny_llama(), path).eval() for name, path in llama_switches.items()}


@pytest.mark.parametrize(
    "generation",
    [
        dict(do_sample=False),
        dict(do_sample=False, use_cache=False),
        dict(do_sample=False, num_beams=2, num_return_sequences=2),
    ],
    ids=["greedy", "greedy-no-cache", "beam-search"],
)
def test_generate_mixed_batch_equals_single_adapter_runs(llama_router, single_adapter_models, generation):
    prompts = _prompts()  # 3 tasks interleaved: one decoding loop with sparse deltas (rows regrouped by task)
    settings = dict(max_new_tokens=5, min_new_tokens=5, pad_token_id=0, **generation)
    out, routing = llama_router.generate(**prompts, return_routing=True, return_dict_in_generate=True, **settings)
    sequences = out.sequences
    assert routing.top_task == list(TASKS) * 2
    per_prompt = generation.get("num_return_sequences", 1)
    assert sequences.shape == (6 * per_prompt, 6 + 5)
    for t, name in enumerate(TASKS):
        rows = [t, t + 3]
        with torch.no_grad():
            expected = single_adapter_models[name].generate(**{k: v[rows] for k, v in prompts.items()}, **settings)
        got = torch.cat([sequences[r * per_prompt : (r + 1) * per_prompt] for r in rows])
        assert torch.equal(got, expected), name
    if "num_beams" in generation:  # beam indices point at beams of the same prompt, in input order
        beams = out.beam_indices[:, :5]
        owner = torch.arange(6).repeat_interleave(per_prompt).unsqueeze(1)
        assert bool(((beams // 2 == owner) | (beams < 0)).all())


def test_generate_two_tasks_with_composed_weights_per_group(llama_router, single_adapter_models):
    prompts = {k: v[[0, 1, 3, 4]] for k, v in _prompts().items()}  # alpha, beta, alpha, beta
    settings = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    sequences = llama_router.generate(**prompts, **settings)
    for t, name in enumerate(TASKS[:2]):
        rows = [t, t + 2]
        with torch.no_grad():
            expected = single_adapter_models[name].generate(**{k: v[rows] for k, v in prompts.items()}, **settings)
        assert torch.equal(sequences[rows], expected), name


@pytest.fixture(scope="module")
def flex_llama_switches(tmp_path_factory):
    return _save_flexswitches(tiny_llama, tmp_path_factory.mktemp("flex-llama"))


@pytest.mark.parametrize("execution", ["stream", "compose", "delta"])
def test_generate_with_multibit_flexswitch_adapters_equals_single_adapter_runs(flex_llama_switches, execution):
    router = make_router(tiny_llama, flex_llama_switches, mode="top1", execution=execution)
    settings = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    for rows_of_batch in ([0, 1, 2, 3, 4, 5], [0, 1, 3, 4]):  # 3 tasks; 2 tasks (grouped compositions in "auto")
        prompts = {k: v[rows_of_batch] for k, v in _prompts().items()}
        sequences, routing = router.generate(**prompts, return_routing=True, **settings)
        for name in dict.fromkeys(routing.top_task):
            rows = [i for i, top in enumerate(routing.top_task) if top == name]
            single = PeftModel.from_pretrained(tiny_llama(), flex_llama_switches[name]).eval()
            with torch.no_grad():
                expected = single.generate(**{k: v[rows] for k, v in prompts.items()}, **settings)
            assert torch.equal(sequences[rows], expected), (name, rows_of_batch)


def _save_low_rank_switches(make_base, folder, targets: list[str]) -> dict[str, str]:
    """Switches converted from random LoRAs in factors mode (4-bit low-rank pairs), one per task."""
    make_base().save_pretrained(folder / "base")
    paths = {}
    for t, name in enumerate(TASKS):
        torch.manual_seed(t + 1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        get_peft_model(make_base(), config).save_pretrained(folder / f"lora-{name}")
        convert_lora(folder / "base", folder / f"lora-{name}", folder / name, TSwitchConfig(density=1.0),
                     mode="factors", value_bits=4, progress=False)  # fmt: skip
        paths[name] = str(folder / name)
    return paths


@pytest.fixture(scope="module")
def low_rank_bert_switches(tmp_path_factory):
    return _save_low_rank_switches(tiny_bert, tmp_path_factory.mktemp("lr-bert"), ["word_embeddings", "query", "dense"])


@pytest.fixture(scope="module")
def low_rank_llama_switches(tmp_path_factory):
    return _save_low_rank_switches(tiny_llama, tmp_path_factory.mktemp("lr-llama"), ["q_proj", "v_proj", "down_proj"])


@pytest.mark.parametrize("execution", ["stream", "compose", "delta"])
def test_mixed_batch_forward_with_low_rank_switches(low_rank_bert_switches, kernel_backend, execution):
    """Switches converted from LoRAs (low-rank pairs on an embedding and linear layers), soft compositions."""
    router = make_router(tiny_bert, low_rank_bert_switches, mode="soft", k=6, feature_layer=0, execution=execution)
    batch = mixed_batch()
    batch["input_ids"][0, :5] = task_ids(1, 1, 5)[0]
    _assert_samples_match_reference(router, batch, tiny_bert, low_rank_bert_switches, lambda o: o.last_hidden_state)
    layer = router.model.base_model.model.encoder.layer[0].attention.self.query
    assert layer.is_low_rank("alpha") and not layer._has_unit("alpha", "weight")


@pytest.mark.parametrize("execution", ["stream", "delta"])
def test_low_rank_embedding_reaches_a_tied_output_layer(tmp_path, execution):
    """A low-rank pair on the embedding of a model with tied output embeddings: the output layer reads the same
    factors, as merging the switch changes both."""
    make = lambda: tiny_llama(tie_word_embeddings=True)  # noqa: E731
    switches = _save_low_rank_switches(make, tmp_path, ["embed_tokens", "q_proj"])
    router = make_router(make, switches, mode="soft", k=6, feature_layer=0, execution=execution)
    batch = mixed_batch()
    batch["input_ids"][1, :4] = task_ids(0, 1, 4)[0]
    _assert_samples_match_reference(router, batch, make, switches, lambda out: out.logits)
    assert router.model.base_model.model.model.embed_tokens.is_low_rank("alpha")


def test_low_rank_table_composes_and_refuses_in_place(low_rank_bert_switches, kernel_backend):
    """A table keeps a low-rank pair as its decoded factors: composing a group adds ``w * left @ right`` to the
    weight, row deltas equal ``x @ change^T``, and the in-place path (which restores saved entries) refuses it."""
    router = make_router(tiny_bert, low_rank_bert_switches, feature_layer=0)
    layer = router.model.base_model.model.encoder.layer[0].attention.self.query
    table = tables.build_table(layer, TASKS)
    assert table.has_low_rank and table.count(0) == 0 and table.low_rank_tasks([0, 1, 2]) == [0, 1, 2]
    weight = layer.get_base_layer().weight.detach()
    change = 0.5 * layer.get_delta("alpha", "weight") + layer.get_delta("gamma", "weight")
    composed = weight.clone()
    kernels.scatter_deltas(composed.view(-1), table, [(0, 0.5), (2, 1.0)])
    torch.testing.assert_close(composed, weight + change, rtol=1e-6, atol=1e-6)
    x = torch.randn(6, weight.shape[1])
    y = torch.zeros(6, weight.shape[0])
    assignment = kernels.assignment_for_rows(np.array([0, 0, 1, 1, 1, 0]), [[(0, 0.5), (2, 1.0)], [(1, 1.0)]])
    kernels.add_row_deltas(y, x, table, assignment, tables.LINEAR)
    expected = torch.cat([x[[0, 1, 5]] @ change.T, x[[2, 3, 4]] @ layer.get_delta("beta", "weight").T])
    torch.testing.assert_close(y[[0, 1, 5, 2, 3, 4]], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="low-rank"):
        kernels.add_in_place(weight.clone().view(-1), table, [(1, 1.0)])


def _low_rank_table(rows: int, cols: int, ranks: list[int | None]) -> tables.EntryTable:
    """A table of low-rank pairs only (random factors; None: a task without a pair in this layer)."""
    torch.manual_seed(0)
    tasks = len(ranks)
    return tables.EntryTable(
        tasks=tuple(f"t{i}" for i in range(tasks)), keys=(), columns=torch.zeros(0, dtype=torch.uint16),
        multipliers=torch.zeros(0, dtype=torch.int8), offsets=torch.zeros(tasks + 1, dtype=torch.int64),
        row_ptr=torch.zeros(tasks, rows + 1, dtype=torch.int32), scales=torch.zeros(tasks, 1),
        chunks=torch.full((tasks,), rows * cols), rows=rows, cols=cols,
        low_rank=[None if r is None else (torch.randn(rows, r), torch.randn(r, cols)) for r in ranks],
    )  # fmt: skip


@pytest.mark.parametrize("kind", [tables.LINEAR, tables.TRANSPOSED])
@pytest.mark.parametrize(
    ("row_sample", "compositions"),
    [
        ([0, 0, 1, 1, 2, 2], [[(0, 1.0)], [(1, 1.0)], [(3, 1.0)]]),  # every pair used: the stacked matmuls
        ([0, 1, 0, 1, 1, 0], [[(0, 0.25), (3, 0.75)], [(1, 1.0)]]),  # soft weights, rows of a task apart
        ([0, 0, 0, 1, 1, 1], [[(1, 1.0)], [(2, 1.0)]]),  # one pair used (the other task has none): per task
        ([0, 0, 1, 1, 1, 1], [[(0, 0.5)], []]),  # one pair and rows without a task
    ],
)
def test_low_rank_rows_equal_the_dense_change_on_either_path(kind, row_sample, compositions):
    table = _low_rank_table(5, 7, [2, 3, None, 4])
    changes = [None if pair is None else pair[0] @ pair[1] for pair in table.low_rank]  # stored [rows, cols]
    inputs = 7 if kind == tables.LINEAR else 5  # stored [out, in] (linear) or [in, out] (transposed)
    x, y = torch.randn(6, inputs), torch.randn(6, 12 - inputs)
    expected = y.clone()
    for row, sample in enumerate(row_sample):
        for task, weight in compositions[sample]:
            if changes[task] is None:  # no pair in this layer: no change
                continue
            change = changes[task] if kind == tables.TRANSPOSED else changes[task].T
            expected[row] += weight * (x[row] @ change)
    assignment = kernels.assignment_for_rows(np.array(row_sample), compositions)
    kernels.add_row_deltas(y, x, table, assignment, kind)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    used = {t for sample in compositions for t, _ in sample if table.low_rank[t] is not None}
    assert (assignment.rank_weights(table.rank_blocks, y.device) is not None) == (len(used) >= 2)
    assert table.stacked_left.shape == (5, 9) and table.low_rank[3][0].data_ptr() != table.low_rank[0][0].data_ptr()


@pytest.mark.parametrize("kind", [tables.LINEAR, tables.TRANSPOSED])
@pytest.mark.parametrize(
    ("rows_per_sample", "sliced"),
    [
        (100, True),  # a prefill of a batch sorted by task: per-task matmuls on slices
        (20, False),  # too few rows per task: the stacked pairs
    ],
)
def test_many_consecutive_rows_per_task_run_on_slices_with_the_same_result(kind, rows_per_sample, sliced):
    table = _low_rank_table(5, 7, [2, 3, None, 4])
    changes = [None if pair is None else pair[0] @ pair[1] for pair in table.low_rank]
    compositions = [[(0, 1.0)], [(1, 0.5)], [(3, 1.0)]]
    row_sample = np.repeat(np.arange(3), rows_per_sample)
    inputs = 7 if kind == tables.LINEAR else 5
    x, y = torch.randn(len(row_sample), inputs), torch.randn(len(row_sample), 12 - inputs)
    expected = y.clone()
    for sample, ((task, weight),) in enumerate(compositions):
        rows = row_sample == sample
        change = changes[task] if kind == tables.TRANSPOSED else changes[task].T
        expected[rows] += weight * (x[rows] @ change)
    assignment = kernels.assignment_for_rows(row_sample, compositions)
    assert (assignment.rank_weights(table.rank_blocks, y.device) is None) == sliced
    kernels.add_row_deltas(y, x, table, assignment, kind)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    shuffled = kernels.assignment_for_rows(np.random.default_rng(0).permutation(row_sample), compositions)
    assert shuffled.rank_weights(table.rank_blocks, y.device) is not None  # rows of a task apart: stacked


@pytest.mark.parametrize("execution", ["stream", "compose", "delta"])
def test_generate_with_low_rank_switches_equals_single_adapter_runs(low_rank_llama_switches, execution):
    router = make_router(tiny_llama, low_rank_llama_switches, mode="top1", execution=execution)
    settings = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    before = {name: value.clone() for name, value in router.model.state_dict().items()}
    # 3 tasks; one task (added in place where it can be); 3 tasks with over 100 prompt tokens each, whose prefill
    # runs the low-rank pairs per task on row slices (the batch is sorted by task)
    for rows_of_batch, length in (([0, 1, 2, 3, 4, 5], 6), ([1, 4], 6), ([0, 1, 2, 3, 4, 5], 64)):
        prompts = {k: v[rows_of_batch] for k, v in _prompts(length).items()}
        sequences, routing = router.generate(**prompts, return_routing=True, **settings)
        for name in dict.fromkeys(routing.top_task):
            rows = [i for i, top in enumerate(routing.top_task) if top == name]
            single = PeftModel.from_pretrained(tiny_llama(), low_rank_llama_switches[name]).eval()
            with torch.no_grad():
                expected = single.generate(**{k: v[rows] for k, v in prompts.items()}, **settings)
            assert torch.equal(sequences[rows], expected), (name, rows_of_batch)
    after = router.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # the base weights are untouched


def test_generate_sampling_single_task_seeded_and_mixed_logits(llama_router, single_adapter_models):
    prompts = _prompts()
    settings = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0, do_sample=True, top_k=20)
    beta = {k: v[[1, 4]] for k, v in prompts.items()}
    torch.manual_seed(3)
    sampled = llama_router.generate(**beta, **settings)
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(sampled, single_adapter_models["beta"].generate(**beta, **settings))

    # Mixed batch: one decoding loop samples all rows jointly, so check each row's distribution instead: the logits
    # of every step equal its own adapter's logits for the same prefix.
    out = llama_router.generate(**prompts, return_dict_in_generate=True, output_logits=True, **settings)
    steps = torch.stack(out.logits, dim=1)  # [batch, new tokens, vocab]
    full_mask = torch.cat([prompts["attention_mask"], torch.ones(6, 4, dtype=torch.long)], 1)
    for i in range(6):
        model = single_adapter_models[TASKS[i % 3]]
        with torch.no_grad():
            logits = model(input_ids=out.sequences[i : i + 1], attention_mask=full_mask[i : i + 1]).logits[0]
        torch.testing.assert_close(steps[i], logits[5:9], rtol=1e-4, atol=1e-4)


def test_generate_with_strings_and_a_streamer(llama_switches):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append("end")

    router = make_router(tiny_llama, llama_switches, mode="top1")
    prompt = task_ids(2, 1, 6)
    streamer = Collect()
    sequences = router.generate(prompt, max_new_tokens=3, min_new_tokens=3, pad_token_id=0, streamer=streamer)
    assert streamer.chunks[-1] == "end" and len(streamer.chunks) == 1 + 3 + 1  # prompt, 3 tokens, end
    assert torch.equal(torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]]), sequences[0, 6:])
    with pytest.raises(ValueError, match="need a tokenizer"):
        router.generate(["some text"])


# -- cache, memory, tasks, threads ------------------------------------------------------------------------------


def test_default_router_keeps_no_dense_copies_and_decodes_each_switch_once(bert_switches):
    router = make_router(tiny_bert, bert_switches, mode="top1")
    out = router(**mixed_batch()).last_hidden_state
    footprint = router.memory_footprint()
    assert footprint["cache"] == 0 and router.cache_info().entries == 0
    assert footprint["switches"] < footprint["dense_task_copies"] / 5  # packed switches, not dense copies
    tables = list(router._tables._tables.values())
    assert tables and all(t.columns.dtype == torch.uint16 and t.multipliers.dtype == torch.int8 for t in tables)
    kept = sum(t.columns.numel() for t in tables)
    layers = sum(layer.decoded_nbytes() for layer in router._slots.layers)
    assert footprint["decoded_switches"] == layers + router._tables.nbytes  # tables + norm layers' composed vectors
    ranges = sum(t.row_ptr.numel() * 4 + t.scales.numel() * 4 for t in tables)
    biases = sum(t.bias.numel() * 4 for t in tables if t.bias is not None)  # dense bias changes: one row per task
    assert sum(t.nbytes for t in tables) == 3 * kept + ranges + biases  # 3 bytes per kept entry + row ranges
    for layer in router._slots.layers:  # a layer with a table no longer holds its own decoded weight entries
        if layer.get_base_layer().weight.dim() >= 2:
            assert not any(param == "weight" for _, param in layer._sparse_cache)
    torch.testing.assert_close(out, router(**mixed_batch()).last_hidden_state)  # tables reused


def test_cache_budget_lru_and_memory(bert_switches):
    router = make_router(tiny_bert, bert_switches, mode="top1", cache_budget_bytes=1 << 30)
    router(**mixed_batch())
    assert router.cache_info().entries == 3
    footprint = router.memory_footprint()
    assert footprint["cache"] == router.cache_info().nbytes > 0
    kept = sum(p.numel() for layer in router._slots.layers for _, (p, _) in layer._sparse_cache.values())
    assert 0 < footprint["decoded_switches"] <= 5 * kept  # int32 positions + int8 signs, as allocated

    one = router.cache_info().nbytes // 3
    tight = make_router(tiny_bert, bert_switches, mode="top1", cache_budget_bytes=one)
    tight(**mixed_batch())
    assert tight.cache_info().entries == 1 and tight.cache_info().nbytes <= one
    nothing = make_router(tiny_bert, bert_switches, mode="top1", cache_budget_bytes=0)
    out = nothing(**mixed_batch()).last_hidden_state
    torch.testing.assert_close(out, router(**mixed_batch()).last_hidden_state)  # still exact, just not cached
    assert nothing.cache_info().entries == 0


def test_add_and_remove_task(bert_switches):
    router = AutoSwitchModel.from_pretrained(
        tiny_bert(),
        adapters={"alpha": bert_switches["alpha"], "beta": bert_switches["beta"]},
        query_sets={k: v for k, v in query_sets().items() if k != "gamma"},
        config=AutoSwitchConfig(mode="top1"),
        progress=False,
    )
    batch = torch.cat([task_ids(t, 1, seed=4) for t in range(3)])
    assert router.route(batch).top_task[2] != "gamma"
    router.add_task("gamma", bert_switches["gamma"], query_sets()["gamma"], progress=False)
    assert router.tasks == list(TASKS) and router.route(batch).top_task == list(TASKS)
    router(batch)
    router.remove_task("beta")
    assert router.tasks == ["alpha", "gamma"] and "beta" not in router.model.peft_config
    assert all("beta" not in dict(key[0]) for key in router._cache._entries)
    assert router.route(batch).top_task[0] == "alpha"
    with pytest.raises(DuplicateTaskError, match="already has a task 'alpha'"):
        router.add_task("alpha", bert_switches["alpha"], query_sets()["alpha"], progress=False)
    with pytest.raises(KeyError, match="No task 'beta'"):
        router.remove_task("beta")


def test_threads_routing_different_batches_match_sequential(bert_switches):
    router = make_router(tiny_bert, bert_switches, k=6, feature_layer=0)
    batches = [mixed_batch(seed=s) for s in (1, 2)]
    sequential = [router(**b).last_hidden_state for b in batches]
    results: dict[int, list] = {0: [], 1: []}

    def work(index):
        for _ in range(5):
            results[index].append(router(**batches[index]).last_hidden_state)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in (0, 1):
        for result in results[index]:
            torch.testing.assert_close(result, sequential[index], rtol=0, atol=0)


# -- bundles ------------------------------------------------------------------------------------------------------


def test_bundle_save_load_round_trip(bert_switches, tmp_path):
    router = make_router(tiny_bert, bert_switches, k=6, feature_layer=0)
    batch = mixed_batch()
    expected, routing = router(**batch, return_routing=True)
    router.save_pretrained(tmp_path / "bundle")
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == [
        "adapters",
        "autoswitch_config.json",
        "query_features.safetensors",
    ]
    loaded = AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=tiny_bert(), progress=False)
    assert loaded.tasks == router.tasks and loaded.config == router.config and loaded.radius == router.radius
    out, loaded_routing = loaded(**batch, return_routing=True)
    assert loaded_routing.top_task == routing.top_task
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    router.save_pretrained(tmp_path / "bundle")  # overwriting a bundle is allowed

    import shutil

    shutil.rmtree(tmp_path / "bundle" / "adapters" / "beta")
    with pytest.raises(BundleError, match=r"missing from it:\n  beta: adapters/beta"):
        AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=tiny_bert(), progress=False)
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=tiny_bert(hidden_size=48), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an Auto-Switch bundle"):
        router.save_pretrained(tmp_path / "other")


@pytest.fixture(scope="module")
def saved_bundle(bert_switches, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle") / "bundle"
    make_router(tiny_bert, bert_switches, k=6, feature_layer=0).save_pretrained(folder)
    return folder


def _edited(description: dict, path: list, value) -> dict:
    """A copy of ``description`` with the entry at ``path`` set to ``value`` (removed when ``value`` is ...)."""
    edited = copy.deepcopy(description)
    holder = edited
    for key in path[:-1]:
        holder = holder[key]
    if value is ...:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return edited


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["tasks"], ..., "'tasks' is missing"),
        (["features"], ..., "'features' is missing"),
        (["base_model", "fingerprint"], ..., "no 'fingerprint'"),
        (["format_version"], "v4", "'format_version' must be a whole number"),
        (["tasks", 0, "name"], ..., "task 0: must be an object with a non-empty 'name'"),
        (["tasks", 1, "name"], "alpha", "task 'alpha' is listed twice"),
        (["tasks", 0, "adapter", "path"], "../../elsewhere", "leaves the bundle"),
        (["tasks", 0, "adapter", "path"], "/etc", "leaves the bundle"),
        (["tasks", 0, "adapter"], {"revision": "main"}, "neither a 'path' inside the bundle nor a Hub 'repo_id'"),
        (["features", "shared_prefix"], 5, "its 'features' entry cannot be read"),
        (["routing"], "learned", "'routing' must be an object or null"),
    ],
)
def test_a_damaged_bundle_config_is_refused_naming_the_problem(saved_bundle, tmp_path, path, value, message):
    import shutil

    folder = tmp_path / "bundle"
    shutil.copytree(saved_bundle, folder)
    config_file = folder / "autoswitch_config.json"
    config_file.write_text(json.dumps(_edited(json.loads(config_file.read_text()), path, value)))
    with pytest.raises(BundleError, match=r"autoswitch_config.json is damaged:\n(.|\n)*" + re.escape(message)) as error:
        AutoSwitchModel.from_pretrained(folder, base_model=tiny_bert(), progress=False)
    assert "Re-save the bundle with AutoSwitchModel.save_pretrained" in str(error.value)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (None, "it cannot be read"),
        ({"task_ids": torch.zeros(3, dtype=torch.long)}, "'task_ids' has 3 entries for 72 rows"),
        ({"task_ids": torch.full((72,), 5)}, "'task_ids' holds ids outside 0..2"),
        ({"task_ids": torch.zeros(72, dtype=torch.long)}, "no query example for task(s) 'beta', 'gamma'"),
        ({"features": torch.zeros(72, dtype=torch.long)}, "'features' must be a 2-D float tensor"),
    ],
)
def test_damaged_query_features_are_refused_naming_the_problem(saved_bundle, tmp_path, tensors, message):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bundle"
    shutil.copytree(saved_bundle, folder)
    features_file = folder / "query_features.safetensors"
    if tensors is None:
        features_file.write_bytes(features_file.read_bytes()[:40])  # cut short, as an interrupted download
    else:
        with safe_open(str(features_file), framework="pt") as handle:
            metadata = handle.metadata()
        save_file({**load_file(features_file), **tensors}, str(features_file), metadata=metadata)
    with pytest.raises(BundleError, match="query_features.safetensors is damaged:\n  " + re.escape(message)):
        AutoSwitchModel.from_pretrained(folder, base_model=tiny_bert(), progress=False)


def test_a_bundle_config_that_is_not_json_is_refused(saved_bundle, tmp_path):
    import shutil

    folder = tmp_path / "bundle"
    shutil.copytree(saved_bundle, folder)
    config_file = folder / "autoswitch_config.json"
    config_file.write_text(config_file.read_text()[:100])
    with pytest.raises(BundleError, match="autoswitch_config.json is damaged:\n  it is not valid JSON"):
        AutoSwitchModel.from_pretrained(folder, base_model=tiny_bert(), progress=False)
    config_file.write_text("[1, 2]")
    with pytest.raises(BundleError, match="it holds a JSON list, not an object"):
        AutoSwitchModel.from_pretrained(folder, base_model=tiny_bert(), progress=False)


def test_bundle_hub_round_trip_with_adapter_references(bert_switches, hub_repo_id):
    from huggingface_hub import HfApi

    api = HfApi()
    adapter_repo = hub_repo_id + "-gamma"
    api.create_repo(adapter_repo)
    api.upload_folder(repo_id=adapter_repo, folder_path=bert_switches["gamma"])
    adapters = {"alpha": bert_switches["alpha"], "beta": bert_switches["beta"], "gamma": adapter_repo}
    router = AutoSwitchModel.from_pretrained(
        tiny_bert(), adapters=adapters, query_sets=query_sets(), config=AutoSwitchConfig(mode="top1"), progress=False
    )
    batch = mixed_batch()
    expected = router(**batch).last_hidden_state
    router.push_to_hub(hub_repo_id, adapters="reference")
    files = set(api.list_repo_files(hub_repo_id))
    assert {"autoswitch_config.json", "query_features.safetensors", "README.md"} <= files
    assert any(f.startswith("adapters/alpha/") for f in files) and not any(
        f.startswith("adapters/gamma") for f in files
    )
    loaded = AutoSwitchModel.from_pretrained(hub_repo_id, base_model=tiny_bert(), progress=False)
    torch.testing.assert_close(loaded(**batch).last_hidden_state, expected, rtol=0, atol=0)


# -- bad input -------------------------------------------------------------------------------------------------------


def test_bad_input_errors_leave_the_base_model_untouched(bert_switches, tmp_path):
    base = tiny_bert()
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def untouched():
        assert base.state_dict().keys() == state.keys()
        assert not any(type(m).__name__.startswith("Switched") for m in base.modules())

    build = lambda **kw: AutoSwitchModel.from_pretrained(  # noqa: E731
        base, **{"adapters": bert_switches, "query_sets": query_sets(), "progress": False, **kw}
    )
    with pytest.raises(EmptyQuerySetError, match="query set of task 'beta' is empty"):
        build(query_sets={**query_sets(), "beta": []})
    untouched()
    with pytest.raises(DuplicateTaskError, match="'alpha' appears twice"):
        build(adapters=[("alpha", bert_switches["alpha"]), ("alpha", bert_switches["beta"])])
    with pytest.raises(ValueError, match=r"missing for \['gamma'\]"):
        build(query_sets={k: v for k, v in query_sets().items() if k != "gamma"})
    with pytest.raises(ValueError, match="Invalid task name 'a.b'"):
        build(adapters={"a.b": bert_switches["alpha"]}, query_sets={"a.b": ["x"]})

    with pytest.raises(FileNotFoundError, match="Could not read an adapter config at"):
        build(adapters={**bert_switches, "beta": str(tmp_path / "nowhere")})
    untouched()

    other_layer = make_router(tiny_bert, bert_switches, feature_layer=0)
    foreign = other_layer.compute_query_features(task_ids(0, 4), progress=False)
    with pytest.raises(FeatureMismatchError, match="layer: the query set of task 'alpha' has 0, the router uses 1"):
        build(query_sets={**query_sets(), "alpha": foreign}, config=AutoSwitchConfig(feature_layer=1))
    untouched()

    with pytest.raises(AdapterMismatchError, match="other shapes"):
        AutoSwitchModel.from_pretrained(
            tiny_bert(hidden_size=48), adapters=bert_switches, query_sets=query_sets(), progress=False
        )
    import json
    import shutil

    renamed = {}
    for name, base_id in (("beta", "org/other"), ("gamma", "org/third")):
        renamed[name] = str(tmp_path / name)
        shutil.copytree(bert_switches[name], renamed[name])
        config_path = tmp_path / name / "adapter_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": base_id}))
    with pytest.raises(AdapterMismatchError, match="different base models .*beta: 'org/other', gamma: 'org/third'"):
        build(adapters={**bert_switches, **renamed})
    base.name_or_path = "org/base"
    with pytest.raises(AdapterMismatchError, match="made for base model 'org/other', but the router's base model is"):
        build(adapters={**bert_switches, "beta": renamed["beta"]})
    untouched()
    router = build(adapters={**bert_switches, **renamed}, check_base_model=False)
    assert router.tasks == list(TASKS)
    with pytest.raises(ValueError, match="routing covers 2 samples but the batch has 6"):
        router(**mixed_batch(), routing=router.route(task_ids(0, 2)))


# -- the shared prefix of decoder prompts -------------------------------------------------------------------------

PREFIX = (3, 7, 5, 9)  # e.g. a chat template's opening: the same tokens at the start of every query prompt


def _prefixed(ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.tensor(PREFIX).expand(ids.shape[0], -1), ids], dim=1)


def test_shared_prefix_of_and_without_prefix():
    left = {"input_ids": torch.tensor([[0, 3, 7, 5, 1], [3, 7, 5, 2, 2]]), "attention_mask": torch.tensor(
        [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])}  # fmt: skip
    right = {"input_ids": torch.tensor([[3, 7, 8, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert features.shared_prefix_of([left]) == (3, 7, 5)
    assert features.shared_prefix_of([left, right]) == (3, 7)
    short = {"input_ids": torch.tensor([[3, 7], [3, 7]])}  # every sequence keeps one token after the prefix
    assert features.shared_prefix_of([short]) == (3,)
    assert features.shared_prefix_of([{"input_ids": torch.tensor([[1, 2], [4, 2]])}]) == ()
    mask = features.without_prefix(left["input_ids"], left["attention_mask"], (3, 7, 5))
    assert mask.tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 1, 1]]
    other = torch.tensor([[3, 7, 6, 1], [3, 7, 5, 1], [0, 0, 3, 7]])  # starts otherwise; matches; too short
    kept = features.without_prefix(other, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]), (3, 7, 5))
    assert kept.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]


def test_decoder_router_pools_without_the_shared_prefix_and_saves_it(llama_switches, tmp_path):
    query = {name: {"input_ids": _prefixed(task_ids(t, 24))} for t, name in enumerate(TASKS)}

    def build(make_base, switches, **config):
        config = AutoSwitchConfig(metric="euclidean", feature_layer=2, **config)
        return AutoSwitchModel.from_pretrained(make_base(), adapters=switches, query_sets=query, config=config,
                                               progress=False)  # fmt: skip

    router = build(tiny_llama, llama_switches)
    assert router.feature_spec.shared_prefix == PREFIX
    prompts = _prompts()
    prompts = {"input_ids": _prefixed(prompts["input_ids"]), "attention_mask": torch.ones(6, 10, dtype=torch.long)}
    prompts["attention_mask"][0, :4] = 0  # a row without the prefix (padding in its place): every token pooled
    with torch.no_grad():
        hidden = tiny_llama()(**prompts, output_hidden_states=True).hidden_states[2]
    weights = prompts["attention_mask"].clone()
    weights[1:, :4] = 0
    expected = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
    torch.testing.assert_close(router.features(prompts), expected, rtol=1e-4, atol=1e-5)

    router.save_pretrained(tmp_path / "bundle")
    description = json.loads((tmp_path / "bundle" / "autoswitch_config.json").read_text())
    assert description["format_version"] == 4 and description["features"]["shared_prefix"] == list(PREFIX)
    loaded = AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=tiny_llama(), progress=False)
    assert loaded.feature_spec.shared_prefix == PREFIX
    torch.testing.assert_close(loaded.features(prompts), router.features(prompts))

    plain = build(tiny_llama, llama_switches, skip_shared_prefix=False)
    assert plain.feature_spec.shared_prefix == ()
    with pytest.raises(FeatureMismatchError, match="shared_prefix"):  # features pooled otherwise do not mix
        router.feature_spec.check_matches(plain.query_features["alpha"].spec, "the router without it")


def test_encoder_router_pools_every_token(bert_switches):
    query = {name: {"input_ids": _prefixed(task_ids(t, 24))} for t, name in enumerate(TASKS)}
    router = AutoSwitchModel.from_pretrained(tiny_bert(), adapters=bert_switches, query_sets=query,
                                             config=AutoSwitchConfig(metric="euclidean"), progress=False)  # fmt: skip
    assert router.feature_spec.shared_prefix == ()  # bidirectional attention: the prefix sees the whole input


def test_token_ids_for_another_model_and_bad_adapter_sources_are_named(bert_switches):
    router = make_router(tiny_bert, bert_switches, mode="top1")
    vocabulary = tiny_bert().config.vocab_size
    with pytest.raises(InputMismatchError, match=rf"vocabulary has {vocabulary} entries.*tokenized for another model"):
        router(input_ids=task_ids(0, 2) + vocabulary)
    for ids, message in ((task_ids(1, 4) + vocabulary, f"query examples of task '{TASKS[1]}' hold token ids from"),
                         (task_ids(1, 4).float(), "token ids must be an integer tensor")):  # fmt: skip
        queries = {**query_sets(), TASKS[1]: {"input_ids": ids}}
        with pytest.raises(InputMismatchError, match=message):
            AutoSwitchModel.from_pretrained(tiny_bert(), adapters=bert_switches, query_sets=queries, progress=False)
    adapters = {**bert_switches, TASKS[1]: None}
    with pytest.raises(TypeError, match=rf"adapters\['{TASKS[1]}'\] must be the folder or Hub repo id"):
        AutoSwitchModel.from_pretrained(tiny_bert(), adapters=adapters, query_sets=query_sets(), progress=False)
