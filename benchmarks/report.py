"""Benchmark output: a markdown table, the full JSON report, and a plot of mean accuracy against storage."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from switch_adapter._staging import staging_file

logger = logging.getLogger(__name__)

STYLE = {  # method -> (marker, colour, legend label)
    "pre-trained": ("v", "#7f7f7f", "pre-trained encoder + heads"),
    "individual": ("*", "#000000", "individual fine-tuned"),
    "task_arithmetic": ("s", "#1f77b4", "task arithmetic"),
    "ties": ("D", "#17becf", "TIES (original: top 20% of each task vector)"),
    "ties_per_tensor": ("d", "#aec7e8", "TIES variant (top 20% of each tensor, peft)"),
    "dare": ("P", "#9467bd", "DARE"),
    "emr": ("X", "#d62728", "EMR-merging (task id)"),
    "tswitch": ("o", "#2ca02c", "T-Switch (task id), densities"),
    "tswitch_rms": ("o", "#98df8a", "T-Switch (task id), reference rms scale"),
    "tswitch_recalibrated": ("o", "#bcbd22", "T-Switch (task id), BatchNorm statistics re-estimated"),
    "flexswitch": ("s", "#006400", "FlexSwitch (task id), budgets"),
    "autoswitch": ("^", "#ff7f0e", "Auto-Switch routed (top-1)"),
    "autoswitch_soft": ("h", "#ffbb78", "Auto-Switch routed (soft weights)"),
    "autoswitch_default_features": ("v", "#bcbd22", "Auto-Switch routed (top-1, library defaults)"),
    "autoswitch_euclidean": ("p", "#c49c94", "Auto-Switch routed (top-1, euclidean metric)"),
    "autoswitch_cosine": ("8", "#f7b6d2", "Auto-Switch routed (top-1, cosine metric)"),
    "autoswitch_learned": ("H", "#e6550d", "Auto-Switch routed (top-1, learned metric)"),
    "autoflexswitch": ("^", "#31a354", "Auto-FlexSwitch routed (smallest FlexSwitch budget)"),
    "autoswitch_batch": ("<", "#8c564b", "Auto-Switch per batch (mixed batches)"),
    "autoswitch_batch_single": (">", "#e377c2", "Auto-Switch per batch (single-task batches)"),
}
ROUTED_PER_SAMPLE = ("autoswitch", "autoswitch_soft", "autoswitch_default_features", "autoswitch_euclidean",
               "autoswitch_cosine", "autoswitch_learned")  # fmt: skip
METRIC_ROWS = ("euclidean", "cosine", "learned")  # the rows autoswitch_<metric>
# Issue 10's targets.
ROUTING_ACCURACY_TARGET = 0.935
AUTOFLEX_PCT_TARGET, AUTOFLEX_STORAGE_PCT = 92.5, 1.0
# Issue 11's targets of the vision suite: T-Switch (pct of individual, storage pct), Auto-Switch pct, wall time.
VISION_TSWITCH_TARGET = (99.0, 2.0)
VISION_AUTOSWITCH_TARGET = 98.5
VISION_WALL_TIME_S = 20 * 60
# The confusion picture: the library-default router and the learned metric, side by side.
CONFUSION_METHODS = ("autoswitch_default_features", "autoswitch_learned")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = str(staging_file(path.parent, f".{path.name}-"))
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _size(nbytes: float) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= factor:
            return f"{nbytes / factor:.3g} {unit}"
    return f"{int(nbytes)} B"


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The result table: accuracy per task and mean, % of individual, routing, storage, build and inference time."""
    tasks = [task["name"] for task in report["tasks"]]
    header = (
        ["method"]
        + tasks
        + ["mean", "% of indiv.", "routing acc.", "storage", "% of fp32", "build s", "inference x base"]
    )
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in report["rows"]:
        routing = row["routing_accuracy"]
        cells = (
            [row["label"]]
            + [f"{row['accuracy'][t]:.4f}" for t in tasks]
            + [
                f"{row['mean']:.4f}",
                _pct(row["pct_of_individual"]),
                "-" if routing is None else f"{routing:.4f}",
                _size(row["storage_bytes"]),
                _pct(row["storage_pct_fp32"], 3),
                f"{row['build_seconds']:.1f}",
                _pct(row["inference_ratio"]),
            ]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(report: dict[str, Any]) -> list[str]:
    """The issue's three targets, each with the measured figure and whether it is met (the vision suite's own
    targets for a report of that kind)."""
    if report.get("kind") == "vision":
        return vision_targets(report)
    rows = report["rows"]
    out = []

    def best(method: str) -> dict[str, Any] | None:
        found = [row for row in rows if row["method"] == method]
        return max(found, key=lambda row: row["mean"]) if found else None

    found = [row for row in rows if row["method"] in ROUTED_PER_SAMPLE]
    routed = max(found, key=lambda row: row["mean"]) if found else None
    if routed:
        ok = routed["pct_of_individual"] >= 99 and routed["storage_pct_fp32"] <= 1.5
        out.append(
            f"- Auto-Switch routed >= 99% of individual at <= 1.5% of fp32: {routed['pct_of_individual']:.2f}% at "
            f"{routed['storage_pct_fp32']:.3f}% ({routed['label']}; routing accuracy {routed['routing_accuracy']:.4f})"
            " -> "
            f"{'met' if ok else 'missed'}"
        )
    found = [row for row in rows if row["method"] in ("tswitch", "tswitch_rms")]
    oracle = max(found, key=lambda row: row["mean"]) if found else None
    if oracle:
        ok = oracle["pct_of_individual"] >= 99.5
        out.append(
            f"- T-Switch with task id >= 99.5% of individual: best {oracle['pct_of_individual']:.2f}% "
            f"({oracle['label']}, {oracle['storage_pct_fp32']:.3f}% of fp32) -> {'met' if ok else 'missed'}"
        )
    out.extend(_flexswitch_targets(rows))
    out.extend(_routing_targets(rows))
    emr = best("emr")
    if emr:
        cheap = [
            row
            for row in rows
            if row["method"] in ("tswitch", "tswitch_rms", "autoswitch")
            and row["storage_bytes"] <= emr["storage_bytes"] / 4
        ]
        winner = max(cheap, key=lambda row: row["mean"]) if cheap else None
        if winner:
            ok = winner["mean"] > emr["mean"]
            out.append(
                f"- Better than EMR-merging ({emr['mean']:.4f}, {_size(emr['storage_bytes'])}) at <= 1/4 of its "
                f"storage: best such row {winner['label']} {winner['mean']:.4f} at {_size(winner['storage_bytes'])}"
                f" -> {'met' if ok else 'missed'}"
            )
    return out


def _setup(report: dict[str, Any]) -> str:
    """How the figures were made: the report's own ``setup`` paragraph, else the text suite's."""
    if report.get("setup"):
        return report["setup"]
    cfg = report["config"]
    settings = cfg["finetune"]
    return (
        f"Model: `{report['model']}`; full fine-tuning per task ({settings['epochs']} epoch(s), length "
        f"{settings['max_length']}, batch {settings['batch_size']}, lr {settings['lr']:g}, head lr "
        f"{settings['head_lr']:g}), mean pooling + one linear head per task. Examples per task: up to "
        f"{cfg['max_train']} train / {cfg['max_validation']} validation / {cfg['max_test']} test. Test batches of "
        f"{cfg['eval_batch_size']} mix all tasks (shuffled). A sample is correct only if its own task's head "
        "answered and the label is right."
    )


def markdown(report: dict[str, Any], plot_name: str | None = "benchmark.png", confusion_name: str | None = None) -> str:
    env = report["environment"]
    tasks = report["tasks"]
    lines = [
        f"# switch-adapter benchmark ({report['suite']} suite)",
        "",
        *([f"Command (from the repository root): `{report['command']}`", ""] if report.get("command") else []),
        _setup(report),
        "",
        "Tasks: " + ", ".join(f"{t['name']} ({len(t['classes'])} classes, {t['test']} test)" for t in tasks) + ".",
    ]
    if report.get("skipped_tasks"):
        lines += ["", "Skipped (data source missing):"]
        lines += [f"- {name}: {reason}" for name, reason in report["skipped_tasks"].items()]
    lines += [
        "",
        markdown_table(report),
        "",
        f"Storage: bytes of the saved files each method needs besides the shared pre-trained model (task heads "
        f"included; model cards excluded); % of fp32 is relative to the {len(tasks)} fine-tuned fp32 checkpoints "
        f"({_size(report['fp32_task_vector_bytes'])}). Build: seconds from the fine-tuned models to the saved "
        "artifacts (static merges include the scaling search on validation). Inference: wall time of the "
        "mixed-batch test pass divided by the plain pre-trained model's, measured in the same process.",
        "",
        "## Targets",
        "",
        *targets(report),
    ]
    if report.get("not_run"):
        lines += ["", "## Rows not run", "", *[f"- {row}: {why}" for row, why in report["not_run"].items()]]
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {note}" for note in report["notes"]]]
    if plot_name:
        lines += ["", f"![mean accuracy vs storage]({plot_name})"]
    lines += routing_section(report, confusion_name)
    lines += [
        "",
        f"Wall time {report['seconds']:.0f} s on {env['cpu_count']} CPU cores ({env['torch_threads']} torch threads"
        + (f", OMP_WAIT_POLICY={env['omp_wait_policy']}" if env.get("omp_wait_policy") else "")
        + "), "
        f"{env['platform']}; torch {env['torch']}, transformers {env['transformers']}, switch-adapter "
        f"{env.get('switch_adapter')} (commit {env.get('git_commit')}).",
        "",
    ]
    return "\n".join(lines)


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (via a temporary file and a rename) and close it."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = str(staging_file(path.parent, f".{path.name}-", ".png"))
    try:
        fig.savefig(temporary)
        os.replace(temporary, path)
    finally:
        plt.close(fig)
        Path(temporary).unlink(missing_ok=True)
    return path


def routing_section(report: dict[str, Any], confusion_name: str | None) -> list[str]:
    """``## Routing``: the routers' table, what its columns mean, and the confusion picture (when drawn)."""
    if not any(row["routing_accuracy"] is not None for row in report["rows"]):
        return []
    lines = ["", "## Routing", "", routing_table(report), "",
             "Routing cost: seconds of `route()` (features up to the router's layer, k-NN retrieval) over the test "
             "batches divided by a plain forward of the pre-trained model over the same batches, alternated batch by "
             "batch in the same process. The confusion matrix of every routed row (true task x routed task, counts) is "
             "in `benchmark.json` (`params.confusion`)."]  # fmt: skip
    if confusion_name:
        lines += ["", f"![routing confusion]({confusion_name})"]
    return lines


def plot(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Mean accuracy against storage (log x), one marker per method and a curve over T-Switch densities."""
    plt = _pyplot()
    if plt is None:
        logger.warning('matplotlib is not installed, so no plot was drawn: pip install "switch-adapter[bench]".')
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(10.5, 5.2), dpi=120)
    rows = report["rows"]
    # The per-batch router on mixed batches fails by design; drawing it at its value would squash the other rows
    # into a thin band, so rows far below the rest sit on the bottom edge, annotated with their value.
    others = [r["mean"] for r in rows if r["method"] != "autoswitch_batch"]
    floor = min(others) - 0.15 * (max(others) - min(others) + 1e-3) if others else None
    for method, (marker, colour, label) in STYLE.items():
        chosen = sorted((r for r in rows if r["method"] == method), key=lambda r: r["storage_bytes"])
        if not chosen:
            continue
        xs = [max(r["storage_bytes"], 1) for r in chosen]
        ys = [r["mean"] if floor is None else max(r["mean"], floor) for r in chosen]
        for row, x, y in zip(chosen, xs, ys):
            if y != row["mean"]:
                ax.annotate(f"{row['mean']:.2f} (off scale)", (x, y), textcoords="offset points",
                            xytext=(6, 2), fontsize=7, color=colour)  # fmt: skip
        line = "-" if method.startswith(("tswitch", "flexswitch")) else ""
        if method == "tswitch":
            label = f"T-Switch (task id), {chosen[0]['params'].get('scale_rule', 'rms')} scale"
        ax.plot(xs, ys, marker=marker, linestyle=line, color=colour, label=label, markersize=8 if marker != "*" else 13)
        if method.startswith("tswitch"):
            for index, (row, x, y) in enumerate(zip(chosen, xs, ys)):
                offset = (4, -12) if index % 2 == 0 else (4, 6)
                ax.annotate(f"d={row['params']['density']:g}", (x, y), textcoords="offset points", xytext=offset,
                            fontsize=7, color=colour)  # fmt: skip
    individual = next((r for r in rows if r["method"] == "individual"), None)
    if individual:
        ax.axhline(individual["mean"], color="#000000", linewidth=0.8, linestyle=":")
    fp32 = report["fp32_task_vector_bytes"]
    for pct in (report.get("storage_target_pct", 1.5),):
        ax.axvline(fp32 * pct / 100, color="#ff7f0e", linewidth=0.8, linestyle="--",
                   label=f"{pct}% of the fp32 task vectors")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("task-specific storage on disk, bytes (log scale)")
    ax.set_ylabel("mean test accuracy (mixed-task batches)")
    ax.set_title(f"{len(report['tasks'])} tasks, {report['suite']} suite: accuracy vs storage")
    ax.grid(True, which="both", linewidth=0.3, alpha=0.6)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return _save_figure(fig, path)


def confusion_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows the confusion picture shows (:data:`CONFUSION_METHODS` that ran, with a confusion matrix)."""
    found = {row["method"]: row for row in report["rows"] if row["params"].get("confusion")}
    chosen = [found[method] for method in CONFUSION_METHODS if method in found]
    return chosen or [found[method] for method in ROUTED_PER_SAMPLE if method in found][:1]


def row_normalised(confusion: dict[str, Any]) -> list[list[float]]:
    """Each row of ``confusion["matrix"]`` divided by its sum: the share of a task's samples routed to each
    column."""
    return [[value / sum(row) if sum(row) else 0.0 for value in row] for row in confusion["matrix"]]


def plot_confusion(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """``routing_confusion.png``: true task x routed task, row-normalised and annotated in percent, for the rows of
    :func:`confusion_rows` side by side; None when there is none or matplotlib is missing."""
    plt, rows = _pyplot(), confusion_rows(report)
    if plt is None or not rows:
        return None
    size = len(rows[0]["params"]["confusion"]["tasks"])
    side = 2.2 + 0.55 * size
    fig, axes = plt.subplots(1, len(rows), figsize=(side * len(rows) + 0.8, side + 0.8), dpi=120, squeeze=False)
    for ax, row in zip(axes[0], rows):
        _confusion_panel(ax, row)
    fig.suptitle(f"Routing on mixed-task test batches ({report['suite']} suite): share of each task's samples")
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def _confusion_panel(ax: Any, row: dict[str, Any]) -> None:
    """One row's row-normalised confusion matrix with percentages and task names on both axes."""
    confusion, params = row["params"]["confusion"], row["params"]
    shares = row_normalised(confusion)
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i, line in enumerate(shares):
        for j, share in enumerate(line):
            ax.text(j, i, _percent(share), ha="center", va="center", fontsize=7,
                    color="white" if share > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(len(confusion["columns"])), confusion["columns"], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(confusion["tasks"])), confusion["tasks"], fontsize=7)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true task")
    title = STYLE.get(row["method"], ("", "", row["method"]))[2]
    ax.set_title(f"{title}\n{params['metric']}, layer {params['feature_layer']}: routing accuracy "
                 f"{row['routing_accuracy']:.3f}", fontsize=8)  # fmt: skip


def _percent(share: float) -> str:
    """A cell's annotation: nothing for 0, ``<1%`` for a trace, else whole percent."""
    if not share:
        return ""
    return "<1%" if share < 0.005 else f"{100 * share:.0f}%"


def routing_table(report: dict[str, Any]) -> str:
    """Routers with their metric and layer in use, query examples per task, routing accuracy and routing cost."""
    lines = ["| router | metric | layer | query examples per task | routing acc. | routing cost x forward |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in report["rows"]:
        params = row["params"]
        if row["routing_accuracy"] is None or "metric" not in params:
            continue
        cost = params.get("routing_cost_ratio")
        lines.append(f"| {row['label']} | {params['metric']} | {params['feature_layer']} | {params['query_examples']} "
                     f"| {row['routing_accuracy']:.4f} | {'-' if cost is None else f'{cost:.3f}'} |")  # fmt: skip
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``benchmark.json``, ``benchmark.png`` and ``routing_confusion.png`` (if matplotlib is installed) and
    ``benchmark.md``."""
    out = Path(out_dir)
    png = plot(report, out / "benchmark.png")
    confusion = plot_confusion(report, out / "routing_confusion.png")
    outputs = {"json": str(out / "benchmark.json"), "markdown": str(out / "benchmark.md")}
    if png:
        outputs["plot"] = str(png)
    if confusion:
        outputs["confusion_plot"] = str(confusion)
    report = {**report, "outputs": {kind: Path(path).name for kind, path in outputs.items()}}
    _atomic_write(out / "benchmark.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    text = markdown(report, png.name if png else None, confusion.name if confusion else None)
    _atomic_write(out / "benchmark.md", text.encode())
    return outputs


def _flexswitch_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The FlexSwitch targets: >= 99.5% of individual at <= 0.5% of fp32, and on or above the T-Switch front."""
    flex = [row for row in rows if row["method"] == "flexswitch"]
    tswitch = [row for row in rows if row["method"] in ("tswitch", "tswitch_rms")]
    if not flex:
        return []
    out = []
    cheap = [row for row in flex if row["storage_pct_fp32"] <= 0.5]
    if cheap:
        best = max(cheap, key=lambda row: row["mean"])
        ok = best["pct_of_individual"] >= 99.5
        out.append(
            f"- FlexSwitch with task id >= 99.5% of individual at <= 0.5% of fp32: {best['pct_of_individual']:.2f}% "
            f"at {best['storage_pct_fp32']:.3f}% ({best['label']}) -> {'met' if ok else 'missed'}"
        )
    for row in sorted(flex, key=lambda r: r["storage_bytes"]):
        rivals = [other for other in tswitch if other["storage_bytes"] <= row["storage_bytes"]]
        if not rivals:
            out.append(f"- {row['label']}: no T-Switch row of the same or smaller size to compare with")
            continue
        rival = max(rivals, key=lambda r: r["mean"])
        ok = row["mean"] >= rival["mean"]
        out.append(
            f"- {row['label']} ({row['mean']:.4f}, {_size(row['storage_bytes'])}) vs the best T-Switch row of the same "
            f"or smaller size ({rival['label']}: {rival['mean']:.4f}, {_size(rival['storage_bytes'])}) -> "
            f"{'on or above the front' if ok else 'below the front'}"
        )
    return out


def _routing_targets(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 10's targets: routing accuracy of the library defaults and of the learned metric, Auto-FlexSwitch's
    accuracy and storage, the routing accuracy of every metric, and the learned metric's routing cost against the
    plain metrics'."""
    by_method = {row["method"]: row for row in rows}
    out = []
    for method, what in (("autoswitch_default_features", "the library defaults"),
                         ("autoswitch_learned", "the learned metric")):  # fmt: skip
        row = by_method.get(method)
        if row:
            ok = row["routing_accuracy"] >= ROUTING_ACCURACY_TARGET
            out.append(f"- Routing accuracy >= {ROUTING_ACCURACY_TARGET} with {what}: {row['routing_accuracy']:.4f} "
                       f"({_router_summary(row)}) -> {'met' if ok else 'missed'}")  # fmt: skip
    flex = by_method.get("autoflexswitch")
    if flex:
        ok = flex["pct_of_individual"] >= AUTOFLEX_PCT_TARGET and flex["storage_pct_fp32"] <= AUTOFLEX_STORAGE_PCT
        out.append(
            f"- Auto-FlexSwitch routed >= {AUTOFLEX_PCT_TARGET}% of individual at <= {AUTOFLEX_STORAGE_PCT:g}% of fp32 "
            f"(everything on disk): {flex['pct_of_individual']:.2f}% at {flex['storage_pct_fp32']:.3f}% "
            f"({flex['label']}; routing accuracy {flex['routing_accuracy']:.4f}) -> {'met' if ok else 'missed'}"
        )
    metrics = {m: by_method[f"autoswitch_{m}"] for m in METRIC_ROWS if f"autoswitch_{m}" in by_method}
    for metric, row in metrics.items():
        out.append(f"- Routing accuracy, {metric} metric: {row['routing_accuracy']:.4f} ({_router_summary(row)})")
    if "learned" in metrics and len(metrics) > 1:
        cost = {m: f"{row['params']['routing_cost_ratio']:.3f} (layer {row['params']['feature_layer']})"
                for m, row in metrics.items()}  # fmt: skip
        plain = ", ".join(f"{m} {value}" for m, value in cost.items() if m != "learned")
        out.append(f"- Routing cost, route() over the test batches / a plain forward over them: learned "
                   f"{cost['learned']} vs {plain}")  # fmt: skip
    return out


def _router_summary(row: dict[str, Any]) -> str:
    params = row["params"]
    return f"{params['metric']}, layer {params['feature_layer']}, {params['query_examples']} query examples per task"


def vision_targets(report: dict[str, Any]) -> list[str]:
    """The vision suite's targets (issue 11): T-Switch with the task id >= 99% of the individual networks' accuracy
    at <= 2% of fp32; Auto-Switch routed per sample on mixed batches >= 98.5%; the suite in <= 20 minutes."""
    rows, out = report["rows"], []
    pct, storage = VISION_TSWITCH_TARGET
    oracle = [r for r in rows if r["method"].startswith("tswitch") and r["storage_pct_fp32"] <= storage]
    if oracle:
        best = max(oracle, key=lambda r: r["mean"])
        ok = best["pct_of_individual"] >= pct
        out.append(f"- T-Switch with task id >= {pct:g}% of individual at <= {storage:g}% of fp32: "
                   f"{best['pct_of_individual']:.2f}% at {best['storage_pct_fp32']:.3f}% ({best['label']}) -> "
                   f"{'met' if ok else 'missed'}")  # fmt: skip
    elif any(r["method"].startswith("tswitch") for r in rows):
        out.append(f"- T-Switch with task id >= {pct:g}% of individual at <= {storage:g}% of fp32: no T-Switch row "
                   f"at <= {storage:g}% of fp32 -> missed")  # fmt: skip
    else:
        out.append(f"- T-Switch with task id >= {pct:g}% of individual at <= {storage:g}% of fp32: not run")
    routed = [r for r in rows if r["method"] in ROUTED_PER_SAMPLE]
    if routed:
        best = max(routed, key=lambda r: r["mean"])
        ok = best["pct_of_individual"] >= VISION_AUTOSWITCH_TARGET
        out.append(f"- Auto-Switch routed per sample on mixed batches >= {VISION_AUTOSWITCH_TARGET:g}% of individual: "
                   f"{best['pct_of_individual']:.2f}% at {best['storage_pct_fp32']:.3f}% of fp32 ({best['label']}; "
                   f"routing accuracy {best['routing_accuracy']:.4f}) -> {'met' if ok else 'missed'}")  # fmt: skip
    else:
        out.append(f"- Auto-Switch routed per sample on mixed batches >= {VISION_AUTOSWITCH_TARGET:g}% of individual: "
                   "not run")  # fmt: skip
    seconds, env = report.get("seconds"), report.get("environment", {})
    if seconds is not None:
        cached = all(t.get("finetune", {}).get("cached") for t in report["tasks"])
        cache = "fine-tunes from the cache" if cached else "fine-tunes trained in this run"
        ok = seconds <= VISION_WALL_TIME_S and not cached
        verdict = "met" if ok else ("not measured from an empty cache" if cached else "missed")
        out.append(f"- Vision suite <= {VISION_WALL_TIME_S // 60} minutes from an empty cache: {seconds:.0f} s on "
                   f"{env.get('cpu_count')} cores ({cache}) -> {verdict}")  # fmt: skip
    return out
