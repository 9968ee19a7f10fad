"""The converter's parallel pass: jobs on worker threads with results in order and bounded memory, positional and
mapped reads shared by threads, and the slots encoded while peft's plan is made."""

import copy
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import finetune_copy, llama_config, tiny_bert, tiny_llama
from transformers import BertModel, LlamaForCausalLM

import switch_adapter.convert.finetuned as finetuned
from switch_adapter import TSwitchConfig, convert_finetuned
from switch_adapter.convert import sources
from switch_adapter.convert.pipeline import run_in_order
from switch_adapter.convert.skeleton import Skeleton

# -- run_in_order --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_results_come_back_in_order_with_costs_within_the_budget(workers):
    lock = threading.Lock()
    running = {"cost": 0, "most": 0, "jobs": 0, "most_jobs": 0}
    costs = [5, 1, 1, 7, 2, 2, 2, 1, 9, 1, 1, 3]

    def work(index):
        with lock:
            running["cost"] += costs[index]
            running["jobs"] += 1
            running["most"] = max(running["most"], running["cost"])
            running["most_jobs"] = max(running["most_jobs"], running["jobs"])
        time.sleep(0.002 * (index % 3))  # later jobs may finish first
        with lock:
            running["cost"] -= costs[index]
            running["jobs"] -= 1
        return index * index

    results = list(run_in_order(range(len(costs)), work, lambda i: costs[i], budget=10, workers=workers))
    assert results == [(i, i * i) for i in range(len(costs))]
    assert running["most"] <= 10 and running["most_jobs"] <= workers


def test_a_job_larger_than_the_budget_runs_alone():
    seen = []
    results = list(run_in_order([3, 50, 3], lambda c: seen.append(c) or c, lambda c: c, budget=10, workers=3))
    assert [value for _, value in results] == [3, 50, 3] and sorted(seen) == [3, 3, 50]


def test_an_error_is_raised_at_its_turn_and_later_jobs_do_not_start():
    started = []

    def work(index):
        started.append(index)
        if index == 2:
            raise ValueError("job 2 is broken")
        time.sleep(0.01)
        return index

    results = run_in_order(range(40), work, lambda i: 1, budget=100, workers=2)
    assert [next(results)[1], next(results)[1]] == [0, 1]
    with pytest.raises(ValueError, match="job 2 is broken"):
        next(results)
    assert max(started) < 10  # the queue ahead is short, and what had not started was cancelled


# -- reading from several threads ---------------------------------------------------------------------------------


def _shards(tmp_path, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(100 + i, 37, generator=generator).to(dtype) for i in range(12)}
    first = {key: value for key, value in tensors.items() if int(key[1:]) % 2 == 0}
    second = {key: value for key, value in tensors.items() if int(key[1:]) % 2 == 1}
    save_file(first, tmp_path / "a.safetensors")
    save_file(second, tmp_path / "b.safetensors")
    return tensors, sources.SafetensorsSource([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], "t")


def test_positional_reads_from_several_threads_return_each_tensor(tmp_path):
    tensors, source = _shards(tmp_path)
    keys = list(tensors) * 8
    with source:
        results = list(run_in_order(keys, source.get, lambda key: 1, budget=8, workers=4))
    for key, value in results:
        assert torch.equal(value, tensors[key])


@pytest.mark.parametrize("chunk", [64, 1 << 23])
def test_task_vector_through_memory_maps_is_the_exact_difference(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "SUBTRACT_CHUNK_BYTES", chunk)
    (tmp_path / "base").mkdir(), (tmp_path / "tuned").mkdir()
    base, base_src = _shards(tmp_path / "base")
    generator = torch.Generator().manual_seed(1)
    tuned = {key: value + torch.randn(value.shape, generator=generator) * 1e-3 for key, value in base.items()}
    save_file(tuned, tmp_path / "tuned" / "all.safetensors")
    tuned_src = sources.SafetensorsSource([str(tmp_path / "tuned" / "all.safetensors")], "tuned")
    with base_src, tuned_src:
        for key in base:
            out = torch.empty(base[key].shape)
            assert sources.task_vector_into(tuned_src, key, base_src, key, out)
            assert torch.equal(out, tuned[key] - base[key])
        assert not sources.task_vector_into(tuned_src, "w0", base_src, "w0", torch.empty(3, 3))  # another shape


def test_task_vector_through_memory_maps_declines_other_dtypes(tmp_path):
    (tmp_path / "half").mkdir()
    _, source = _shards(tmp_path)
    _, half = _shards(tmp_path / "half", torch.float16)
    with source, half:
        assert not sources.task_vector_into(source, "w0", half, "w0", torch.empty(100, 37))
        with pytest.raises(ValueError, match="not a float32 tensor"):
            half.mapped_float32("w0")


