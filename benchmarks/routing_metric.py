"""Auto-Switch routing metric study: how accurate is k-NN routing per metric, query-set size and feature layer, and do
the defaults (layer and metric chosen by cross-validation on the query sets) hold up?

Routing accuracy is the share of test inputs whose k-NN top task (k=10, the library's tie rule) is their own task,
computed with the library's own functions (:mod:`switch_adapter.autoswitch.knn`, ``metric.fit_metric``,
``index.choose``, ``features.FeatureExtractor`` and ``features.tokenize``). Query features are rounded to fp16, as the
router stores them; test features stay fp32, as the router computes them.

Part A, all-MiniLM-L6-v2 on the 8 text tasks of the suite (mean pooling, truncation 64, layers 1..6), per split
seed: a pool of the first 1000 training texts per task (the split is shuffled by the seed) and the first 300 test
texts per task.

1. Accuracy against the query-set size per task (nested seeded draws from the pool) for the metrics euclidean,
   cosine, learned (LDA; NCA only up to ``--nca-max-size``) and ``auto`` (``AutoSwitchConfig()`` defaults: metric and
   layer chosen together), each at the layer that ``index.choose`` picks from the query set alone and at the best
   fixed layer in hindsight (test accuracy); a linear probe (standardised features + logistic regression, same
   query examples, the default's chosen layer) as a reference ceiling.
2. Wall times of fitting the learned metric and of the cross-validated choice, and the cost of routing a batch of
   64 with the learned metric (projection + k-NN in the projected space) relative to plain k-NN.
3. Held-out tasks: random 4-task subsets routed with the defaults at 300 examples versus the best fixed
   (layer, metric) in hindsight per subset.
4. The confusion matrix of the defaults at 300 examples (first seed).

Part B, SmolLM2-135M-Instruct (``--llm``; on by default without ``--quick``): prompts of 4 generative tasks, with a
task instruction or the raw input, chat-templated (one user turn with the generation prompt); query sets of 20, 50
and 100 prompts per task from train, 50 test prompts per task. The default choice (candidate layers + the
``feature_depth`` layer, metric auto) versus every fixed (layer, metric), and the template mismatch (query plain,
test templated, and the reverse).

Features are cached per task and seed under ``$SWITCH_ADAPTER_CACHE/routing_metric`` (reruns skip the forward
passes). Results: ``<out>.json`` (everything, with command, settings, seeds and versions), ``<out>.md`` and
``<out>.png``.

Usage (from the repository root)::

    python -m benchmarks.routing_metric                  # full study: 8 tasks x 3 seeds, and SmolLM2
    python -m benchmarks.routing_metric --quick          # 1 seed, 3 tasks, 100 train texts, no SmolLM2
    python -m benchmarks.routing_metric --quick --llm    # ... with SmolLM2
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from switch_adapter.autoswitch import knn
from switch_adapter.autoswitch.config import AutoSwitchConfig
from switch_adapter.autoswitch.index import choose
from switch_adapter.autoswitch.metric import fit_metric
from switch_adapter.autoswitch.selection import FeatureChoice, candidate_layers

from .environment import command_line, environment

logger = logging.getLogger("benchmarks.routing_metric")

RESULTS = Path(__file__).resolve().parent / "results" / "routing_metric"
DEFAULT_SIZES = (25, 50, 100, 200, 300, 500, 1000)
QUICK_SIZES = (25, 50, 100)
# name -> (AutoSwitchConfig.metric, AutoSwitchConfig.metric_objective)
VARIANTS: dict[str, tuple[str, str]] = {
    "euclidean": ("euclidean", "lda"),
    "cosine": ("cosine", "lda"),
    "learned-lda": ("learned", "lda"),
    "learned-nca": ("learned", "nca"),
    "auto": ("auto", "lda"),
}
# The fixed (metric) options the default chooses among; "learned" is the LDA variant (the default objective).
FIXED_METRICS = {"learned": "learned-lda", "cosine": "cosine", "euclidean": "euclidean"}
LLM_TASKS: dict[str, str] = {  # task -> the fixed instruction of its prompts
    "trec": "What type of question is this (abbreviation, description, entity, human, location or number)?",
    "sms_spam": "Is this SMS message spam? Answer yes or no.",
    "language_id": "Which language is this text written in?",
    "wordnet_supersense": "Which WordNet supersense (e.g. noun.animal, noun.food) does this definition describe?",
}
LLM_STYLES = ("instruction", "raw")


@dataclass(frozen=True)
class Settings:
    """Everything the study measures (recorded in the result file)."""

    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    sizes: tuple[int, ...]
    pool: int = 1000
    test: int = 300
    max_length: int = 64
    nca_max_size: int = 100
    nca_seeds: tuple[int, ...] = (0,)
    default_size: int = 300
    subsets: int = 6
    subset_tasks: int = 4
    subset_seed: int = 0
    fit_sizes: tuple[int, ...] = (100, 300, 1000)
    nca_fit_sizes: tuple[int, ...] = (100, 300)
    cost_batch: int = 64
    cost_repeats: int = 30
    llm: bool = True
    llm_seeds: tuple[int, ...] = (0,)
    llm_tasks: tuple[str, ...] = tuple(LLM_TASKS)
    llm_sizes: tuple[int, ...] = (20, 50, 100)
    llm_test: int = 50
    llm_max_length: int = 128
    llm_text_tokens: int = 64
    config: dict[str, Any] = field(default_factory=lambda: AutoSwitchConfig().to_dict())


# ----------------------------------------------------------------------------------------------------
# Routing (the library's functions, on precomputed features)
# ----------------------------------------------------------------------------------------------------


DEFAULT_RANK_LABEL = "default (32, capped at the feature size)"


def config_for(variant: str) -> AutoSwitchConfig:
    metric, objective = VARIANTS[variant]
    return AutoSwitchConfig(metric=metric, metric_objective=objective)


def route(
    bank: torch.Tensor, bank_labels: torch.Tensor, probe: torch.Tensor, num_tasks: int, metric: str, k: int
) -> torch.Tensor:
    """Top task per row of ``probe`` by k-NN among ``bank`` (``metric``: a plain distance), the router's tie rule."""
    _, index = knn.nearest(probe, bank, k, metric)
    neighbours = bank_labels[index]
    return knn.top_tasks(knn.task_weights(neighbours, num_tasks), neighbours)


def routed(
    query: torch.Tensor,
    labels: torch.Tensor,
    test: torch.Tensor,
    tasks: Sequence[str],
    metric: str,
    config: AutoSwitchConfig,
) -> torch.Tensor:
    """Test predictions with ``metric`` (``"learned"``: fitted on ``query`` as the router fits it)."""
    if metric == "learned":
        learned = fit_metric(
            query, labels, list(tasks), config.metric_objective, config.resolve_metric_rank(query.shape[1]), config.seed
        )
        return route(learned.project(query), labels, learned.project(test), len(tasks), "euclidean", config.k)
    return route(query, labels, test, len(tasks), metric, config.k)


def accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float((predicted == truth).float().mean())


def fixed_accuracies(
    query: Mapping[int, torch.Tensor],
    labels: torch.Tensor,
    test: Mapping[int, torch.Tensor],
    test_labels: torch.Tensor,
    tasks: Sequence[str],
    variant: str,
) -> dict[int, float]:
    """Test accuracy of ``variant``'s metric at every layer of ``query``."""
    config = config_for(variant)
    return {
        layer: accuracy(routed(query[layer], labels, test[layer], tasks, config.metric, config), test_labels)
        for layer in sorted(query)
    }


def best_fixed(scores: Mapping[str, Mapping[int, float]]) -> dict[str, Any]:
    """The best (metric, layer) of ``scores[metric][layer]``: highest accuracy, then shallower layer."""
    metric, layer = max(
        ((m, layer) for m, per_layer in scores.items() for layer in per_layer),
        key=lambda ml: (scores[ml[0]][ml[1]], -ml[1]),
    )
    return {"metric": metric, "layer": layer, "accuracy": scores[metric][layer]}


def rank_of(value: float, scores: Mapping[str, Mapping[int, float]]) -> int:
    """1 + the number of fixed options strictly more accurate than ``value``."""
    return 1 + sum(v > value + 1e-12 for per_layer in scores.values() for v in per_layer.values())


def confusion(predicted: torch.Tensor, truth: torch.Tensor, num_tasks: int) -> list[list[int]]:
    """``counts[true][routed]``."""
    counts = torch.zeros(num_tasks, num_tasks, dtype=torch.long)
    counts.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    return counts.tolist()


def probe_accuracy(query: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor) -> float:
    """Linear probe: standardised features + multinomial logistic regression, fitted on the query examples."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(query.double().numpy(), labels.numpy())
    return float((model.predict(test.double().numpy()) == test_labels.numpy()).mean())


def draw(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Row indices of ``size`` examples per task: a seeded permutation of each task's rows, its first ``size``
    (so smaller query sets are subsets of larger ones)."""
    chosen = []
    for task in range(int(labels.max()) + 1):
        members = (labels == task).nonzero().squeeze(1)
        generator = torch.Generator().manual_seed(1000 * seed + task)
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:size]])
    return torch.cat(chosen)


def restrict(features: Mapping[int, torch.Tensor], labels: torch.Tensor, keep: Sequence[int]):
    """The rows of tasks ``keep`` (indices), relabelled 0..len(keep)-1."""
    rows = torch.cat([(labels == task).nonzero().squeeze(1) for task in keep])
    relabel = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    relabel[torch.as_tensor(list(keep))] = torch.arange(len(keep))
    return {layer: values[rows] for layer, values in features.items()}, relabel[labels[rows]]


@dataclass
class Features:
    """Per-layer features of a query pool (fp16 values, as the router stores them) and of test inputs (fp32)."""

    tasks: list[str]
    pool: dict[int, torch.Tensor]
    pool_labels: torch.Tensor
    test: dict[int, torch.Tensor]
    test_labels: torch.Tensor
    computed: list[dict[str, Any]] = field(default_factory=list)  # where the features came from (cache or not)


def size_run(data: Features, size: int, seed: int, settings: Settings, with_probe: bool = True) -> dict[str, Any]:
    """Part A.1 at one query-set size: every variant's cross-validated choice and its test accuracy at every layer."""
    rows = draw(data.pool_labels, size, seed)
    query = {layer: values[rows].float() for layer, values in data.pool.items()}
    labels = data.pool_labels[rows]
    out: dict[str, Any] = {"seed": seed, "size": size, "variants": {}}
    fixed = {
        name: fixed_accuracies(query, labels, data.test, data.test_labels, data.tasks, name)
        for name in FIXED_METRICS.values()
    }
    start = time.perf_counter()
    default_choice = choose(query, labels, data.tasks, AutoSwitchConfig())
    default_seconds = time.perf_counter() - start
    for variant in ("auto", *FIXED_METRICS.values(), "learned-nca"):
        if variant == "learned-nca":
            if size > settings.nca_max_size or seed not in settings.nca_seeds:
                continue
            start = time.perf_counter()
            choice = choose(query, labels, data.tasks, config_for(variant))
            seconds = time.perf_counter() - start
            fixed[variant] = fixed_accuracies(query, labels, data.test, data.test_labels, data.tasks, variant)
        elif variant == "auto":
            choice, seconds = default_choice, default_seconds
        else:  # the same cross-validation scores as the defaults' choice: no need to compute them again
            choice, seconds = single_metric_choice(default_choice, VARIANTS[variant][0]), None
        if variant == "auto":
            scores = {metric: fixed[name] for metric, name in FIXED_METRICS.items()}
        else:
            scores = {choice.metric: fixed[variant]}
        best = best_fixed(scores)
        out["variants"][variant] = {
            "chosen_layer": choice.layer,
            "chosen_metric": choice.metric,
            "cv_accuracy": choice.accuracy,
            "test_accuracy": scores[choice.metric][choice.layer],
            "best_layer": best["layer"],
            "best_metric": best["metric"],
            "best_accuracy": best["accuracy"],
            "rank": rank_of(scores[choice.metric][choice.layer], scores),
            "test_by_layer": {str(layer): value for layer, value in scores[choice.metric].items()},
            "cv_scores": {m: {str(layer): v for layer, v in s.items()} for m, s in choice.scores.items()},
            "choice_seconds": seconds,
        }
    default = out["variants"]["auto"]
    layer = default["chosen_layer"]
    if with_probe:
        out["probe"] = {
            "layer": layer,
            "test_accuracy": probe_accuracy(query[layer], labels, data.test[layer], data.test_labels),
        }
    if size == settings.default_size:
        predicted = routed(
            query[layer], labels, data.test[layer], data.tasks, default["chosen_metric"], AutoSwitchConfig()
        )
        out["confusion"] = confusion(predicted, data.test_labels, len(data.tasks))
    return out


def single_metric_choice(choice: FeatureChoice, metric: str) -> FeatureChoice:
    """What ``choose_features(..., metrics=[metric])`` picks, from the scores of a choice among several metrics
    (the same cross-validation: same folds, k, rank and seed): the cheapest layer within the tolerance of that
    metric's best score."""
    scores = {metric: choice.scores[metric]}
    best = max(scores[metric].values())
    layer = min(layer for layer, value in scores[metric].items() if value >= best - choice.tolerance)
    return FeatureChoice(layer, metric, scores, choice.tolerance, choice.folds, choice.examples)


