"""The generative suite's result tables and target lines (from the report dict of :mod:`benchmarks.llm`)."""

from __future__ import annotations

from typing import Any

AUTOSWITCH_TARGETS = {"instruction": 98.0, "raw": 95.0}
CONVERSION_TARGET = 98.0
SPEED_TARGET = 0.9
FULL_SUITE_SECONDS = 30 * 60
QUICK_SUITE_SECONDS = 5 * 60
UNMEASURABLE = "not measurable: the LoRAs answer no prompt of this style right in this run"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _em(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    return f"{100 * result['mean']:.1f} ({_percent(result.get('percent_of_lora'))})"


def _routing(row: dict[str, Any]) -> str:
    values = [row["results"][s].get("routing_accuracy") for s in ("instruction", "raw") if s in row["results"]]
    if not any(v is not None for v in values):
        return "-"
    return " / ".join("-" if v is None else f"{100 * v:.1f}%" for v in values)


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value:,} B"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    tasks = list(report["tasks"])
    lines = [
        "# Generative suite: LoRAs of a chat LLM as switches, routed per prompt in generate",
        "",
        f"Command (from the repository root): `{report['command']}`",
        "",
        f"Model: {report['model']}. Tasks ({len(tasks)}): {', '.join(tasks)}; per task {s['max_test']} test prompts "
        f"(labels balanced), inputs cut to {s['max_input_tokens']} tokens, in one shuffled order so every batch of "
        f"{s['batch_size']} mixes the tasks; greedy, at most {s['max_new_tokens']} new tokens, exact match of the "
        "answer's first word. Two prompt styles, each a chat turn: *instruction* (the task's question and answer "
        "words, then the input) and *raw* (the input alone).",
        f"LoRAs: r={s['lora']['rank']}, alpha={s['lora']['alpha']} on {', '.join(s['lora']['targets'])}; "
        f"{s['lora']['steps']} steps of {s['lora']['batch_size']} from {s['max_train']} training examples per task "
        f"(both styles), lr {s['lora']['lr']:g}, seed {s['seed']}. Routers: {s['max_query']} validation examples "
        "per task in both styles as the query set, `AutoSwitchConfig()` defaults. One run, one seed.",
        "",
        "EM: mean exact match in % (in parentheses: % of the LoRAs' with the task id). Routing: share of prompts "
        "routed to their own task (instruction / raw). Bytes: adapter file per task (LoRA at fp16; a merge's one "
        "adapter divided by the tasks). Speed: tokens/s against the plain model on one mixed batch of "
        f"{s['speed_prompts']} instruction prompts generating exactly {s['speed_new_tokens']} tokens (routing "
        "included where the row routes), the plain model timed on that batch right before each row.",
        "",
        "| method | bytes per task | EM instruction | EM raw | routing | speed vs plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        results = row["results"]
        speed = "-" if row.get("speed") is None else f"{row['speed']:.2f}x"
        lines.append(
            f"| {row['label']} | {_bytes(row['bytes_per_task'])} | {_em(results.get('instruction'))} | "
            f"{_em(results.get('raw'))} | {_routing(row)} | {speed} |"
        )
    for style in ("instruction", "raw"):
        lines += ["", f"Exact match per task, {style} prompts:", ""]
        lines.append("| method | " + " | ".join(tasks) + " | mean |")
        lines.append("|---|" + "---:|" * (len(tasks) + 1))
        for row in report["rows"]:
            result = row["results"].get(style)
            if result is None:
                continue
            cells = [f"{100 * result['exact_match'][t]:.1f}" for t in tasks]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {100 * result['mean']:.1f} |")
    lines += ["", "LoRA fine-tunes:", "", "| task | trainable params | fp16 bytes | seconds | loss first -> last |",
              "|---|---:|---:|---:|---|"]  # fmt: skip
    for name, record in report["loras"].items():
        cached = " (cached)" if record.get("cached") else ""
        lines.append(
            f"| {name} | {record['trainable_params']:,} | {record['fp16_bytes']:,} | {record['seconds']}{cached} | "
            f"{record['first_loss']} -> {record['last_loss']} |"
        )
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in report["stages_seconds"].items())
    lines += ["", f"Run time: {report['seconds']:.0f} s ({stages}).", "", "Targets:", ""]
    lines += [f"- {line}" for line in report.get("targets", targets(report))]
    return "\n".join(lines) + "\n"


def _row(report: dict[str, Any], method: str) -> dict[str, Any] | None:
    return next((row for row in report["rows"] if row["method"] == method), None)


