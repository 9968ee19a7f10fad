"""Auto-Switch's learned routing metric and the build-time choice of feature layer and metric.

Synthetic features test the metric where the answer is known: tasks that differ along a few directions, hidden
under a nuisance direction of large variance, are misrouted by plain Euclidean / cosine k-NN and routed right in
the learned space. The router-level tests use the tiny BERT tasks of ``test_autoswitch`` (separable token ranges).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_autoswitch import TASKS, mixed_batch, query_sets, task_ids
from tiny_models import tiny_bert

from switch_adapter import AutoSwitchConfig, AutoSwitchModel
from switch_adapter.autoswitch import BundleError, FeatureSpec, QueryFeatures, knn
from switch_adapter.autoswitch.index import build_index
from switch_adapter.autoswitch.metric import MetricFitError, fit_metric
from switch_adapter.autoswitch.routing import route_features
from switch_adapter.autoswitch.selection import candidate_layers, choose_features, cross_validated_accuracy

SPEC = FeatureSpec(layer=1, pooling="mean", num_layers=2, hidden_size=16, base_fingerprint="synthetic")


def nuisance_tasks(count: int, seed: int, tasks: int = 3, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Task t: mean 1.5 along direction t (std 0.5); every example moved by N(0, 20) along the last two directions."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(tasks).repeat_interleave(count)
    features = torch.randn(len(labels), size, generator=generator) * 0.5
    features[torch.arange(len(labels)), labels] += 1.5
    features[:, -2:] = torch.randn(len(labels), 2, generator=generator) * 20.0
    return features, labels


def query_of(features: torch.Tensor, labels: torch.Tensor) -> dict[str, QueryFeatures]:
    return {f"task{t}": QueryFeatures(features[labels == t].half(), SPEC) for t in range(int(labels.max()) + 1)}


def routed_accuracy(metric: str, objective: str = "lda") -> float:
    bank, bank_labels = nuisance_tasks(40, seed=0)
    test, test_labels = nuisance_tasks(50, seed=1)
    config = AutoSwitchConfig(metric=metric, metric_objective=objective, ood_fallback=False)
    index = build_index(query_of(bank, bank_labels), config)
    routing = route_features(
        index.project(test), index.bank, index.bank_tasks, index.tasks, config, index.radius, index.distance
    )
    truth = [index.tasks[t] for t in test_labels.tolist()]
    return sum(top == want for top, want in zip(routing.top_task, truth)) / len(truth)


def test_learned_metric_routes_tasks_that_a_nuisance_direction_hides():
    plain = max(routed_accuracy("euclidean"), routed_accuracy("cosine"))
    assert plain < 0.6
    assert routed_accuracy("learned", "lda") > 0.95
    assert routed_accuracy("learned", "nca") > plain + 0.2  # NCA's local optimum from its identity start
    assert routed_accuracy("auto") > 0.95  # the cross-validated choice finds the learned metric


def test_fit_metric_rank_and_errors():
    features, labels = nuisance_tasks(20, seed=0)
    lda = fit_metric(features, labels, ["a", "b", "c"], "lda", rank=16)
    assert lda.projection.shape == (2, 16) and lda.examples == [20, 20, 20]  # LDA: rank <= tasks - 1
    nca = fit_metric(features, labels, ["a", "b", "c"], "nca", rank=4)
    assert nca.projection.shape == (4, 16) and nca.describe()["objective"] == "nca"
    with pytest.raises(MetricFitError, match="metric_rank=17 is larger than the routing feature size 16"):
        fit_metric(features, labels, ["a", "b", "c"], "nca", rank=17)
    few = torch.cat([features[:3], features[20:]]), torch.cat([labels[:3], labels[20:]])
    with pytest.raises(MetricFitError, match="at least 5 query examples per task.*too few for a: 3"):
        fit_metric(*few, ["a", "b", "c"], "lda", rank=16)
    constant = torch.ones_like(features)
    with pytest.raises(MetricFitError, match="no within-task spread"):
        fit_metric(constant, labels, ["a", "b", "c"], "lda", rank=16)
    assert cross_validated_accuracy(constant, labels, ["a", "b", "c"], "learned", k=5) == 0.0
    with pytest.raises(MetricFitError, match="at least two"):
        fit_metric(features[:20], labels[:20], ["a"], "lda", rank=16)


def test_lda_projection_routes_as_well_as_scikit_learns_discriminant():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    generator = torch.Generator().manual_seed(0)
    scales, shifts = torch.rand(64, generator=generator) * 3, torch.randn(4, 64, generator=generator) * 0.15

    def tasks_sample(count):
        labels = torch.arange(4).repeat_interleave(count)
        return torch.randn(4 * count, 64, generator=generator) * scales + shifts[labels], labels

    (bank, labels), (test, truth) = tasks_sample(60), tasks_sample(500)
    ours = fit_metric(bank, labels, ["a", "b", "c", "d"], "lda", rank=32)
    reference = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(bank.numpy(), labels.numpy())
    theirs = torch.from_numpy(reference.scalings_[:, :3].T.copy()).float()

    def accuracy(project):
        _, index = knn.nearest(project(test), project(bank), 10, "euclidean")
        top = knn.top_tasks(knn.task_weights(labels[index], 4), labels[index])
        return float((top == truth).float().mean())

    ours_accuracy, their_accuracy = accuracy(ours.project), accuracy(lambda x: x @ theirs.T)
    assert ours.rank == 3 and 0.5 < their_accuracy < 0.95 and ours_accuracy >= their_accuracy - 0.01


def test_layer_choice_takes_the_cheapest_layer_within_tolerance():
    good, labels = nuisance_tasks(40, seed=0)
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(good.shape, generator=generator) * 3.0
    layers = {1: noise, 2: good, 3: good.clone()}  # layer 1 carries no task signal; 3 is as good as 2
    tasks = ["a", "b", "c"]
    choice = choose_features(layers, labels, tasks, ["learned", "cosine"], k=5, tolerance=0.005)
    assert choice.layer == 2 and choice.metric == "learned" and choice.accuracy > 0.9
    assert choice.scores["learned"][1] < 0.6 and set(choice.scores) == {"learned", "cosine"}
    assert choose_features(layers, labels, tasks, ["learned"], k=5, tolerance=1.0).layer == 1
    assert cross_validated_accuracy(good, labels, tasks, "euclidean", k=5) < 0.6
    assert candidate_layers(6) == [1, 2, 3, 4, 5, 6]
    assert candidate_layers(30) == [1, 4, 8, 11, 15, 19, 22, 26, 30]


# -- the router ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_switches(tmp_path_factory):
    from test_autoswitch import _save_switches

    return _save_switches(tiny_bert, tmp_path_factory.mktemp("bert-metric"))


def test_router_defaults_choose_layer_and_metric_and_report_them(bert_switches):
    router = AutoSwitchModel.from_pretrained(
        tiny_bert(), adapters=bert_switches, query_sets=query_sets(), progress=False
    )
    choice = router.feature_choice
    assert choice is not None and router.feature_spec.layer == choice.layer in (1, 2)
    assert router.metric == choice.metric and set(choice.scores) == {"learned", "cosine", "euclidean"}
    routing = router.route(torch.cat([task_ids(t, 2, seed=9) for t in range(3)]))
    assert routing.top_task == [name for name in TASKS for _ in range(2)]
    assert routing.metric == router.metric and all(row["metric"] == router.metric for row in routing.to_list())


def test_learned_router_bundle_round_trip_and_refit_on_task_changes(bert_switches, tmp_path):
    config = AutoSwitchConfig(metric="learned", feature_layer=1, mode="top1")
    router = AutoSwitchModel.from_pretrained(
        tiny_bert(), adapters=bert_switches, query_sets=query_sets(), config=config, progress=False
    )
    learned = router.learned_metric
    assert router.metric == "learned" and router.feature_choice is None
    assert learned.projection.shape == (2, 32) and learned.tasks == list(TASKS)
    batch = mixed_batch()
    expected, routing = router(**batch, return_routing=True)
    assert routing.top_task == list(TASKS) * 2 and routing.metric == "learned"

    router.save_pretrained(tmp_path / "bundle")
    description = json.loads((tmp_path / "bundle" / "autoswitch_config.json").read_text())
    assert description["format_version"] == 2 and description["routing"]["metric"] == "learned"
    assert description["routing"]["learned"]["rank"] == 2
    loaded = AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=tiny_bert(), progress=False)
    assert torch.equal(loaded.learned_metric.projection, learned.projection) and loaded.radius == router.radius
    out, loaded_routing = loaded(**batch, return_routing=True)
    assert loaded_routing.top_task == routing.top_task
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)

    from switch_adapter.autoswitch.bundle import model_card

    assert "learned rank-2 projection" in model_card(router, "org/router")

    router.remove_task("gamma")  # refitted on the two remaining tasks: rank 1
    assert router.learned_metric.tasks == ["alpha", "beta"] and router.learned_metric.rank == 1
    router.add_task("gamma", bert_switches["gamma"], query_sets()["gamma"], progress=False)
    assert router.learned_metric.rank == 2 and router.route(**batch).top_task == list(TASKS) * 2


def test_single_task_falls_back_to_cosine_until_a_second_task(bert_switches, caplog):
    config = AutoSwitchConfig(metric="learned", feature_layer=1)
    with caplog.at_level(logging.WARNING, logger="switch_adapter"):
        router = AutoSwitchModel.from_pretrained(
            tiny_bert(), adapters={"alpha": bert_switches["alpha"]}, query_sets={"alpha": query_sets()["alpha"]},
            config=config, progress=False,
        )  # fmt: skip
    assert router.metric == "cosine" and router.learned_metric is None
    assert "needs at least two" in caplog.text
    router.add_task("beta", bert_switches["beta"], query_sets()["beta"], progress=False)
    assert router.metric == "learned" and router.learned_metric.tasks == ["alpha", "beta"]


def test_metric_bad_input_is_refused_before_the_model_changes(bert_switches, tmp_path):
    base = tiny_bert()
    keys = set(base.state_dict())

    def build(**kwargs):
        values = {"adapters": bert_switches, "query_sets": query_sets(), "progress": False, **kwargs}
        return AutoSwitchModel.from_pretrained(base, **values)

    with pytest.raises(MetricFitError, match=r"metric_rank=64\) is larger than the routing feature size 32"):
        build(config=AutoSwitchConfig(metric="learned", metric_rank=64, feature_layer=1))
    with pytest.raises(MetricFitError, match="too few for beta: 3"):
        build(query_sets={**query_sets(), "beta": task_ids(1, 3)}, config=AutoSwitchConfig(metric="learned"))
    assert set(base.state_dict()) == keys and not hasattr(base, "peft_config")

    router = build(config=AutoSwitchConfig(metric="learned", feature_layer=1))
    with pytest.raises(MetricFitError, match="too few for delta: 2"):
        router.add_task("delta", bert_switches["alpha"], task_ids(3, 2), progress=False)
    assert router.tasks == list(TASKS) and "delta" not in router.model.peft_config

    router.save_pretrained(tmp_path / "bundle")
    features = tmp_path / "bundle" / "query_features.safetensors"
    tensors = load_file(str(features))
    from safetensors import safe_open

    with safe_open(str(features), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({**tensors, "projection": torch.zeros(2, 48)}, str(features), metadata=metadata)
    with pytest.raises(MetricFitError, match=r"shape \[2, 48\], for features of size 48.*size 32"):
        AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=tiny_bert(), progress=False)
    save_file({k: v for k, v in tensors.items() if k != "projection"}, str(features), metadata=metadata)
    with pytest.raises(BundleError, match="holds no projection"):
        AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=tiny_bert(), progress=False)
