"""What each ``switch-adapter`` subcommand does with its parsed arguments (see :mod:`switch_adapter.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _split(values: list[str] | None) -> list[str] | None:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    if values is None:
        return None
    return [item for value in values for item in value.split(",") if item]


def switch_config(args: argparse.Namespace):
    """A ``TSwitchConfig`` from the switch options given on the command line, or None if none was given."""
    from .tswitch.config import TSwitchConfig

    values = {}
    targets = _split(args.target_modules)
    if targets is not None:
        values["target_modules"] = targets[0] if targets in (["all"], ["all-linear"]) else targets
    for name in ("density", "scale_rule", "keep_ties", "scale_granularity", "task_type", "switch_norms"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.modules_to_save is not None:
        values["modules_to_save"] = _split(args.modules_to_save)
    return TSwitchConfig(**values) if values else None


def convert(args: argparse.Namespace) -> int:
    from .convert import convert_finetuned

    summary = convert_finetuned(
        args.base,
        args.finetuned,
        args.output,
        switch_config(args),
        revision=args.revision,
        base_revision=args.base_revision,
        token=args.token,
        overwrite=args.overwrite,
        progress=not args.quiet,
        model_factory=args.model_factory,
    )
    print(summary)
    return 0


def convert_lora(args: argparse.Namespace) -> int:
    from .convert import convert_lora as convert_lora_

    summary = convert_lora_(
        args.base,
        args.lora,
        args.output,
        switch_config(args),
        mode=args.mode,
        value_bits=args.value_bits,
        revision=args.revision,
        base_revision=args.base_revision,
        token=args.token,
        force=args.force,
        overwrite=args.overwrite,
        progress=not args.quiet,
        model_factory=args.model_factory,
    )
    print(summary)
    return 0


def inspect(args: argparse.Namespace) -> int:
    from .export.inspect import inspect_adapter

    report = inspect_adapter(args.adapter, revision=args.revision, token=args.token)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_table())
    if args.plot:
        from .export.plot import plot_units

        path = plot_units(report, args.plot, title=f"{report.source}: density and bit-width per unit")
        print(f"Wrote the per-unit plot to {path}", file=sys.stderr)  # stderr: stdout may be JSON
    return 1 if report.damaged else 0


def merge(args: argparse.Namespace) -> int:
    from .export.materialize import materialize

    if args.weights is not None and len(args.weights) != len(args.adapters):
        raise ValueError(f"--weights got {len(args.weights)} values for {len(args.adapters)} adapters; give one each.")
    output = materialize(
        args.base,
        list(args.adapters),
        args.output,
        weights=args.weights,
        overwrite=args.overwrite,
        revision=args.revision,
        base_revision=args.base_revision,
        token=args.token,
        dtype=args.dtype,
        progress=not args.quiet,
        model_factory=args.model_factory,
    )
    plain = os.path.isfile(os.path.join(output, "model_class.json"))
    kind = "a model folder (model.safetensors + model_class.json)" if plain else "a transformers model folder"
    print(f"Wrote {kind} (no switch-adapter needed to load it): {output}")
    return 0


def export_lora(args: argparse.Namespace) -> int:
    import torch

    from .export.lora import to_lora

    report = to_lora(
        args.adapter,
        args.base,
        args.output,
        rank=args.rank,
        overwrite=args.overwrite,
        revision=args.revision,
        base_revision=args.base_revision,
        token=args.token,
        lora_bias=args.lora_bias,
        include_norms=args.include_norms,
        exclude_modules=_split(args.exclude_modules),
        dtype=getattr(torch, args.dtype),
        svd_method=args.svd_method,
        progress=not args.quiet,
        model_factory=args.model_factory,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def push(args: argparse.Namespace) -> int:
    from .export._switch_file import open_switch
    from .hub import push_to_hub

    if not os.path.isdir(args.folder):
        raise FileNotFoundError(f"{args.folder!r} is not a local folder; push uploads a saved T-Switch adapter folder.")
    open_switch(args.folder)  # a T-Switch adapter with a sound weights file, before anything is uploaded
    url = push_to_hub(
        args.folder,
        args.repo_id,
        token=args.token,
        revision=args.revision,
        private=args.private,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    print(f"Pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def flex_config(args: argparse.Namespace):
    """A ``FlexSwitchConfig`` from the ``flex`` options; unset options keep the config's defaults."""
    from .flexswitch import FlexSwitchConfig

    values = {}
    for name in ("budget", "steps", "batch_size", "max_length", "loss", "seed", "task_type", "text_column",
                 "lora_factors"):  # fmt: skip
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.bit_widths is not None:
        values["bit_widths"] = tuple(args.bit_widths)
    targets = _split(args.target_modules)
    if targets is not None:
        values["target_modules"] = targets[0] if targets in (["all"], ["all-linear"]) else targets
    for name in ("exclude_modules", "modules_to_save"):
        if getattr(args, name) is not None:
            values[name] = _split(getattr(args, name))
    return FlexSwitchConfig(**values)


