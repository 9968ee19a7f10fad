"""A picture of a switch: per unit, in model order, its density and its bit-width (matplotlib, optional).

``switch-adapter inspect ADAPTER --plot units.png`` and the FlexSwitch trainer (``units.png`` next to a learned
adapter) both call :func:`plot_units`. matplotlib is an optional dependency: ``pip install "switch-adapter[plot]"``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "switch-adapter[plot]"'
_LAYER_INDEX = re.compile(r"^(?P<prefix>(?:.*?\.)?(?P<index>\d+))\.")
_MAX_LABELS = 40


@dataclass(frozen=True)
class UnitPoint:
    """What the plot shows of one unit: its name, its density (kept / numel) and its value bits."""

    name: str
    density: float
    value_bits: int


def _field(item: Any, name: str, default: Any = None) -> Any:
    return item.get(name, default) if isinstance(item, Mapping) else getattr(item, name, default)


def _point(item: Any) -> UnitPoint | None:
    """A :class:`UnitPoint` from a ``UnitReport``, a ``format.UnitStatus`` or a dict of ``inspect --json``; None for
    a unit without a switch (no entries known)."""
    unit = _field(item, "unit")
    name = _field(item, "name") or (unit.name if unit is not None else None)
    numel, kept = _field(item, "numel"), _field(item, "kept", 0)
    if name is None or not numel:
        return None
    return UnitPoint(str(name), float(kept) / float(numel), int(_field(item, "value_bits", 1)))


def unit_points(statuses_or_report: Any) -> list[UnitPoint]:
    """The units to plot, in the given order: from an :class:`~switch_adapter.InspectionReport` (or its ``to_dict()``),
    or an iterable of ``UnitReport`` / ``format.UnitStatus`` / dicts with ``name``, ``numel``, ``kept`` and
    ``value_bits``. Units without a switch are left out."""
    units = _field(statuses_or_report, "units")
    items: Iterable[Any] = statuses_or_report if units is None else units
    return [point for point in map(_point, items) if point is not None]


def _common_parts(names: list[str]) -> int:
    """How many leading dotted parts all ``names`` share (``bert.`` in a BertModel's units)."""
    split = [name.split(".")[:-1] for name in names]
    shared = 0
    while all(len(parts) > shared + 1 for parts in split) and len({parts[shared] for parts in split}) == 1:
        shared += 1
    return shared


def layer_groups(names: list[str]) -> list[tuple[str, int, int]]:
    """``(label, first, last)`` for each run of consecutive units of one layer: the label is the first numeric part
    of the name (``encoder.layer.3.attention...`` -> ``"3"``), else the first part after the prefix all names share
    (``bert.embeddings...`` -> ``"embeddings"``)."""
    shared = _common_parts(names) if names else 0
    groups: list[tuple[str, str, int, int]] = []
    for position, name in enumerate(names):
        match = _LAYER_INDEX.match(name)
        if match:
            key, label = match["prefix"], match["index"]
        else:
            parts = name.split(".")
            label = parts[min(shared, len(parts) - 1)]
            key = ".".join(parts[: shared + 1])
        if groups and groups[-1][0] == key:
            groups[-1] = (key, label, groups[-1][2], position)
        else:
            groups.append((key, label, position, position))
    return [(label, first, last) for _, label, first, last in groups]


def _import_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            f"Plotting the units of a switch needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None
    return Figure


def _label_axes(axis, other, points: list[UnitPoint]) -> None:
    """Layer labels under the units of ``axis`` (at most ``_MAX_LABELS``) and thin lines between layers on both."""
    groups = layer_groups([point.name for point in points])
    step = max(1, -(-len(groups) // _MAX_LABELS))
    shown = groups[::step]
    axis.set_xticks([(first + last) / 2 for _, first, last in shown])
    axis.set_xticklabels([label for label, _, _ in shown], fontsize=8)
    for _, first, _ in groups[1:]:
        for each in (axis, other):
            each.axvline(first - 0.5, color="0.85", linewidth=0.6, zorder=0)
    axis.set_xlim(-0.5, len(points) - 0.5)
    axis.set_xlabel("layer (units in model order)")


def plot_units(statuses_or_report: Any, path: str | os.PathLike, title: str | None = None) -> str:
    """Write a PNG (or any format matplotlib infers from ``path``) with, per unit in model order, its density
    (bars, top) and its bit-width (bottom), the x axis labelled by layer. Returns the path written.

    ``statuses_or_report`` is what :func:`unit_points` accepts. Raises ``ImportError`` naming
    ``pip install "switch-adapter[plot]"`` without matplotlib, and ``ValueError`` when there is no unit to plot.
    """
    points = unit_points(statuses_or_report)
    if not points:
        raise ValueError("There is no switched unit to plot: the adapter holds no switch (or none could be read).")
    figure = _import_figure()(figsize=(min(40.0, max(6.0, 0.12 * len(points) + 2.0)), 5.0))
    density_axis, bits_axis = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    positions = list(range(len(points)))
    density_axis.bar(positions, [p.density for p in points], width=0.9, color="tab:blue")
    density_axis.set_ylabel("density (kept / entries)")
    density_axis.set_ylim(0, max(p.density for p in points) * 1.1 or 1.0)
    bits_axis.step(positions, [p.value_bits for p in points], where="mid", color="tab:orange", linewidth=1.0)
    bits_axis.plot(positions, [p.value_bits for p in points], "o", color="tab:orange", markersize=3)
    bits_axis.set_yscale("log", base=2)
    bits_axis.set_yticks([1, 2, 4, 8], labels=["1", "2", "4", "8"])
    bits_axis.set_ylim(0.8, 10)
    bits_axis.set_ylabel("value bits")
    _label_axes(bits_axis, density_axis, points)
    density_axis.set_title(title or f"{len(points)} switched units: density and bit-width per unit")
    figure.tight_layout()
    path = os.fspath(path)
    figure.savefig(path, dpi=120)
    logger.info("Wrote the per-unit plot of %d units to %s", len(points), path)
    return path
