"""The routing metric study's core functions on tiny synthetic features (no model, no data download)."""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import asdict, replace

import pytest
import torch

from benchmarks import routing_metric as rm


def synthetic(tasks: int = 3, pool: int = 40, test: int = 12, layers: int = 3, dim: int = 40, seed: int = 0):
    """Task clusters that separate better at deeper layers."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, dim, generator=generator)

    def make(count: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        labels = torch.arange(tasks).repeat_interleave(count)
        noise = torch.randn(tasks * count, dim, generator=generator)
        return {layer: centres[labels] * layer / layers + noise for layer in range(1, layers + 1)}, labels

    pool_features, pool_labels = make(pool)
    test_features, test_labels = make(test)
    return rm.Features(
        [f"task{i}" for i in range(tasks)],
        {layer: values.half() for layer, values in pool_features.items()},
        pool_labels,
        test_features,
        test_labels,
    )


def tiny_settings() -> rm.Settings:
    return rm.Settings(
        tasks=("task0", "task1", "task2"), seeds=(0, 1), sizes=(10, 20), pool=40, test=12, nca_max_size=10,
        default_size=20, subsets=2, subset_tasks=2, fit_sizes=(10, 20), nca_fit_sizes=(10,), cost_batch=8,
        cost_repeats=2, llm=False,
    )  # fmt: skip


def test_draw_is_nested_and_per_task():
    labels = torch.arange(3).repeat_interleave(10)
    small, large = rm.draw(labels, 3, seed=1), rm.draw(labels, 6, seed=1)
    assert torch.bincount(labels[small]).tolist() == [3, 3, 3]
    assert set(small.tolist()) <= set(large.tolist())
    assert not torch.equal(rm.draw(labels, 6, seed=2), large)


@pytest.fixture
def one_thread():
    """BLAS and torch on one thread: much faster for these tiny problems on a busy machine."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def test_study_core_on_synthetic_features(tmp_path, one_thread):
    settings = tiny_settings()
    runs, subset_runs = [], []
    for seed in settings.seeds:
        data = synthetic(seed=seed)
        runs += [rm.size_run(data, size, seed, settings) for size in settings.sizes]
        subsets = rm.task_subsets(3, settings.subsets, settings.subset_tasks, settings.subset_seed)
        assert len(subsets) == 2 and all(len(s) == 2 for s in subsets)
        subset_runs += [rm.subset_run(data, keep, seed, settings) for keep in subsets]
    run = runs[0]
    data = synthetic()
    rows = rm.draw(data.pool_labels, 20, 0)
    query = {layer: values[rows].float() for layer, values in data.pool.items()}
    default = rm.choose(query, data.pool_labels[rows], data.tasks, rm.AutoSwitchConfig())
    for variant in ("euclidean", "cosine", "learned-lda"):  # derived = what index.choose picks with that metric
        alone = rm.choose(query, data.pool_labels[rows], data.tasks, rm.config_for(variant))
        derived = rm.single_metric_choice(default, rm.VARIANTS[variant][0])
        assert (derived.layer, derived.metric, derived.scores) == (alone.layer, alone.metric, alone.scores)
    assert set(run["variants"]) == set(rm.VARIANTS)  # NCA at 10 <= nca_max_size
    assert "learned-nca" not in runs[1]["variants"]  # 20 > nca_max_size
    auto = run["variants"]["auto"]
    assert auto["chosen_layer"] in (1, 2, 3) and auto["chosen_metric"] in rm.FIXED_METRICS
    assert 0.0 <= auto["test_accuracy"] <= auto["best_accuracy"] <= 1.0 and auto["rank"] >= 1
    assert "confusion" in runs[1] and sum(map(sum, runs[1]["confusion"])) == 36
    assert 0.0 <= run["probe"]["test_accuracy"] <= 1.0

    summary = rm.summarise_sizes(runs)
    assert summary["auto"]["20"]["chosen"]["n"] == 2 and len(summary["auto"]["20"]["chosen_layers"]) == 2
    assert set(summary["probe"]) == {"10", "20"}
    subsets = rm.summarise_subsets(subset_runs)
    assert len(subsets) == 2 and subsets[0]["options"] == 9 and len(subsets[0]["ranks"]) == 2

    timing = rm.timings(synthetic(), 3, settings)
    assert set(timing["fit_seconds"]["lda"]) == {"10", "20"} and set(timing["fit_seconds"]["nca"]) == {"10"}
    assert timing["cost"]["ratio_learned_over_cosine"] > 0

    views = {"templated": synthetic(seed=5), "plain": synthetic(seed=6)}
    llm_runs = [rm.llm_run(views, 10, seed=0) | {"style": style} for style in rm.LLM_STYLES]
    assert set(llm_runs[0]["mismatch"]) == {
        "query_plain/test_templated", "query_templated/test_plain", "query_plain/test_plain",
    }  # fmt: skip
    llm = rm.summarise_llm(llm_runs)
    assert set(llm) == set(rm.LLM_STYLES) and llm["raw"]["10"]["options"] == 9

    report = {
        "command": "python -m benchmarks.routing_metric --quick",
        "settings": asdict(replace(settings, llm=True, llm_tasks=("task0", "task1", "task2"))),
        "model": "synthetic",
        "num_layers": 3,
        "environment": {
            "cpu_count": 2,
            "torch_threads": 1,
            "switch_adapter": "0",
            "torch": "0",
            "transformers": "0",
            "git_commit": None,
            "scikit-learn": "0",
        },  # fmt: skip
        "size_runs": runs,
        "size_summary": summary,
        "subsets_summary": subsets,
        "confusion": runs[1]["confusion"],
        "timings": timing,
        "llm_model": "synthetic LM",
        "llm_settings": {"num_layers": 3, "layers": [1, 2, 3]},
        "llm_summary": llm,
        "seconds": {"total": 1.0, "minilm_features": 0.5},
    }
    rm.write_report(report, tmp_path / "routing_metric")
    text = (tmp_path / "routing_metric.md").read_text()
    for heading in ("Accuracy vs query-set size", "Fit and choice times", "Held-out task subsets", "Confusion",
                    "SmolLM2", "What this says"):  # fmt: skip
        assert heading in text
    assert json.loads((tmp_path / "routing_metric.json").read_text())["size_summary"]["auto"]
    assert len(rm.findings(report)) >= 5


def test_importable_and_writes_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    module = importlib.reload(rm)
    assert module.plot({"size_summary": {}, "settings": {}}, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
