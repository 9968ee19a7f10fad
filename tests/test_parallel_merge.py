"""Merging a model's switches on several threads: the same weights as one layer at a time, tied weights merged by one
thread, and peft's loop wherever threads do not apply."""

import copy

import pytest
import torch
from tiny_models import finetune_copy, tiny_bert, tiny_llama
from torch import nn

import switch_adapter.tswitch.parallel_merge as parallel_merge
from switch_adapter import TSwitchConfig, from_finetuned
from switch_adapter.tswitch.layer import SwitchedModule


def _switched(base, seed):
    tuned = finetune_copy(base, seed=seed)
    return from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(density=0.1), progress=False)


@pytest.mark.parametrize("make", [tiny_bert, lambda: tiny_llama(tie_word_embeddings=True)], ids=["bert", "tied-llama"])
def test_threads_merge_the_weights_one_layer_at_a_time_merges(make, monkeypatch):
    base = make()
    merged = []
    calls = []
    real = parallel_merge.merge_in_parallel

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr("switch_adapter.tswitch.model.merge_in_parallel", spy)
    for threads in (3, 1):
        monkeypatch.setattr(parallel_merge, "default_workers", lambda threads=threads: threads)
        model = _switched(base, seed=2)
        model.merge_adapter()
        assert calls[-1] == (threads > 1)
        merged.append({name: value.clone() for name, value in model.get_base_model().state_dict().items()})
        model.unmerge_adapter()
        for name, value in model.get_base_model().state_dict().items():
            if "tswitch_" not in name:
                torch.testing.assert_close(value, base.state_dict()[name.replace(".base_layer", "")])
    assert merged[0].keys() == merged[1].keys()
    for name in merged[0]:
        assert torch.equal(merged[0][name], merged[1][name]), name


def test_layers_sharing_a_parameter_are_merged_by_one_thread_in_order():
    shared = nn.Linear(4, 4)
    other = nn.Linear(4, 4)
    twin = nn.Linear(4, 4)
    twin.weight = shared.weight  # tied
    layers = [SwitchedModule(module, "a", {}, ("weight",)) for module in (shared, other, twin)]
    groups = parallel_merge._groups_sharing_memory(layers)
    assert [[layers.index(layer) for layer in group] for group in groups] == [[0, 2], [1]]


def test_one_cpu_leaves_the_merge_to_peft(monkeypatch):
    monkeypatch.setattr(parallel_merge, "default_workers", lambda: 1)
    model = _switched(tiny_bert(), seed=3)
    assert not parallel_merge.merge_in_parallel(model.base_model.model, None, False)