# -- the slots encoded ahead of the plan --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        TSwitchConfig(),
        TSwitchConfig(target_modules=["q_proj", "v_proj"]),
        TSwitchConfig(target_modules=r".*\.mlp\.(up|down)_proj"),
        TSwitchConfig(switch_bias=True, modules_to_save=["lm_head"]),
        TSwitchConfig(exclude_modules=["o_proj"]),
        TSwitchConfig(switch_norms=True, target_modules=["up_proj"]),
    ],
    ids=["all", "list", "regex", "heads", "exclude", "norms"],
)
def test_predicted_slots_are_the_plans_slots(config):
    config = copy.deepcopy(config)
    config.task_type = "CAUSAL_LM"
    skeleton = Skeleton(LlamaForCausalLM, llama_config())
    assert skeleton.predicted_slots(config) == skeleton.plan(copy.deepcopy(config)).slots


def test_predicted_slots_of_an_encoder_are_the_plans_slots():
    skeleton = Skeleton(BertModel, tiny_bert().config)
    config = TSwitchConfig(switch_bias=True)
    assert skeleton.predicted_slots(config) == skeleton.plan(copy.deepcopy(config)).slots


@pytest.mark.parametrize("guess", ["none", "wrong", "broken"])
def test_a_wrong_guess_costs_time_not_correctness(tmp_path, monkeypatch, guess):
    """The plan decides: slots guessed wrongly are dropped, slots not guessed are encoded after the plan, a guess that
    fails is no guess, and the file is the one a right guess writes."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    finetune_copy(base, seed=3).save_pretrained(tmp_path / "tuned", max_shard_size="20KB")
    config = TSwitchConfig(target_modules=["q_proj", "up_proj"], density=0.2)
    reference = convert_finetuned(tmp_path / "base", tmp_path / "tuned", tmp_path / "right", config, progress=False)
    assert reference.units > 0

    def wrong(self, config):
        return [(name, "weight") for name, module in self.model.named_modules() if name.endswith(("k_proj", "up_proj"))]

    def broken(self, config):
        raise RuntimeError("no guess")

    replacement = {"none": lambda self, config: [], "wrong": wrong, "broken": broken}[guess]
    monkeypatch.setattr(Skeleton, "predicted_slots", replacement)
    summary = convert_finetuned(tmp_path / "base", tmp_path / "tuned", tmp_path / "guessed", config, progress=False)
    assert (summary.units, summary.unchanged, summary.tensors_read) == (
        reference.units,
        reference.unchanged,
        reference.tensors_read,
    )
    right = (tmp_path / "right" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "guessed" / "adapter_model.safetensors").read_bytes() == right


def test_one_worker_and_several_write_the_same_file(tmp_path, monkeypatch):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    finetune_copy(base, seed=4).save_pretrained(tmp_path / "tuned", max_shard_size="20KB")
    files = []
    for workers in (1, 3):
        monkeypatch.setattr(finetuned, "default_workers", lambda workers=workers: workers)
        out = tmp_path / f"w{workers}"
        convert_finetuned(tmp_path / "base", tmp_path / "tuned", out, TSwitchConfig(density=0.1), progress=False)
        files.append((out / "adapter_model.safetensors").read_bytes())
    assert files[0] == files[1]


def test_the_cyclic_collector_is_paused_during_a_conversion_and_restored(tmp_path, monkeypatch):
    import gc

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    finetune_copy(base).save_pretrained(tmp_path / "tuned")
    states = []
    real_plan = Skeleton.plan
    monkeypatch.setattr(Skeleton, "plan", lambda self, config: states.append(gc.isenabled()) or real_plan(self, config))
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            convert_finetuned(tmp_path / "base", tmp_path / "tuned", tmp_path / f"out{enabled}", progress=False)
            assert gc.isenabled() == enabled
        finally:
            gc.enable()
    assert states == [False, False]


def test_an_error_in_a_guessed_slot_the_plan_does_not_switch_is_not_raised(tmp_path, monkeypatch):
    """NaN in a tensor the guess wrongly includes: the conversion goes on (the tensor is only checked, and reported
    as changed but not targeted); NaN in a tensor the plan switches is raised, naming it."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    tuned = finetune_copy(base, seed=5)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    tuned.save_pretrained(tmp_path / "tuned")
    monkeypatch.setattr(
        Skeleton,
        "predicted_slots",
        lambda self, config: [(name, "weight") for name, _ in self.model.named_modules() if name.endswith("_proj")],
    )
    config = TSwitchConfig(target_modules=["q_proj"], density=0.2)
    summary = convert_finetuned(tmp_path / "base", tmp_path / "tuned", tmp_path / "q", config, progress=False)
    assert summary.units == 2
    assert any("k_proj" in item.name and "not targeted" in item.reason for item in summary.skipped)
    with pytest.raises(ValueError, match=r"k_proj\.weight.*NaN/Inf"):
        convert_finetuned(
            tmp_path / "base", tmp_path / "tuned", tmp_path / "k", TSwitchConfig(target_modules=["k_proj"])
        )
    assert not (tmp_path / "k").exists()