def _met(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def _met_share(values: list[float | None], goal: float) -> str:
    """Whether every "% of the LoRAs'" in ``values`` reaches ``goal``; undefined where the LoRAs' own EM is 0."""
    if any(value is None for value in values):
        return UNMEASURABLE
    return _met(min(values) >= goal)


def targets(report: dict[str, Any]) -> list[str]:
    """The issue's targets against this run, one line each."""
    lines = []
    lora = _row(report, "lora")
    lora_bytes = lora["bytes_per_task"] if lora else None
    routed = [row for row in report["rows"] if row["method"].startswith(("auto_tswitch_", "auto_factors_"))]
    arrows = [row for row in report["rows"] if row["method"].startswith("arrow")]
    for auto in routed if lora else []:
        for style, goal in AUTOSWITCH_TARGETS.items():
            value = auto["results"][style]["percent_of_lora"]
            lines.append(f"Auto-Switch routed generate keeps >= {goal:g}% of the LoRAs' EM ({style}), {auto['label']}: "
                         f"{_percent(value)}: {_met_share([value], goal)}")  # fmt: skip
        if arrows:
            ours = [auto["results"][s]["routing_accuracy"] for s in ("instruction", "raw")]
            theirs = [max(a["results"][s]["routing_accuracy"] for a in arrows) for s in ("instruction", "raw")]
            ok = all(a >= b for a, b in zip(ours, theirs))
            lines.append(
                "Auto-Switch routes at least as accurately as Arrow, its best top_k (instruction / raw), "
                f"{auto['label']}: {100 * ours[0]:.1f}% / {100 * ours[1]:.1f}% vs "
                f"{100 * theirs[0]:.1f}% / {100 * theirs[1]:.1f}%: {_met(ok)}"
            )
    if lora_bytes:
        switches = [
            r
            for r in report["rows"]
            if r["method"].startswith(("tswitch_", "factors_")) and r["bytes_per_task"] <= lora_bytes
        ]
        best = _best(switches)
        if best:
            lines.append(
                f"A switch converted from a LoRA keeps >= {CONVERSION_TARGET:g}% at <= the LoRA's fp16 bytes: best "
                f"{best['label']} ({_bytes(best['bytes_per_task'])}): {_both(best)}: "
                f"{_met_share(_shares(best), CONVERSION_TARGET)}"
            )
        else:
            lines.append("A switch converted from a LoRA at <= the LoRA's fp16 bytes: none that small ran: **NOT met**")
        flex = _row(report, "flexswitch")
        if flex:
            small = flex["bytes_per_task"] <= lora_bytes / 2
            verdict = _met_share(_shares(flex), CONVERSION_TARGET) if small else _met(False)
            lines.append(
                f"FlexSwitch from the LoRA keeps >= {CONVERSION_TARGET:g}% at half the LoRA's fp16 bytes "
                f"({_bytes(flex['bytes_per_task'])} vs {_bytes(lora_bytes // 2)}): {_both(flex)}: {verdict}"
            )
        halves = [r for r in switches if r["bytes_per_task"] <= lora_bytes / 2]
        best = _best(halves)
        if best:
            lines.append(
                f"(Not FlexSwitch) the best switch at <= half the LoRA's fp16 bytes: {best['label']} "
                f"({_bytes(best['bytes_per_task'])}): {_both(best)}"
            )
    for auto in routed:
        if auto.get("speed") is not None:
            lines.append(f"Routed generate tokens/s >= {SPEED_TARGET:g}x the plain model's, {auto['label']}: "
                         f"{auto['speed']:.2f}x: {_met(auto['speed'] >= SPEED_TARGET)}")  # fmt: skip
    quick = "--quick" in (report.get("command") or "")
    if report["settings"]["max_test"] >= 24 or quick:
        name, limit = ("--quick", QUICK_SUITE_SECONDS) if quick else ("Full suite", FULL_SUITE_SECONDS)
        seconds = report["seconds"]
        cached = any(r.get("cached") for r in report["loras"].values())
        note = " (LoRA fine-tunes cached: not an empty-cache run)" if cached else ""
        lines.append(f"{name} in <= {limit // 60} min from an empty cache: {seconds / 60:.1f} min{note}: "
                     f"{_met(seconds <= limit and not cached)}")  # fmt: skip
    return lines


def _shares(row: dict[str, Any]) -> list[float | None]:
    return [r["percent_of_lora"] for r in row["results"].values()]


def _worst(row: dict[str, Any]) -> float:
    return min(share or 0.0 for share in _shares(row))


def _both(row: dict[str, Any]) -> str:
    return " / ".join(_percent(r["percent_of_lora"]) for r in row["results"].values()) + " (instruction / raw)"


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(rows, key=_worst) if rows else None
