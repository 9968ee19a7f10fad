"""The vision suite: EfficientNet-Lite0 fine-tuned on embedded image tasks, every method built from the same
fine-tunes and evaluated on the same mixed-task test batches (``python -m benchmarks --suite vision``).

Steps (fine-tunes are cached on disk keyed by their inputs; everything else is rebuilt and timed each run):

1. load the image tasks (:mod:`.vision_tasks`; a missing source is skipped with its install command) and fine-tune
   the network + a head per task (:mod:`.vision_model`; BatchNorm statistics re-estimated after training);
2. rows: pre-trained network + the fine-tuned heads (lower bound), the individual fine-tunes (upper bound), task
   arithmetic and TIES with the scaling chosen on validation, EMR-merging, T-Switch adapters with the task id at
   several densities (``switch_adapter.from_finetuned``, saved with ``save_pretrained`` and reloaded with
   ``PeftModel``), FlexSwitch at budgets, and Auto-Switch routing per sample on mixed batches;
3. every row is evaluated on the same shuffled mixed-task test batches; storage is measured from the saved files.

BatchNorm in the merges: task vectors hold the learned tensors only (weights, biases, BatchNorm's affine
parameters), never the running statistics, which are statistics of activations and not parameters (a sum of their
changes can make a variance negative). A merged network's statistics are re-estimated on ``recalibration_examples``
unlabelled training images per task: all tasks' images mixed for a static merge (one network for all tasks), the
task's own images for EMR's per-task networks. The re-estimated statistics are saved and counted in the storage.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import artifacts, baselines, evaluate
from .environment import environment, portable_path
from .pipeline import Row, adapter_names
from .sources import MissingSourceError
from .vision_model import (
    VisionFinetuned,
    VisionFinetuneSettings,
    VisionModel,
    efficientnet_lite0,
    finetune_task,
    get_head,
    reestimate_batchnorm,
    set_head,
    statistic_names,
)
from .vision_tasks import ImageTask, load_image_task, model_inputs

logger = logging.getLogger(__name__)

DEFAULT_VISION_TASKS = ("fashion_clothes", "fashion_shoes_bags", "mnist", "digits")
DEFAULT_VISION_DENSITIES = (0.02, 0.1, 1.0)
INPUT_KEY = "pixels"
STORAGE_TARGET_PCT = 2.0  # the T-Switch target's storage bound, drawn in the plot


@dataclass
class VisionBenchConfig:
    """What one run of the vision suite does. Defaults: the full suite; :func:`quick_vision_config` the reduced one.

    Args:
        tasks: Image task names (see ``benchmarks.vision_tasks.IMAGE_TASKS``).
        max_train / max_validation / max_test: Images per task and split (the first ones of the seeded split).
        densities: T-Switch densities of the task-id-given rows.
        scale_rule: ``TSwitchConfig.scale_rule`` of those switches.
        recalibrated_densities: Densities with an extra T-Switch row whose switches store no BatchNorm statistics: they
            are re-estimated at load with the switch active (``switch_adapter.recalibrate_norm_statistics``) on
            ``recalibration_examples`` unlabelled training images per task, instead of carried from the fine-tune.
        flexswitch_budgets: FlexSwitch budgets (task id given), each learned from ``flexswitch_examples`` training
            images per task; ``()`` skips them.
        flexswitch_steps: ``FlexSwitchConfig.steps`` (None: the library default).
        flexswitch_recalibrate: Re-estimate the FlexSwitch adapters' BatchNorm statistics with the switch active
            (stored with them) after learning them.
        autoswitch_density: Density of the switches Auto-Switch routes between; None: the smallest density whose
            task-id row keeps ``autoswitch_pct`` percent of the individual models' accuracy (else the best row's),
            among the recalibrated rows when there are any (the router then gets those switches with their
            statistics re-estimated, and its bundle stores them), else among the rows with statistics carried.
        query_examples: Training images per task in the router's query sets.
        knn_k: Neighbours the router retrieves per sample.
        recalibration_examples: Unlabelled training images per task the merges' (and the recalibrated switches')
            BatchNorm statistics are re-estimated from.
        merge_scalings / ties_scalings: Candidate scaling coefficients, chosen on the validation split.
        ties_density: Fraction of each task vector TIES keeps.
        eval_batch_size: Size of the mixed-task evaluation batches.
        seed: Seed of the splits, the fine-tunes and the mixing order.
        finetune: Fine-tuning settings (part of the cache key), among them the image size.
        cache_dir: Where fine-tunes are cached; None: ``$SWITCH_ADAPTER_CACHE/bench-vision``, by default
            ``~/.cache/switch_adapter/bench-vision``.
        out_dir: Results folder (table, JSON, plot, and the saved artifacts under ``artifacts/``).
        keep_artifacts: Keep the large fp32 artifacts (merged task vectors, EMR's unified vector) after measuring.
        progress: Show progress bars.
    """

    tasks: tuple[str, ...] = DEFAULT_VISION_TASKS
    max_train: int = 640
    max_validation: int = 100
    max_test: int = 500
    densities: tuple[float, ...] = DEFAULT_VISION_DENSITIES
    scale_rule: str = "norm"
    recalibrated_densities: tuple[float, ...] = (0.02, 0.05, 0.1, 0.3)
    flexswitch_budgets: tuple[str, ...] = ("3%",)
    flexswitch_steps: int | None = 30
    flexswitch_examples: int = 64
    flexswitch_recalibrate: bool = True
    autoswitch_density: float | None = None
    autoswitch_pct: float = 99.0
    query_examples: int = 300
    knn_k: int = 10
    recalibration_examples: int = 200
    merge_scalings: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    ties_scalings: tuple[float, ...] = (0.7, 1.0, 1.5)
    ties_density: float = 0.2
    eval_batch_size: int = 128
    seed: int = 0
    finetune: VisionFinetuneSettings = field(default_factory=VisionFinetuneSettings)
    cache_dir: str | None = None
    out_dir: str = "results"
    keep_artifacts: bool = False
    progress: bool = True
    name: str = "vision"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("VisionBenchConfig.tasks is empty: name at least one image task.")
        values = (*self.densities, *self.recalibrated_densities)
        if not self.densities or any(not 0 < d <= 1 for d in values):
            raise ValueError(f"VisionBenchConfig.densities must be non-empty values in (0, 1], got {self.densities}.")
        if self.scale_rule not in ("rms", "norm"):
            raise ValueError(f"VisionBenchConfig.scale_rule must be 'rms' or 'norm', got {self.scale_rule!r}.")
        positive = ("max_train", "max_validation", "max_test", "query_examples", "knn_k", "recalibration_examples",
                    "eval_batch_size", "flexswitch_examples")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"VisionBenchConfig.{name} must be a positive integer, got {getattr(self, name)}.")


def quick_vision_config(**overrides: Any) -> VisionBenchConfig:
    """The reduced vision suite of ``--quick``: the same four tasks with fewer images and epochs, three densities,
    shorter scaling grids."""
    values: dict[str, Any] = dict(
        max_train=320,
        max_validation=50,
        max_test=200,
        densities=(0.02, 1.0),
        recalibrated_densities=(0.02, 0.1),
        flexswitch_steps=20,
        flexswitch_examples=48,
        query_examples=100,
        recalibration_examples=128,
        merge_scalings=(0.3, 0.5, 1.0),
        ties_scalings=(0.8, 1.5),
        finetune=VisionFinetuneSettings(epochs=2),
        name="vision-quick",
    )
    values.update(overrides)
    return VisionBenchConfig(**values)


def default_cache_dir() -> Path:
    root = os.environ.get("SWITCH_ADAPTER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "switch_adapter"
    return base / "bench-vision"


# ----------------------------------------------------------------------------------------------------
# Mixed image batches and predictors
# ----------------------------------------------------------------------------------------------------


@dataclass
class ImageBatch(evaluate.Batch):
    """Model inputs ``{"pixels": [B, 3, S, S]}`` of one mixed batch, with each sample's label and task index."""

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.inputs.items()}


