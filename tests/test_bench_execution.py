"""The execution benchmark's plumbing (benchmarks/execution.py) on a tiny Llama: forced routing, memory, report."""

import torch
from tiny_models import finetune_copy, tiny_llama

from benchmarks.execution import _markdown, extra_memory, forced_routing, lora_model
from switch_adapter import AutoSwitchConfig, AutoSwitchModel, TSwitchConfig, from_finetuned


def test_forced_routing_runs_each_sample_with_its_task_and_the_report_renders(tmp_path):
    switches = {}
    for t in range(2):
        base = tiny_llama()
        model = from_finetuned(base, finetune_copy(base, seed=t + 1), TSwitchConfig(density=0.2), progress=False)
        model.save_pretrained(tmp_path / f"task{t}")
        switches[f"task{t}"] = str(tmp_path / f"task{t}")
    ids = torch.randint(3, 60, (8, 6), generator=torch.Generator().manual_seed(0))
    query = {name: {"input_ids": ids[:4] + 4 * t} for t, name in enumerate(switches)}
    router = AutoSwitchModel.from_pretrained(
        tiny_llama(), adapters=switches, query_sets=query, config=AutoSwitchConfig(metric="euclidean"), progress=False
    )
    batch = {"input_ids": ids[:4], "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    routing = forced_routing(router, batch, [1, 0, 1, 0])
    assert routing.top_task == ["task1", "task0", "task1", "task0"] and not routing.ood.any()
    with torch.no_grad():
        out = router(**batch, routing=routing).logits
        alone = {k: v[[1]] for k, v in batch.items()}
        expected = router(**alone, routing=forced_routing(router, alone, [0])).logits
    torch.testing.assert_close(out[1], expected[0], rtol=1e-5, atol=1e-5)
    assert extra_memory(router) > 0
    lora = lora_model(tiny_llama, 2, ["q_proj", "v_proj"])
    assert set(lora.peft_config) == {"task0", "task1"}
    forward_keys = "mixed_exec_vs_plain mixed_exec_vs_plain_cpu1 mixed_routed_vs_plain single_exec_vs_plain"
    row = dict.fromkeys(forward_keys.split() + ["single_exec_vs_plain_cpu1", "extra_memory_mib"], 1.0)
    task_keys = "routed_vs_plain lora_vs_plain routed_vs_plain_cpu1 lora_vs_plain_cpu1 packed_switches_mib"
    tasks = dict.fromkeys(task_keys.split() + ["extra_memory_mib", "lora_adapters_mib", "dense_copies_mib"], 1.0)
    generate = {**tasks, "model": "tiny", "prompts": 4, "new_tokens": 2, "plain_tokens_per_s": 10.0}
    payload = {
        "command": "python -m benchmarks.execution --quick",
        "environment": {
            "torch": "t",
            "transformers": "t",
            "threads": 2,
            "machine": "m",
            "numba_kernels": True,
            "load_average": [1.0, 1.0, 1.0],
        },  # fmt: skip
        "forward": [{**row, "execution": "default (streamed)", "length": 8}],
        "tasks": [{**tasks, "tasks": 1}],
        "generate": [{**generate, "tasks": 2}],
    }
    text = _markdown(payload)
    assert "| default (streamed) | 8 | 1.00x (1.00x) |" in text and "| tiny | 2 | 4 x 2 |" in text
