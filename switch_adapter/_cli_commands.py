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
        revision=args.revision,
        base_revision=args.base_revision,
        token=args.token,
        force=args.force,
        overwrite=args.overwrite,
        progress=not args.quiet,
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
    )
    print(f"Wrote a transformers model folder (no switch-adapter needed to load it): {output}")
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