def image_stream(splits: Mapping[str, Any], size: int, batch_size: int, seed: int) -> evaluate.MixedStream:
    """The images of ``{task: ImageSplit}`` shuffled together (fixed by ``seed``) in batches of model inputs."""
    images = [split.images for split in splits.values()]
    shapes = {tuple(image.shape[1:]) for image in images}
    inputs = torch.cat([model_inputs(image, size) for image in images]) if len(shapes) > 1 else None
    if inputs is None:
        inputs = model_inputs(torch.cat(images), size)
    labels = torch.cat([split.labels for split in splits.values()])
    tasks = torch.cat([torch.full((len(split),), i, dtype=torch.long) for i, split in enumerate(splits.values())])
    order = torch.from_numpy(np.random.default_rng(seed).permutation(labels.shape[0]))
    batches = []
    for first in range(0, order.numel(), batch_size):
        chosen = order[first : first + batch_size]
        batches.append(ImageBatch({INPUT_KEY: inputs[chosen]}, labels[chosen], tasks[chosen]))
    return evaluate.MixedStream(list(splits), batches, {name: len(split) for name, split in splits.items()})


def body_with_heads_predictor(network: nn.Module, head: str, heads: Sequence[nn.Module]) -> evaluate.Predictor:
    """One network body for every task (pre-trained or statically merged); each sample gets its own task's head."""
    if "." in head:
        raise ValueError(f"The head must be a direct child of the network, got {head!r}.")
    body = copy.copy(network)  # shallow: shares every parameter and buffer; only its head slot differs
    body._modules = dict(network._modules)
    set_head(body, head, nn.Identity())

    def predict(batch: evaluate.Batch) -> evaluate.Prediction:
        features = body(batch.inputs[INPUT_KEY])
        labels = torch.empty_like(batch.labels)
        for task, index in evaluate.per_task_groups(batch):
            labels[index] = heads[task](features[index]).argmax(dim=-1)
        return evaluate.Prediction(labels, batch.tasks.clone())

    return predict