def subset_run(data: Features, keep: Sequence[int], seed: int, settings: Settings) -> dict[str, Any]:
    """Part A.3: the defaults on the tasks ``keep`` at ``settings.default_size`` against every fixed option."""
    pool, pool_labels = restrict(data.pool, data.pool_labels, keep)
    test, test_labels = restrict(data.test, data.test_labels, keep)
    tasks = [data.tasks[i] for i in keep]
    rows = draw(pool_labels, settings.default_size, seed)
    query = {layer: values[rows].float() for layer, values in pool.items()}
    labels = pool_labels[rows]
    scores = {
        metric: fixed_accuracies(query, labels, test, test_labels, tasks, name)
        for metric, name in FIXED_METRICS.items()
    }
    choice = choose(query, labels, tasks, AutoSwitchConfig())
    value = scores[choice.metric][choice.layer]
    return {
        "tasks": tasks,
        "seed": seed,
        "default": {"layer": choice.layer, "metric": choice.metric, "test_accuracy": value},
        "best_fixed": best_fixed(scores),
        "rank": rank_of(value, scores),
        "options": sum(len(s) for s in scores.values()),
    }


def task_subsets(num_tasks: int, count: int, size: int, seed: int) -> list[list[int]]:
    """``count`` distinct random ``size``-task subsets (sorted task indices), drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    every = list(itertools.combinations(range(num_tasks), size))
    order = torch.randperm(len(every), generator=generator)[: min(count, len(every))].tolist()
    return [list(every[i]) for i in order]


def timings(data: Features, layer: int, settings: Settings) -> dict[str, Any]:
    """Part A.2: fit times of the learned metric, time of the default choice, and routing cost ratios."""
    from .routing import interleaved

    config = AutoSwitchConfig()
    out: dict[str, Any] = {"layer": layer, "fit_seconds": {"lda": {}, "nca": {}}, "choice_seconds": {}}
    available = int(torch.bincount(data.pool_labels).min())
    for size in settings.fit_sizes:
        if size > available:
            continue
        rows = draw(data.pool_labels, size, 0)
        x, y = data.pool[layer][rows].float(), data.pool_labels[rows]
        for objective in ("lda", "nca"):
            if objective == "nca" and size not in settings.nca_fit_sizes:
                continue
            repeats = 3 if objective == "lda" else 1
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                fit_metric(x, y, data.tasks, objective, config.resolve_metric_rank(x.shape[1]), config.seed)
                seconds.append(time.perf_counter() - start)
            out["fit_seconds"][objective][str(size)] = min(seconds)
            logger.info("fit %s, %d per task: %.2f s", objective, size, min(seconds))
        query = {key: values[rows].float() for key, values in data.pool.items()}
        start = time.perf_counter()
        choose(query, y, data.tasks, config)
        out["choice_seconds"][str(size)] = time.perf_counter() - start
        logger.info("default choice, %d per task: %.2f s", size, out["choice_seconds"][str(size)])
    size = min(settings.default_size, available)
    rows = draw(data.pool_labels, size, 0)
    bank, labels = data.pool[layer][rows].float(), data.pool_labels[rows]
    batch = data.test[layer][: settings.cost_batch]
    learned = fit_metric(bank, labels, data.tasks, "lda", config.resolve_metric_rank(bank.shape[1]), config.seed)
    projected = learned.project(bank)  # the router stores the bank projected
    num = len(data.tasks)
    calls = {
        "learned": lambda: route(projected, labels, learned.project(batch), num, "euclidean", config.k),
        "euclidean": lambda: route(bank, labels, batch, num, "euclidean", config.k),
        "cosine": lambda: route(bank, labels, batch, num, "cosine", config.k),
    }
    measured = interleaved(calls, settings.cost_repeats, warmup=3)
    out["cost"] = {
        "bank_examples": int(bank.shape[0]),
        "batch": int(batch.shape[0]),
        "feature_size": int(bank.shape[1]),
        "learned_rank": learned.rank,
        "repeats": settings.cost_repeats,
        "seconds_min": {name: measured[name] for name in calls},
        "seconds_median": {name: measured[f"{name}:median"] for name in calls},
        "cpu1_seconds_min": {name: measured[f"{name}:cpu1"] for name in calls},
        "ratio_learned_over_euclidean": measured["learned"] / measured["euclidean"],
        "ratio_learned_over_cosine": measured["learned"] / measured["cosine"],
        "ratio_cpu1_learned_over_euclidean": measured["learned:cpu1"] / measured["euclidean:cpu1"],
        "ratio_cpu1_learned_over_cosine": measured["learned:cpu1"] / measured["cosine:cpu1"],
    }
    return out


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------


def layer_features(
    model: Any, tokenizer: Any, texts: Sequence[str], layers: Sequence[int], max_length: int, chat_template: bool,
    batch_size: int = 64,
) -> dict[int, torch.Tensor]:  # fmt: skip
    """fp32 mean-pooled features of ``texts`` at every layer of ``layers``, one forward pass per batch, tokenized
    and pooled as the router does (``features.tokenize``, ``FeatureExtractor.extract``); texts are batched by length
    (mean pooling ignores padding) and returned in their order."""
    from switch_adapter.autoswitch.features import FeatureExtractor, FeatureSpec, tokenize

    config = model.config
    spec = FeatureSpec(max(layers), "mean", config.num_hidden_layers, config.hidden_size, "")
    extractor = FeatureExtractor(model, spec)
    formatted = list(texts)
    order = sorted(range(len(formatted)), key=lambda i: len(formatted[i]))
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(order), batch_size):
        chunk = [formatted[i] for i in order[start : start + batch_size]]
        batch = tokenize(chunk, tokenizer, max_length, chat_template=chat_template)
        for layer, values in extractor.extract(batch, layers).items():
            parts[layer].append(values.float().cpu())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.as_tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {layer: torch.cat(chunks)[inverse] for layer, chunks in parts.items()}


def _cached(path: Path, compute) -> dict:
    """``compute()`` (a dict), saved to ``path`` once; ``"seconds"``: the wall time it took when computed,
    ``"cached"``: whether this call read it from ``path``."""
    if path.exists():
        try:
            return torch.load(path, weights_only=True) | {"cached": True}
        except Exception as error:  # noqa: BLE001 - a broken cache file is recomputed
            logger.warning("Ignoring unreadable feature cache %s (%s).", path.name, error)
    start = time.perf_counter()
    value = compute()
    value["seconds"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(value, temporary)
    temporary.replace(path)
    return value | {"cached": False}


def feature_cache() -> Path:
    from .tasks import cache_dir

    return cache_dir() / "routing_metric"


def minilm_features(settings: Settings, seed: int, model: Any, tokenizer: Any) -> Features:
    """Part A features of every task for split ``seed`` (cached per task)."""
    from .tasks import load_task

    layers = list(range(1, model.config.num_hidden_layers + 1))
    pool, test, pool_labels, test_labels, computed = [], [], [], [], []
    for index, task in enumerate(settings.tasks):
        name = f"minilm-{task}-seed{seed}-pool{settings.pool}-test{settings.test}-len{settings.max_length}.pt"

        def compute(task: str = task) -> dict:
            splits = load_task(task, seed=seed, max_train=settings.pool, max_test=settings.test)
            logger.info("MiniLM features of %s (seed %d) ...", task, seed)
            train = layer_features(model, tokenizer, splits["train"]["text"], layers, settings.max_length, False)
            held = layer_features(model, tokenizer, splits["test"]["text"], layers, settings.max_length, False)
            return {"pool": {k: v.half() for k, v in train.items()}, "test": held}

        values = _cached(feature_cache() / name, compute)
        computed.append({"task": task, "seed": seed, "cached": values["cached"],
                         "compute_seconds": round(float(values.get("seconds", math.nan)), 1)})  # fmt: skip
        pool.append(values["pool"])
        test.append(values["test"])
        pool_labels.append(torch.full((values["pool"][layers[0]].shape[0],), index, dtype=torch.long))
        test_labels.append(torch.full((values["test"][layers[0]].shape[0],), index, dtype=torch.long))
    return Features(
        list(settings.tasks),
        {layer: torch.cat([p[layer] for p in pool]) for layer in layers},
        torch.cat(pool_labels),
        {layer: torch.cat([t[layer] for t in test]).float() for layer in layers},
        torch.cat(test_labels),
        computed,
    )


def llm_prompt(task: str, text: str, style: str) -> str:
    return f"{LLM_TASKS[task]}\n\n{text}" if style == "instruction" else text


def llm_layers(num_layers: int) -> list[int]:
    """The layers the router compares with ``feature_layer="auto"``: candidates + the feature_depth layer."""
    return sorted(set(candidate_layers(num_layers)) | {AutoSwitchConfig().resolve_feature_layer(num_layers)})


def llm_features(settings: Settings, seed: int, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Part B features for split ``seed``: ``{style: {"templated"|"plain": Features}}`` (cached per seed)."""
    from .tasks import load_task

    layers = llm_layers(model.config.num_hidden_layers)
    pool_n, test_n = max(settings.llm_sizes), settings.llm_test
    name = (
        f"smollm2-seed{seed}-pool{pool_n}-test{test_n}-len{settings.llm_max_length}-cut{settings.llm_text_tokens}-"
        f"{'_'.join(settings.llm_tasks)}.pt"
    )

    def cut(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= settings.llm_text_tokens else tokenizer.decode(ids[: settings.llm_text_tokens])

    def compute() -> dict:
        texts = {"train": [], "test": []}
        for task in settings.llm_tasks:
            splits = load_task(task, seed=seed, max_train=pool_n, max_test=test_n)
            texts["train"] += [(task, cut(t)) for t in splits["train"]["text"]]
            texts["test"] += [(task, cut(t)) for t in splits["test"]["text"]]
        out: dict[str, Any] = {}
        for style in LLM_STYLES:
            for templated in (True, False):
                logger.info("SmolLM2 features (seed %d, %s, templated=%s) ...", seed, style, templated)
                out[f"{style}/{templated}"] = {
                    split: layer_features(
                        model,
                        tokenizer,
                        [llm_prompt(task, t, style) for task, t in items],
                        layers,
                        settings.llm_max_length,
                        templated,
                        batch_size=32,
                    )  # fmt: skip
                    for split, items in texts.items()
                }
        out["train_labels"] = torch.tensor([settings.llm_tasks.index(task) for task, _ in texts["train"]])
        out["test_labels"] = torch.tensor([settings.llm_tasks.index(task) for task, _ in texts["test"]])
        return out

    values = _cached(feature_cache() / name, compute)
    result: dict[str, Any] = {
        "computed": {"seed": seed, "cached": values["cached"],
                     "compute_seconds": round(float(values.get("seconds", math.nan)), 1)}
    }  # fmt: skip
    for style in LLM_STYLES:
        result[style] = {}
        for templated in (True, False):
            pair = values[f"{style}/{templated}"]
            result[style]["templated" if templated else "plain"] = Features(
                list(settings.llm_tasks),
                {layer: v.half() for layer, v in pair["train"].items()},
                values["train_labels"],
                {layer: v.float() for layer, v in pair["test"].items()},
                values["test_labels"],
            )
    return result


def llm_run(views: Mapping[str, Features], size: int, seed: int) -> dict[str, Any]:
    """Part B at one query-set size (one prompt style): default vs fixed options, and the template mismatch."""
    matched = views["templated"]
    rows = draw(matched.pool_labels, size, seed)
    labels = matched.pool_labels[rows]

    def query_of(data: Features) -> dict[int, torch.Tensor]:
        return {layer: values[rows].float() for layer, values in data.pool.items()}

    query = query_of(matched)
    scores = {
        metric: fixed_accuracies(query, labels, matched.test, matched.test_labels, matched.tasks, name)
        for metric, name in FIXED_METRICS.items()
    }
    choice = choose(query, labels, matched.tasks, AutoSwitchConfig())
    value = scores[choice.metric][choice.layer]
    out: dict[str, Any] = {
        "seed": seed,
        "size": size,
        "default": {"layer": choice.layer, "metric": choice.metric, "test_accuracy": value,
                    "cv_accuracy": choice.accuracy},
        "best_fixed": best_fixed(scores),
        "rank": rank_of(value, scores),
        "options": sum(len(s) for s in scores.values()),
        "fixed": {m: {str(layer): v for layer, v in s.items()} for m, s in scores.items()},
        "mismatch": {},
    }  # fmt: skip
    picks = {"templated": (query, choice)}
    for query_view, test_view in (("plain", "templated"), ("templated", "plain"), ("plain", "plain")):
        if query_view not in picks:
            q = query_of(views[query_view])
            picks[query_view] = (q, choose(q, labels, matched.tasks, AutoSwitchConfig()))
        q, picked = picks[query_view]
        test = views[test_view]
        predicted = routed(
            q[picked.layer], labels, test.test[picked.layer], matched.tasks, picked.metric, AutoSwitchConfig()
        )
        out["mismatch"][f"query_{query_view}/test_{test_view}"] = {
            "layer": picked.layer,
            "metric": picked.metric,
            "test_accuracy": accuracy(predicted, test.test_labels),
        }
    return out


# ----------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float]:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values) if values else math.nan,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarise_sizes(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per variant and size: mean/std over seeds of the test accuracy at the chosen and at the best layer."""
    summary: dict[str, Any] = {}
    sizes = sorted({run["size"] for run in runs})
    for variant in VARIANTS:
        per_size = {}
        for size in sizes:
            found = [run["variants"][variant] for run in runs if run["size"] == size and variant in run["variants"]]
            if not found:
                continue
            per_size[str(size)] = {
                "chosen": mean_std([f["test_accuracy"] for f in found]),
                "best": mean_std([f["best_accuracy"] for f in found]),
                "gap": mean_std([f["best_accuracy"] - f["test_accuracy"] for f in found]),
                "chosen_layers": [f["chosen_layer"] for f in found],
                "chosen_metrics": [f["chosen_metric"] for f in found],
                "best_layers": [f["best_layer"] for f in found],
                "best_metrics": [f["best_metric"] for f in found],
                "choice_seconds": mean_std([f["choice_seconds"] for f in found if f["choice_seconds"] is not None]),
            }
        summary[variant] = per_size
    probe = {}
    for size in sizes:
        found = [run["probe"]["test_accuracy"] for run in runs if run["size"] == size and "probe" in run]
        if found:
            probe[str(size)] = mean_std(found)
    summary["probe"] = probe
    return summary


def summarise_subsets(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for tasks in dict.fromkeys(tuple(run["tasks"]) for run in runs):
        found = [run for run in runs if tuple(run["tasks"]) == tasks]
        rows.append({
            "tasks": list(tasks),
            "default": mean_std([r["default"]["test_accuracy"] for r in found]),
            "best_fixed": mean_std([r["best_fixed"]["accuracy"] for r in found]),
            "gap": mean_std([r["best_fixed"]["accuracy"] - r["default"]["test_accuracy"] for r in found]),
            "ranks": [r["rank"] for r in found],
            "options": found[0]["options"],
            "default_choices": [f"{r['default']['metric']}@{r['default']['layer']}" for r in found],
            "best_choices": [f"{r['best_fixed']['metric']}@{r['best_fixed']['layer']}" for r in found],
        })  # fmt: skip
    return rows


def summarise_llm(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for style in LLM_STYLES:
        per_size = {}
        for size in sorted({run["size"] for run in runs}):
            found = [run for run in runs if run["style"] == style and run["size"] == size]
            if not found:
                continue
            keys = list(found[0]["mismatch"])
            per_size[str(size)] = {
                "default": mean_std([r["default"]["test_accuracy"] for r in found]),
                "best_fixed": mean_std([r["best_fixed"]["accuracy"] for r in found]),
                "gap": mean_std([r["best_fixed"]["accuracy"] - r["default"]["test_accuracy"] for r in found]),
                "ranks": [r["rank"] for r in found],
                "options": found[0]["options"],
                "default_choices": [f"{r['default']['metric']}@{r['default']['layer']}" for r in found],
                "best_choices": [f"{r['best_fixed']['metric']}@{r['best_fixed']['layer']}" for r in found],
                "mismatch": {key: mean_std([r["mismatch"][key]["test_accuracy"] for r in found]) for key in keys},
                "mismatch_choices": {
                    key: [f"{r['mismatch'][key]['metric']}@{r['mismatch'][key]['layer']}" for r in found]
                    for key in keys
                },
            }
        if per_size:
            summary[style] = per_size
    return summary


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _pm(stats: Mapping[str, float] | None, scale: float = 100.0) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "-"
    if stats["n"] == 1:
        return f"{scale * stats['mean']:.1f}"
    return f"{scale * stats['mean']:.1f} ± {scale * stats['std']:.1f}"


def _layers(values: Sequence[Any]) -> str:
    return ",".join(str(v) for v in values)


def findings(report: Mapping[str, Any]) -> list[str]:
    """Statements that the numbers of ``report`` show (computed, not written by hand)."""
    lines = []
    sizes = report.get("size_summary", {})
    auto = sizes.get("auto", {})
    default_size = str(report["settings"]["default_size"])
    if default_size in auto:
        row = auto[default_size]
        lines.append(
            f"MiniLM, {default_size} examples per task: the defaults route {_pm(row['chosen'])} % of test inputs to "
            f"their task; the best fixed (metric, layer) in hindsight {_pm(row['best'])} %; linear probe "
            f"{_pm(sizes.get('probe', {}).get(default_size))} %."
        )
    learned, cosine = sizes.get("learned-lda", {}), sizes.get("cosine", {})
    common = [s for s in learned if s in cosine]
    if common:
        better = [s for s in common if learned[s]["chosen"]["mean"] > cosine[s]["chosen"]["mean"]]
        worse = [s for s in common if learned[s]["chosen"]["mean"] < cosine[s]["chosen"]["mean"]]
        lines.append(
            "Learned (LDA) vs cosine, each at its cross-validated layer, mean over seeds: learned higher at "
            f"{_layers(better) or 'no'} examples per task, lower at {_layers(worse) or 'no'}."
        )
    nca, lda = sizes.get("learned-nca", {}), sizes.get("learned-lda", {})
    both = [s for s in nca if s in lda]
    if both:
        diffs = [100 * (nca[s]["chosen"]["mean"] - lda[s]["chosen"]["mean"]) for s in both]
        lines.append(
            f"NCA minus LDA (chosen layers) over {_layers(both)} examples per task: "
            + ", ".join(f"{d:+.1f}" for d in diffs)
            + " points."
        )
    gaps = [
        (100 * row["gap"]["mean"], variant, size)
        for variant, per_size in sizes.items()
        if variant != "probe"
        for size, row in per_size.items()
    ]
    if gaps:
        worst = max(gaps)
        lines.append(
            "Cross-validated layer choice vs the best layer in hindsight: mean loss at most "
            f"{worst[0]:.2f} points ({worst[1]}, {worst[2]} examples per task); mean over all cells "
            f"{statistics.fmean(g[0] for g in gaps):.2f} points."
        )
    timing = report.get("timings")
    if timing:
        cost = timing["cost"]
        lines.append(
            f"Routing a batch of {cost['batch']} against {cost['bank_examples']} query examples: learned metric / "
            f"plain euclidean = {cost['ratio_learned_over_euclidean']:.2f}, / cosine = "
            f"{cost['ratio_learned_over_cosine']:.2f} (wall, min of {cost['repeats']})."
        )
    subsets = report.get("subsets_summary")
    if subsets:
        gaps = [100 * row["gap"]["mean"] for row in subsets]
        first = sum(1 for row in subsets if all(r == 1 for r in row["ranks"]))
        lines.append(
            f"Held-out {report['settings']['subset_tasks']}-task subsets ({len(subsets)}): the defaults are "
            f"{statistics.fmean(gaps):.2f} points below the "
            f"best fixed option in hindsight on average (worst {max(gaps):.2f}); ranked first on every seed in "
            f"{first} of {len(subsets)} subsets."
        )
    llm = report.get("llm_summary") or {}
    for style, per_size in llm.items():
        for size, row in per_size.items():
            mismatch = row["mismatch"]
            lines.append(
                f"SmolLM2, {style} prompts, {size} per task: default {_pm(row['default'])} % vs best fixed "
                f"{_pm(row['best_fixed'])} % (ranks {_layers(row['ranks'])} of {row['options']}); query plain / test "
                f"templated {_pm(mismatch['query_plain/test_templated'])} %, query templated / test plain "
                f"{_pm(mismatch['query_templated/test_plain'])} %, both plain "
                f"{_pm(mismatch['query_plain/test_plain'])} %."
            )
    return lines


def markdown(report: Mapping[str, Any], plot_name: str | None) -> str:
    settings = report["settings"]
    sizes = report.get("size_summary", {})
    size_keys = [str(s) for s in settings["sizes"]]
    env = report["environment"]
    lines = [
        "# Auto-Switch routing metric study",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model (part A): {report['model']}; tasks: {', '.join(settings['tasks'])}; split seeds "
        f"{_layers(settings['seeds'])}; query pool {settings['pool']} train texts per task, test {settings['test']} "
        "per "
        f"task, truncation {settings['max_length']} tokens, mean pooling, layers 1..{report['num_layers']}. k = "
        f"{settings['config']['k']}; layer tolerance {settings['config']['layer_tolerance']}; learned rank "
        f"{settings['config']['metric_rank'] or DEFAULT_RANK_LABEL}. Routing accuracy: share of test inputs whose "
        "k-NN top task is their "
        "own, in %, mean ± std over split seeds. Query sets: nested seeded draws from the pool.",
        "",
        "## Accuracy vs query-set size, at the cross-validated layer",
        "",
        "Each metric at the layer `index.choose` picks from the query set alone (`auto`: metric and layer together, "
        "the defaults; euclidean, cosine and learned-lda: the cheapest layer within the tolerance of that metric's "
        "best cross-validated score, from the same cross-validation as the defaults, which is what `index.choose` "
        f"with that metric alone picks). learned-nca: split seeds {_layers(settings['nca_seeds'])} only, up to "
        f"{settings['nca_max_size']} examples per task (its fit is quadratic in the examples). Probe: logistic "
        "regression on the standardised features of the defaults' layer, same query examples.",
        "",
        "| metric | " + " | ".join(size_keys) + " |",
        "|---|" + "---|" * len(size_keys),
    ]
    for variant in [*VARIANTS, "probe"]:
        row = sizes.get(variant, {})
        cells = [_pm(row[s] if variant == "probe" else row[s]["chosen"]) if s in row else "-" for s in size_keys]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Accuracy at the best fixed layer in hindsight",
        "",
        "| metric | " + " | ".join(size_keys) + " |",
        "|---|" + "---|" * len(size_keys),
    ]
    for variant in VARIANTS:
        row = sizes.get(variant, {})
        lines.append(f"| {variant} | " + " | ".join(_pm(row[s]["best"]) if s in row else "-" for s in size_keys) + " |")
    lines += [
        "",
        "## Chosen and best layers (per seed)",
        "",
        "Cell: cross-validated choice / best in hindsight, one entry per seed (`auto`: metric@layer).",
        "",
        "| metric | " + " | ".join(size_keys) + " |",
        "|---|" + "---|" * len(size_keys),
    ]
    for variant in VARIANTS:
        row = sizes.get(variant, {})
        cells = []
        for s in size_keys:
            if s not in row:
                cells.append("-")
            elif variant == "auto":
                chosen = [f"{m[0]}@{layer}" for m, layer in zip(row[s]["chosen_metrics"], row[s]["chosen_layers"])]
                best = [f"{m[0]}@{layer}" for m, layer in zip(row[s]["best_metrics"], row[s]["best_layers"])]
                cells.append(f"{_layers(chosen)} / {_layers(best)}")
            else:
                cells.append(f"{_layers(row[s]['chosen_layers'])} / {_layers(row[s]['best_layers'])}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Metric initials: l = learned (LDA), c = cosine, e = euclidean.", ""]
    timing = report.get("timings")
    if timing:
        fit = timing["fit_seconds"]
        fit_sizes = sorted({int(s) for per in fit.values() for s in per} | {int(s) for s in timing["choice_seconds"]})
        lines += [
            "## Fit and choice times",
            "",
            f"Wall seconds on a shared 2-core machine (other jobs running), {len(settings['tasks'])} tasks x "
            "examples per task, features of "
            f"layer {timing['layer']}; LDA: min of 3, NCA and the choice: one run. The choice is `index.choose` with "
            "the defaults (every layer, metrics learned/cosine/euclidean, 5-fold cross-validation). NCA is fitted "
            f"at {_layers(settings['nca_fit_sizes'])} examples per task only: its cost grows with the square of the "
            "examples, which did not fit this run's time budget on the shared machine.",
            "",
            "| examples per task | " + " | ".join(str(s) for s in fit_sizes) + " |",
            "|---|" + "---|" * len(fit_sizes),
        ]
        for name, values in (
            ("fit LDA", fit["lda"]),
            ("fit NCA", fit["nca"]),
            ("default choice", timing["choice_seconds"]),
        ):
            lines.append(
                f"| {name} | "
                + " | ".join(f"{values[str(s)]:.2f}" if str(s) in values else "-" for s in fit_sizes)
                + " |"
            )
        cost = timing["cost"]
        lines += [
            "",
            f"Routing cost: top task of a batch of {cost['batch']} features against {cost['bank_examples']} query "
            f"examples (feature size {cost['feature_size']}, learned rank {cost['learned_rank']}), k-NN + weights + "
            f"tie rule; learned = projection of the batch + k-NN in the projected space (bank projected at build "
            f"time). Min of {cost['repeats']} interleaved repeats, same process.",
            "",
            "| | learned | euclidean | cosine |",
            "|---|---|---|---|",
            "| wall ms (min) | "
            + " | ".join(f"{1000 * cost['seconds_min'][n]:.3f}" for n in ("learned", "euclidean", "cosine"))
            + " |",
            "| CPU ms, 1 thread (min) | "
            + " | ".join(f"{1000 * cost['cpu1_seconds_min'][n]:.3f}" for n in ("learned", "euclidean", "cosine"))
            + " |",
            "",
            f"Ratio learned / euclidean: {cost['ratio_learned_over_euclidean']:.2f} (wall), "
            f"{cost['ratio_cpu1_learned_over_euclidean']:.2f} (CPU, 1 thread); learned / cosine: "
            f"{cost['ratio_learned_over_cosine']:.2f} (wall), {cost['ratio_cpu1_learned_over_cosine']:.2f} (CPU).",
            "",
        ]
    subsets = report.get("subsets_summary")
    if subsets:
        lines += [
            f"## Held-out task subsets ({settings['subset_tasks']} tasks, {settings['default_size']} examples per "
            "task)",
            "",
            "The defaults (layer and metric chosen on the query sets) against the best fixed (metric, layer) in "
            "hindsight on the test split, per subset; mean ± std over split seeds; rank of the defaults among all "
            "fixed options (1 = none better), per seed.",
            "",
            "| tasks | defaults | best fixed | gap (points) | ranks | defaults' choice | best fixed |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in subsets:
            lines.append(
                f"| {', '.join(row['tasks'])} | {_pm(row['default'])} | {_pm(row['best_fixed'])} | "
                f"{100 * row['gap']['mean']:.2f} | {_layers(row['ranks'])} of {row['options']} | "
                f"{_layers(row['default_choices'])} | {_layers(row['best_choices'])} |"
            )
        lines.append("")
    if report.get("confusion"):
        matrix = report["confusion"]
        tasks = settings["tasks"]
        lines += [
            f"## Confusion of the defaults ({settings['default_size']} examples per task, seed {settings['seeds'][0]})",
            "",
            "Row: true task; column: routed task; % of the row.",
            "",
            "| true \\ routed | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        for name, row in zip(tasks, matrix):
            total = max(1, sum(row))
            lines.append(f"| {name} | " + " | ".join(f"{100 * v / total:.1f}" for v in row) + " |")
        lines.append("")
    llm = report.get("llm_summary")
    lines.append("## SmolLM2-135M-Instruct")
    lines.append("")
    if not llm:
        lines += [report.get("llm_skipped", "Not measured."), ""]
    else:
        ls = report["llm_settings"]
        lines += [
            f"{report['llm_model']}; tasks {', '.join(settings['llm_tasks'])}; split seeds "
            f"{_layers(settings['llm_seeds'])} (mean ± std over them); {ls['num_layers']} layers, the "
            f"defaults compare layers {_layers(ls['layers'])} (candidate layers + the feature_depth layer) x metrics "
            f"learned/cosine/euclidean. Test: {settings['llm_test']} prompts per task; texts cut to "
            f"{settings['llm_text_tokens']} tokens, prompts truncated to {settings['llm_max_length']} tokens. "
            "Instructions: " + "; ".join(f"{t}: \"{i}\"" for t, i in LLM_TASKS.items() if t in settings["llm_tasks"])
            + ". Templated: one user turn with the generation prompt; plain: the prompt text as is.",
            "",
            "| prompts | per task | defaults | best fixed | ranks (of options) | defaults' choice | best fixed |",
            "|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for style, per_size in llm.items():
            for size, row in per_size.items():
                lines.append(
                    f"| {style} | {size} | {_pm(row['default'])} | {_pm(row['best_fixed'])} | "
                    f"{_layers(row['ranks'])} (of {row['options']}) | {_layers(row['default_choices'])} | "
                    f"{_layers(row['best_choices'])} |"
                )
        lines += [
            "",
            "Template mismatch at the defaults (choice made on the query features as they are):",
            "",
            "| prompts | per task | both templated | query plain, test templated | query templated, test plain | "
            "both plain |",
            "|---|---|---|---|---|---|",
        ]
        for style, per_size in llm.items():
            for size, row in per_size.items():
                m = row["mismatch"]
                lines.append(
                    f"| {style} | {size} | {_pm(row['default'])} | {_pm(m['query_plain/test_templated'])} | "
                    f"{_pm(m['query_templated/test_plain'])} | {_pm(m['query_plain/test_plain'])} |"
                )
        lines.append("")
    if plot_name:
        lines += ["## Figure", "", f"![routing accuracy and confusion]({plot_name})", ""]
    lines += ["## What this says", ""] + [f"- {line}" for line in findings(report)]
    times = report["seconds"]
    cache = [entry for entries in (report.get("feature_cache") or {}).values() for entry in entries]
    cached = [entry for entry in cache if entry["cached"]]
    lines += [
        "",
        f"Runtime: {times['total']:.0f} s wall on a shared machine ({env['cpu_count']} CPUs, {env['torch_threads']} "
        "torch threads); " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items() if k != "total")
        + f". switch-adapter {env['switch_adapter']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"scikit-learn {env.get('scikit-learn')}, commit {env['git_commit']}. Feature files read from the cache "
        f"(`$SWITCH_ADAPTER_CACHE/routing_metric`, made by the same code): {len(cached)} of {len(cache)}; computing "
        f"them took {sum(e['compute_seconds'] for e in cached):.0f} s when they were made (1 thread, same machine).",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: Path) -> Path | None:
    """Accuracy vs query-set size per metric (cross-validated layer, mean ± std) and the defaults' confusion."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning('matplotlib is not installed, so no plot was drawn: pip install "switch-adapter[bench]".')
        return None
    sizes = report["size_summary"]
    matrix = report.get("confusion")
    fig, axes = plt.subplots(1, 2 if matrix else 1, figsize=(13 if matrix else 6.5, 5), squeeze=False)
    ax = axes[0][0]
    for variant in [*VARIANTS, "probe"]:
        row = sizes.get(variant, {})
        keys = sorted(row, key=int)
        if not keys:
            continue
        stats = [row[k] if variant == "probe" else row[k]["chosen"] for k in keys]
        style = "--" if variant == "probe" else "-"
        ax.errorbar(
            [int(k) for k in keys], [100 * s["mean"] for s in stats], yerr=[100 * s["std"] for s in stats],
            label=variant if variant != "probe" else "linear probe (reference)", marker="o", linestyle=style,
            capsize=3,
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("query examples per task")
    ax.set_ylabel("routing accuracy on test (%)")
    ax.set_title(f"MiniLM, {len(report['settings']['tasks'])} tasks: k-NN routing at the cross-validated layer")
    ax.grid(True, which="both", linewidth=0.3, alpha=0.6)
    ax.legend(fontsize=8, loc="lower right")
    if matrix:
        ax = axes[0][1]
        tasks = report["settings"]["tasks"]
        shares = torch.tensor(matrix, dtype=torch.float64)
        shares = 100 * shares / shares.sum(1, keepdim=True).clamp(min=1)
        image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=100)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                value = float(shares[i, j])
                if value >= 0.5:
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value > 60 else "black")  # fmt: skip
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_xlabel("routed task")
        ax.set_ylabel("true task")
        ax.set_title(
            f"defaults, {report['settings']['default_size']} per task, seed {report['settings']['seeds'][0]} (% of row)"
        )
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: Path) -> None:
    """``<out>.json``, ``<out>.png`` (when matplotlib is installed and part A ran) and ``<out>.md``."""
    from .report import _atomic_write

    _atomic_write(out.with_suffix(".json"), (json.dumps(report, indent=2) + "\n").encode())
    drawn = plot(report, out.with_suffix(".png")) if report.get("size_summary") else None
    _atomic_write(out.with_suffix(".md"), markdown(report, drawn.name if drawn else None).encode())


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    out = {}
    for name in ("scikit-learn", "numpy", "matplotlib", "datasets"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def part_a(
    settings: Settings, report: dict[str, Any], seconds: dict[str, float], out: Path, features_only: bool = False
) -> None:
    from transformers import AutoModel, AutoTokenizer

    from .model import minilm_path, model_label

    path = minilm_path()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    report["model"] = model_label(None)
    report["num_layers"] = model.config.num_hidden_layers
    size_runs, subset_runs = [], []
    subsets = task_subsets(len(settings.tasks), settings.subsets, settings.subset_tasks, settings.subset_seed)
    for seed in settings.seeds:
        start = time.perf_counter()
        data = minilm_features(settings, seed, model, tokenizer)
        seconds["minilm_features"] = seconds.get("minilm_features", 0.0) + time.perf_counter() - start
        report.setdefault("feature_cache", {}).setdefault("minilm", []).extend(data.computed)
        if features_only:
            continue
        start = time.perf_counter()
        for size in settings.sizes:
            run = size_run(data, size, seed, settings)
            size_runs.append(run)
            auto = run["variants"]["auto"]
            logger.info(
                "seed %d, %d per task: defaults %s@%d %.4f (best %.4f)", seed, size, auto["chosen_metric"],
                auto["chosen_layer"], auto["test_accuracy"], auto["best_accuracy"],
            )  # fmt: skip
            if size == settings.default_size and seed == settings.seeds[0]:
                report["confusion"] = run["confusion"]
        seconds["accuracy_vs_size"] = seconds.get("accuracy_vs_size", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        if settings.subset_tasks < len(settings.tasks):
            for keep in subsets:
                subset_runs.append(subset_run(data, keep, seed, settings))
        seconds["subsets"] = seconds.get("subsets", 0.0) + time.perf_counter() - start
        if seed == settings.seeds[0]:
            start = time.perf_counter()
            at_default = [r for r in size_runs if r["seed"] == seed and r["size"] == settings.default_size]
            layer = (at_default or size_runs[-1:])[0]["variants"]["auto"]["chosen_layer"]
            report["timings"] = timings(data, layer, settings)
            seconds["timings"] = time.perf_counter() - start
        report["size_runs"] = size_runs
        report["size_summary"] = summarise_sizes(size_runs)
        report["subset_runs"] = subset_runs
        report["subsets_summary"] = summarise_subsets(subset_runs)
        write_report(report | {"seconds": seconds | {"total": sum(seconds.values())}}, out)


def part_b(settings: Settings, report: dict[str, Any], seconds: dict[str, float], features_only: bool = False) -> None:
    from transformers import AutoModelForCausalLM

    from .flexswitch_llm import MODEL_LABEL, base_folder, load_tokenizer

    try:
        folder = base_folder()
    except SystemExit as missing:
        report["llm_skipped"] = f"Skipped: SmolLM2-135M-Instruct is not available ({missing})."
        logger.warning(report["llm_skipped"])
        return
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(folder)
    report["llm_model"] = MODEL_LABEL
    report["llm_settings"] = {"num_layers": model.config.num_hidden_layers,
                              "layers": llm_layers(model.config.num_hidden_layers)}  # fmt: skip
    runs = []
    for seed in settings.llm_seeds:
        start = time.perf_counter()
        views = llm_features(settings, seed, model, tokenizer)
        seconds["llm_features"] = seconds.get("llm_features", 0.0) + time.perf_counter() - start
        report.setdefault("feature_cache", {}).setdefault("smollm2", []).append(views.pop("computed"))
        if features_only:
            continue
        start = time.perf_counter()
        for style in LLM_STYLES:
            for size in settings.llm_sizes:
                run = llm_run(views[style], size, seed) | {"style": style}
                runs.append(run)
                logger.info(
                    "SmolLM2 seed %d, %s, %d per task: default %.3f, best fixed %.3f (rank %d)", seed, style, size,
                    run["default"]["test_accuracy"], run["best_fixed"]["accuracy"], run["rank"],
                )  # fmt: skip
        seconds["llm_routing"] = seconds.get("llm_routing", 0.0) + time.perf_counter() - start
    report["llm_runs"] = runs
    report["llm_summary"] = summarise_llm(runs)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing_metric", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 tasks, 100 train texts, no SmolLM2")
    parser.add_argument("--seeds", default=None, help="split seeds, comma-separated (default 0,1,2; --quick: 0)")
    parser.add_argument("--llm", action=argparse.BooleanOptionalAction, default=None,
                        help="run part B (SmolLM2); default: on, off with --quick")  # fmt: skip
    parser.add_argument("--llm-seeds", default="0", help="split seeds of part B, comma-separated")
    parser.add_argument("--features-only", action="store_true", help="compute and cache the features, write nothing")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite <out>.md and <out>.png from <out>.json, measuring nothing"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS/OpenMP threads")
    parser.add_argument("--out", default=str(RESULTS), help="output path without suffix (.json, .md, .png)")
    return parser.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    from .pipeline import DEFAULT_TASKS, QUICK_TASKS

    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else ((0,) if args.quick else (0, 1, 2))
    llm = (not args.quick) if args.llm is None else args.llm
    llm_seeds = tuple(int(s) for s in args.llm_seeds.split(","))
    settings = Settings(tasks=tuple(DEFAULT_TASKS), seeds=seeds, sizes=DEFAULT_SIZES, llm=llm, llm_seeds=llm_seeds)
    if args.quick:
        settings = replace(
            settings, tasks=tuple(QUICK_TASKS), sizes=QUICK_SIZES, pool=100, test=100, default_size=100,
            subset_tasks=2, subsets=3, fit_sizes=(50, 100), nca_fit_sizes=(50,), cost_repeats=5,
            llm_sizes=(20,), llm_test=20,
        )  # fmt: skip
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".md", ".png") else out
    if args.report_only:  # the command, settings and measurements stay those of the run that measured them
        report = json.loads(out.with_suffix(".json").read_text())
        write_report(report, out)
        return report
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # numpy / scikit-learn: oversubscribed BLAS threads are slow on a shared machine
    settings = make_settings(args)
    software = (
        environment() | versions() | {"blas_threads": args.threads}
    )  # before the run: the commit whose code measures
    report: dict[str, Any] = {
        "benchmark": "Auto-Switch routing metric study",
        "command": command_line("benchmarks.routing_metric", argv),
        "settings": asdict(settings),
        "seeds": {
            "split_seeds": list(settings.seeds),
            "query_draw": "per task: torch.randperm(pool, Generator().manual_seed(1000 * split_seed + task index))",
            "subsets": settings.subset_seed,
            "llm_split_seeds": list(settings.llm_seeds),
            "autoswitch_config_seed": AutoSwitchConfig().seed,
        },
        "environment": software,
    }
    seconds: dict[str, float] = {}
    total = time.perf_counter()
    part_a(settings, report, seconds, out, args.features_only)
    if settings.llm:
        part_b(settings, report, seconds, args.features_only)
    if args.features_only:
        logger.info("Features cached: %s", json.dumps(report.get("feature_cache")))
        return report
    else:
        report["llm_skipped"] = "Not run (--quick without --llm, or --no-llm)."
    seconds["total"] = time.perf_counter() - total
    report["seconds"] = seconds
    write_report(report, out)
    logger.info("Wrote %s.{json,md}", out.name)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