def flex(args: argparse.Namespace) -> int:
    import time
    from collections import Counter

    from ._staging import atomic_output_dir, check_output_dir
    from .export._base_model import copy_tokenizer_files
    from .flexswitch import flexswitch, load_examples
    from .format import WEIGHTS_NAME, entry_numel, entry_value_bits

    if args.limit < 0:
        raise ValueError(f"--limit must be 0 (all examples) or more, got {args.limit}.")
    start = time.perf_counter()
    inputs = [args.base, args.finetuned, args.examples]
    check_output_dir(args.output, args.overwrite, inputs)  # fail now, not after the training
    config = flex_config(args)
    examples = load_examples(args.examples, column=args.text_column, split=args.split, limit=args.limit or None)
    model = flexswitch(
        args.base,
        args.finetuned,
        examples,
        config,
        progress=not args.quiet,
        revision=args.revision,
        base_revision=args.base_revision,
        token=args.token,
    )
    with atomic_output_dir(args.output, args.overwrite, inputs) as work:
        model.save_pretrained(work)
        copy_tokenizer_files(args.base, work, revision=args.base_revision, token=args.token)
        plotted = _plot_units(work)
    output = os.path.abspath(args.output)
    adapter_config = model.peft_config["default"]
    record = adapter_config.flexswitch or {}
    entries = [entry for units in adapter_config.unit_layout.values() for entry in units.values()]
    parameters = sum(entry_numel(entry) for entry in entries)
    file_bytes = os.path.getsize(os.path.join(output, WEIGHTS_NAME))
    histogram = Counter(entry_value_bits(entry) for entry in entries)
    nan = float("nan")
    lines = [
        f"FlexSwitch written to {output} ({time.perf_counter() - start:.1f} s)",
        f"  file size          {file_bytes:,} bytes = {100 * file_bytes / (4 * max(parameters, 1)):.3f}% of fp32 "
        f"({len(entries)} switched tensors, {parameters:,} parameters)",
        f"  budget             {record.get('budget', config.budget)} = {record.get('budget_bytes', 0):,} bytes",
        f"  density            {record.get('density', nan):.4f} (started at {record.get('init_density', nan):.4f})",
        "  value bits         " + ", ".join(f"{n} tensors x {b} bit" for b, n in sorted(histogram.items())),
        f"  steps              {record.get('steps', 0)} ({record.get('loss', config.loss)} loss "
        f"{record.get('initial_loss', nan):.4g} -> {record.get('final_loss', nan):.4g})",
    ]
    if plotted:
        lines.append(f"  plot               {os.path.join(output, 'units.png')}")
    print("\n".join(lines))
    return 0


def _plot_units(folder: str) -> bool:
    """Write ``units.png`` (density and bit-width per unit) into ``folder``; without matplotlib, log one line and
    write nothing."""
    import logging

    from .export.inspect import inspect_adapter
    from .export.plot import plot_units

    try:
        plot_units(inspect_adapter(folder), os.path.join(folder, "units.png"), title="FlexSwitch: density and bits")
    except ImportError as error:
        logging.getLogger(__name__).info("No units.png: %s", error)
        return False
    return True