def networks_predictor(networks: Sequence[nn.Module]) -> evaluate.Predictor:
    """One full network per task (individual fine-tunes, EMR's per-task networks); the task id picks the network."""
    return evaluate.grouped_predictor(lambda task, inputs: networks[task](inputs[INPUT_KEY]))


def peft_oracle_predictor(peft_model: nn.Module, names: Sequence[str]) -> evaluate.Predictor:
    """A ``PeftModel`` with one adapter per task: each task's samples run with ``set_adapter(that task)``."""

    def run(task: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        peft_model.set_adapter(names[task])
        return peft_model(inputs[INPUT_KEY])

    return evaluate.grouped_predictor(run)


# ----------------------------------------------------------------------------------------------------
# Merging helpers
# ----------------------------------------------------------------------------------------------------


def learned_state(network: nn.Module, head: str) -> dict[str, torch.Tensor]:
    """The body's learned tensors: the state dict without the head and without BatchNorm running statistics."""
    skip = statistic_names(network)
    return {name: value.detach().clone() for name, value in network.state_dict().items()
            if name not in skip and not name.startswith(head + ".")}  # fmt: skip


@torch.no_grad()
def load_delta(network: nn.Module, base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
               scaling: float = 1.0) -> None:  # fmt: skip
    """Set the tensors of ``base`` in ``network`` to ``base + scaling * delta`` (absent from ``delta``: the base)."""
    state = network.state_dict()
    for name, value in base.items():
        state[name].copy_(value)
        if name in delta:
            state[name].add_(delta[name], alpha=scaling)


def statistics_of(network: nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm running statistics of ``network`` (what a re-estimation produces and must be stored)."""
    names = statistic_names(network)
    return {name: value.detach().clone() for name, value in network.state_dict().items() if name in names}


# ----------------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------------


def load_vision_suite(
    names: Sequence[str], config: VisionBenchConfig, loader: Callable[[str, int], ImageTask] | None = None
) -> tuple[list[ImageTask], dict[str, str]]:
    """Load the tasks whose data is here (cut to the configured sizes); returns them and ``{task: reason}`` for the
    ones skipped."""
    loader = loader or load_image_task
    loaded, skipped = [], {}
    for name in names:
        try:
            task = loader(name, config.seed)
        except (MissingSourceError, FileNotFoundError, ImportError) as error:
            skipped[name] = str(error)
            logger.warning("Skipping image task %s: %s", name, error)
            continue
        loaded.append(task.limited(config.max_train, config.max_validation, config.max_test))
    return loaded, skipped


class VisionBenchmark:
    """One run of the vision suite (see the module docstring); :meth:`run` returns the report dict."""

    def __init__(self, config: VisionBenchConfig, suite: Sequence[ImageTask], model: VisionModel,
                 skipped: Mapping[str, str] | None = None):  # fmt: skip
        if not suite:
            reasons = "; ".join(f"{k}: {v}" for k, v in (skipped or {}).items())
            raise ValueError("No image task could be loaded" + (f": {reasons}" if reasons else "."))
        self.config = config
        self.suite = list(suite)
        self.model = model
        self.skipped = dict(skipped or {})
        self.task_names = [task.name for task in self.suite]
        self.adapters = adapter_names(self.task_names)
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.out_dir = Path(config.out_dir)
        self.artifacts = self.out_dir / "artifacts"
        self.progress = config.progress
        self.size = config.finetune.image_size
        self.rows: list[Row] = []
        self.reference_seconds: list[float] = []
        self.notes: list[str] = []
        self.not_run: dict[str, str] = {}
        self.command: str | None = None
        self.software = environment()
        self.switch_folders: dict[float, Path] = {}

    # -- helpers ------------------------------------------------------------------------------------------

    def fresh_base(self) -> nn.Module:
        """The pre-trained network with a head of the first task's size (switches replace it per task)."""
        return self.model.build(self.suite[0].num_labels).eval()

    def _evaluate(self, predictor: evaluate.Predictor, desc: str, validation: bool = False) -> evaluate.EvalResult:
        stream = self.validation_stream if validation else self.test_stream
        return evaluate.evaluate(predictor, stream, desc=desc, progress=self.progress)

    def _add_row(self, method: str, label: str, result: evaluate.EvalResult, storage: int, build: float,
                 **extra: Any) -> Row:  # fmt: skip
        params = dict(extra.pop("params", {}))
        if result.confusion is not None:
            params["confusion"] = result.confusion
        row = Row(method, label, result.accuracy, result.mean, storage, round(build, 3), round(result.seconds, 3),
                  result.routing_accuracy, result.routing_per_task, params=params, **extra)  # fmt: skip
        self.rows.append(row)
        logger.info("%s: mean %.4f, %d bytes", label, row.mean, storage)
        return row

    def _relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.out_dir))
        except ValueError:
            return str(path)

    def recalibration_batches(self, tasks: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``recalibration_examples`` unlabelled training images of each of ``tasks`` (None: all), mixed."""
        chosen = range(len(self.suite)) if tasks is None else tasks
        count = self.config.recalibration_examples
        images = [model_inputs(self.suite[t].train.images[:count], self.size) for t in chosen]
        pixels = torch.cat(images)
        order = torch.from_numpy(np.random.default_rng(self.config.seed).permutation(pixels.shape[0]))
        return [pixels[order[i : i + 64]] for i in range(0, order.numel(), 64)]

    # -- steps ----------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        settings, head = self.config.finetune, self.model.head
        self.finetuned: list[VisionFinetuned] = [
            finetune_task(task.name, task.train, task.num_labels, self.model, settings, self.cache_dir, self.progress)
            for task in self.suite
        ]
        batch, seed = self.config.eval_batch_size, self.config.seed
        self.test_stream = image_stream({t.name: t.test for t in self.suite}, self.size, batch, seed)
        self.validation_stream = image_stream({t.name: t.validation for t in self.suite}, self.size, batch, seed + 1)
        self.base = self.fresh_base()
        self.base_state = learned_state(self.base, head)
        self.models = [f.load(self.model) for f in self.finetuned]
        self.heads = [get_head(network, head) for network in self.models]
        self.vectors = [baselines.task_vector(self.base_state, learned_state(m, head)) for m in self.models]
        self.heads_file = artifacts.save_heads(
            dict(zip(self.adapters, self.heads)), self.artifacts / "heads.safetensors"
        )
        self.heads_bytes = artifacts.bytes_on_disk([self.heads_file])

    def reference_pass(self) -> evaluate.EvalResult:
        """The plain pre-trained network (+ heads) over the test batches: the inference-time reference."""
        predictor = body_with_heads_predictor(self.base, self.model.head, self.heads)
        result = self._evaluate(predictor, "Evaluate: pre-trained network (time reference)")
        self.reference_seconds.append(result.seconds)
        return result

    def run_bounds(self) -> None:
        result = self.reference_pass()
        self._add_row("pre-trained", "pre-trained network + task heads (lower bound)", result, self.heads_bytes, 0.0,
                      files=[self._relative(self.heads_file)])  # fmt: skip
        result = self._evaluate(networks_predictor(self.models), "Evaluate: individual fine-tuned")
        files = [f.weights_file for f in self.finetuned]
        self.fp32_bytes = artifacts.bytes_on_disk(files)
        self._add_row("individual", "individual fine-tuned networks (upper bound)", result, self.fp32_bytes, 0.0,
                      params={"finetune": {f.task: f.record for f in self.finetuned}},
                      files=[f"{f.folder.name}/{f.weights_file.name} (fine-tune cache)"
                             for f in self.finetuned])  # fmt: skip

    def run_static_merge(self, method: str, label: str, merge: Callable[[], dict], scalings: Sequence[float]) -> Row:
        """``merge()`` at scaling 1, then each scaling on validation (BatchNorm statistics re-estimated on all tasks'
        images each time); the best is evaluated on test and saved with its statistics."""
        start = time.perf_counter()
        unit = merge()
        network = copy.deepcopy(self.base)
        predictor = body_with_heads_predictor(network, self.model.head, self.heads)
        recalibration = self.recalibration_batches()
        scores: dict[float, float] = {}
        for scaling in scalings:
            load_delta(network, self.base_state, unit, scaling)
            reestimate_batchnorm(network, recalibration)
            scores[scaling] = self._evaluate(predictor, f"{label}: validation, scaling {scaling:g}", True).mean
        best = max(scalings, key=lambda s: (scores[s], -abs(s - 1)))
        best_delta = {name: value * best for name, value in unit.items()}
        del unit
        load_delta(network, self.base_state, best_delta)
        reestimate_batchnorm(network, recalibration)
        folder = self.artifacts / method
        path = artifacts.save_tensors(best_delta, folder / "merged_task_vector.safetensors")
        stats = artifacts.save_tensors(statistics_of(network), folder / "batchnorm_statistics.safetensors")
        build = time.perf_counter() - start
        result = self._evaluate(predictor, f"Evaluate: {label}")
        storage = artifacts.bytes_on_disk([path, stats, self.heads_file])
        statistics = f"re-estimated on {self.config.recalibration_examples} training images per task"
        params = {"scaling": best, "validation_mean_by_scaling": {str(k): v for k, v in scores.items()},
                  "batchnorm": statistics}  # fmt: skip
        row = self._add_row(method, f"{label} (scaling {best:g})", result, storage, build, params=params,
                            files=[self._relative(p) for p in (path, stats, self.heads_file)])  # fmt: skip
        if not self.config.keep_artifacts:
            artifacts.remove(path)
        del network, best_delta
        gc.collect()
        return row

    def run_emr(self) -> Row:
        """EMR-merging: per task the unified vector masked and rescaled; each task's network gets BatchNorm
        statistics re-estimated on its own images."""
        start = time.perf_counter()
        merged = baselines.emr_merge(dict(zip(self.adapters, self.vectors)))
        folder = self.artifacts / "emr"
        merged.save(folder)
        del merged
        merged = baselines.EMRMerge.load(folder)  # evaluate what was saved
        networks, statistics = [], {}
        for index, (adapter, head) in enumerate(zip(self.adapters, self.heads)):
            network = copy.deepcopy(self.base)
            load_delta(network, self.base_state, merged.task_vector(adapter))
            set_head(network, self.model.head, head)
            reestimate_batchnorm(network, self.recalibration_batches([index]))
            statistics |= {f"{adapter}::{name}": value for name, value in statistics_of(network).items()}
            networks.append(network)
        artifacts.save_tensors(statistics, folder / "batchnorm_statistics.safetensors")
        build = time.perf_counter() - start
        result = self._evaluate(networks_predictor(networks), "Evaluate: EMR-merging")
        storage = artifacts.bytes_on_disk([folder, self.heads_file])
        row = self._add_row("emr", "EMR-merging (task id given)", result, storage, build,
                            params={"rescalers": merged.rescalers, "batchnorm": "re-estimated per task on "
                                    f"{self.config.recalibration_examples} of its training images"},
                            files=[self._relative(folder), self._relative(self.heads_file)])  # fmt: skip
        if not self.config.keep_artifacts:
            artifacts.remove(folder / "unified.safetensors")
        del networks, merged
        gc.collect()
        return row

    # -- the run ------------------------------------------------------------------------------------------

    def steps(self) -> list[tuple[str, Callable[[], Any]]]:
        cfg = self.config
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("fine-tune (cached) and prepare", self.prepare),
            ("pre-trained and individual", self.run_bounds),
            ("task arithmetic", lambda: self.run_static_merge(
                "task_arithmetic", "task arithmetic", lambda: baselines.task_arithmetic(self.vectors, 1.0),
                cfg.merge_scalings)),
            ("TIES", lambda: self.run_static_merge(
                "ties", f"TIES (top {cfg.ties_density:g} of each task vector)",
                lambda: baselines.ties(self.vectors, 1.0, cfg.ties_density), cfg.ties_scalings)),
            ("EMR-merging", self.run_emr),
        ]  # fmt: skip
        from . import vision_switch

        steps += vision_switch.steps(self)
        steps.append(("time reference again", self.reference_pass))
        return steps

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        steps = self.steps()
        with tqdm(total=len(steps), desc="Vision benchmark", disable=not self.progress, position=0) as bar:
            for name, step in steps:
                bar.set_postfix_str(name)
                step()
                bar.update(1)
        self.finish_rows()
        return self.report(time.perf_counter() - started)

    def finish_rows(self) -> None:
        individual = next(row for row in self.rows if row.method == "individual")
        reference = sum(self.reference_seconds) / len(self.reference_seconds)
        for row in self.rows:
            row.pct_of_individual = 100 * row.mean / individual.mean if individual.mean else float("nan")
            row.storage_pct_fp32 = 100 * row.storage_bytes / self.fp32_bytes
            row.inference_ratio = row.eval_seconds / reference if reference else float("nan")

    def setup_text(self) -> str:
        """The paragraph of ``benchmark.md`` that says how the figures were made."""
        cfg, settings = self.config, self.config.finetune
        return (
            f"Model: {self.model.label}; full fine-tuning per task ({settings.epochs} epoch(s) at "
            f"{settings.image_size}x{settings.image_size} px, batch {settings.batch_size}, AdamW lr {settings.lr:g}, "
            f"head lr {settings.head_lr:g}, linear decay), then BatchNorm statistics re-estimated on "
            f"{settings.bn_examples} training images; one head `{self.model.head}` per task, kept in full precision by "
            f"every method. Grey images resized and repeated to 3 channels, normalised (x - 127) / 128. Images per "
            f"task: up to {cfg.max_train} train / {cfg.max_validation} validation / {cfg.max_test} test (seed "
            f"{cfg.seed}). Merges: task vectors without BatchNorm running statistics; a merged network's statistics "
            f"are re-estimated on {cfg.recalibration_examples} unlabelled training images per task (all tasks mixed "
            f"for static merges, the task's own for EMR) and stored. Test batches of {cfg.eval_batch_size} mix all "
            "tasks (shuffled). A sample is correct only if its own task's head answered and the label is right."
        )

    def report(self, seconds: float) -> dict[str, Any]:
        config = asdict(self.config)
        for key in ("out_dir", "cache_dir"):
            config[key] = portable_path(config[key])
        return {
            "benchmark": "switch-adapter multi-task benchmark",
            "kind": "vision",
            "command": self.command,
            "suite": self.config.name,
            "config": config,
            "model": self.model.label,
            "setup": self.setup_text(),
            "tasks": [
                {
                    "name": t.name,
                    "classes": t.class_names,
                    "source": t.source,
                    "train": len(t.train),
                    "validation": len(t.validation),
                    "test": len(t.test),
                    "finetune": f.record,
                }
                for t, f in zip(self.suite, self.finetuned)
            ],  # fmt: skip
            "skipped_tasks": self.skipped,
            "not_run": self.not_run,
            "storage_target_pct": STORAGE_TARGET_PCT,
            "fp32_task_vector_bytes": self.fp32_bytes,
            "reference_eval_seconds": self.reference_seconds,
            "rows": [asdict(row) for row in self.rows],
            "notes": self.notes,
            "seconds": round(seconds, 1),
            "environment": self.software,
        }


def run_vision_benchmark(
    config: VisionBenchConfig,
    model: VisionModel | None = None,
    loader: Callable[[str, int], ImageTask] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Load the image tasks, run every row, write ``benchmark.md``, ``benchmark.json`` and ``benchmark.png`` into
    ``config.out_dir``; returns the report (with the output paths under ``"outputs"``). ``model``: None for
    EfficientNet-Lite0."""
    from . import report as report_module

    start = time.perf_counter()
    model = model or efficientnet_lite0()
    suite, skipped = load_vision_suite(config.tasks, config, loader)
    bench = VisionBenchmark(config, suite, model, skipped)
    bench.command = command
    result = bench.run()
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["outputs"] = report_module.write_report(result, config.out_dir)
    return result
