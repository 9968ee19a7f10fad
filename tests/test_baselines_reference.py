"""The benchmark's TIES and EMR-merging baselines against their original definitions.

Two kinds of check: properties that tell the original TIES (one magnitude cut over the whole task vector) and EMR
(rescalers from per-tensor means) from the variants the benchmark used before, and, where ``fusion-bench`` is
installed, equality with FusionBench's implementations on the same task vectors. FusionBench's package imports
heavy optional dependencies at the top level, so its two source files are executed alone, with small stand-ins for
the package modules they import only for type names and base classes (its ``state_dict_sum`` and type module run
as shipped).
"""

from __future__ import annotations

import importlib.util
import sys
import types
import typing
from pathlib import Path

import pytest
import torch

from benchmarks import baselines


def _task_vectors(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three task vectors: a large "embedding" with exact zeros (as when only seen tokens change),
    a matrix, a small-magnitude bias and a LayerNorm weight, at different scales per tensor."""
    generator = torch.Generator().manual_seed(seed)
    vectors = []
    for _ in range(3):
        embedding = torch.randn(200, 16, generator=generator) * (torch.rand(200, 16, generator=generator) < 0.5)
        vectors.append(
            {
                "embeddings.weight": embedding * 0.5,
                "layer.dense.weight": torch.randn(24, 16, generator=generator),
                "layer.dense.bias": torch.randn(24, generator=generator) * 1e-3,
                "layer.norm.weight": torch.randn(16, generator=generator) * 0.2,
            }
        )
    return vectors


def _flat(vector: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([vector[name].reshape(-1) for name in sorted(vector)])


# ----------------------------------------------------------------------------------------------------
# Properties of the originals (no third-party code)
# ----------------------------------------------------------------------------------------------------


def test_ties_trims_the_whole_vector_with_one_cut():
    vectors = _task_vectors()
    merged = baselines.ties(vectors, 1.0, density=0.2)
    # With one task, TIES keeps exactly the entries at or above the global top-20% cut, unchanged.
    alone = baselines.ties(vectors[:1], 1.0, density=0.2)
    flat = _flat(vectors[0])
    cut = torch.sort(flat.abs()).values[flat.numel() - int(flat.numel() * 0.2) - 1]
    assert torch.equal(_flat(alone), flat * (flat.abs() >= cut))
    # The small-magnitude bias falls entirely below the global cut; per-tensor trimming keeps 20% of it.
    assert torch.count_nonzero(alone["layer.dense.bias"]) == 0
    per_tensor = baselines.ties_per_tensor(vectors[:1], 1.0, density=0.2)
    assert torch.count_nonzero(per_tensor["layer.dense.bias"]) > 0
    # Scaling is linear, and the merge differs from the per-tensor variant.
    assert torch.allclose(_flat(baselines.ties(vectors, 0.5, density=0.2)), 0.5 * _flat(merged))
    assert not torch.allclose(_flat(merged), _flat(baselines.ties_per_tensor(vectors, 1.0, density=0.2)))


def test_ties_elects_signs_and_averages_the_agreeing_entries():
    vectors = [{"w": torch.tensor([3.0, -1.0, 2.0, 0.0])}, {"w": torch.tensor([1.0, -4.0, -1.0, 0.0])}]
    merged = baselines.ties(vectors, 1.0, density=1.0)["w"]
    # entry 0: both positive -> mean 2; entry 1: both negative -> mean -2.5; entry 2: sum +1 -> only the 2.0 agrees;
    # entry 3: nothing to keep.
    assert torch.equal(merged, torch.tensor([2.0, -2.5, 2.0, 0.0]))


def test_emr_rescalers_are_ratios_of_per_tensor_means():
    vectors = _task_vectors(1)
    merged = baselines.emr_merge({f"t{i}": v for i, v in enumerate(vectors)})
    for index, vector in enumerate(vectors):
        task = f"t{index}"
        numerator = sum(float(t.abs().mean()) for t in vector.values())
        denominator = sum(
            float((merged.unified[n] * merged.masks[task][n]).abs().mean()) for n in merged.unified
        )  # fmt: skip
        assert merged.rescalers[task] == pytest.approx(numerator / denominator, rel=1e-6)
        # All-entry sums (the earlier variant) weight the large embedding by its size: a different rescaler here.
        sums = sum(float(t.abs().sum()) for t in vector.values()) / sum(
            float((merged.unified[n] * merged.masks[task][n]).abs().sum()) for n in merged.unified
        )
        assert merged.rescalers[task] != pytest.approx(sums, rel=1e-3)


# ----------------------------------------------------------------------------------------------------
# Equality with FusionBench
# ----------------------------------------------------------------------------------------------------

FUSION_BENCH = importlib.util.find_spec("fusion_bench")
needs_fusion_bench = pytest.mark.skipif(
    FUSION_BENCH is None,
    reason="fusion-bench is not installed; `pip install --no-deps fusion-bench` enables the comparison with its "
    "TIES and EMR-merging implementations",
)


def _execute(root: Path, relative: str, name: str, monkeypatch) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, root / relative)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fusion_bench(monkeypatch) -> types.SimpleNamespace:
    """FusionBench's ``ties_merging_utils`` and ``emr_merging/utils`` modules, executed without the package's
    top-level imports (``sys.modules`` entries are restored after the test)."""
    root = Path(FUSION_BENCH.submodule_search_locations[0])
    package = types.ModuleType("fusion_bench")
    package.__path__ = []
    for name in ("fusion_bench.utils", "fusion_bench.models", "fusion_bench.models.modulator", "fusion_bench.method"):
        stub = types.ModuleType(name)
        stub.__path__ = []
        monkeypatch.setitem(sys.modules, name, stub)
    monkeypatch.setitem(sys.modules, "fusion_bench", package)
    type_module = _execute(root, "utils/type.py", "fusion_bench.utils.type", monkeypatch)
    package.StateDictType = type_module.StateDictType
    package.TorchModelType = type_module.TorchModelType
    _execute(root, "utils/state_dict_arithmetic.py", "fusion_bench.utils.state_dict_arithmetic", monkeypatch)

    model_type = typing.TypeVar("model_type")

    class ModulatedModel(torch.nn.Module, typing.Generic[model_type]):  # base classes only: never instantiated
        pass

    class TaskModulator(torch.nn.Module, typing.Generic[model_type]):
        pass

    modulator = sys.modules["fusion_bench.models.modulator"]
    modulator.ModulatedModel, modulator.TaskModulator = ModulatedModel, TaskModulator
    base = types.ModuleType("fusion_bench.models.modulator.base")
    base.ModulatedModel, base.TaskModulator = ModulatedModel, TaskModulator
    monkeypatch.setitem(sys.modules, base.__name__, base)
    parameter_dict = types.ModuleType("fusion_bench.models.parameter_dict")
    parameter_dict.ParameterDictModel = torch.nn.Module
    monkeypatch.setitem(sys.modules, parameter_dict.__name__, parameter_dict)
    ties = _execute(root, "method/ties_merging/ties_merging_utils.py", "fusion_bench_ties_utils", monkeypatch)
    emr = _execute(root, "method/emr_merging/utils.py", "fusion_bench_emr_utils", monkeypatch)
    return types.SimpleNamespace(ties=ties, emr=emr)


@needs_fusion_bench
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_equals_fusion_bench(fusion_bench, density):
    vectors = _task_vectors()
    stacked = torch.stack([fusion_bench.ties.state_dict_to_vector(v) for v in vectors])  # sorted parameter order
    theirs = fusion_bench.ties.ties_merging(stacked, reset_thresh=density, merge_func="dis-mean")
    ours = _flat(baselines.ties(vectors, 1.0, density=density))
    assert torch.allclose(ours, theirs, atol=1e-6)
    per_tensor = _flat(baselines.ties_per_tensor(vectors, 1.0, density=density))
    assert not torch.allclose(per_tensor, theirs, atol=1e-3)  # the comparison can tell the variants apart


@needs_fusion_bench
def test_emr_equals_fusion_bench(fusion_bench):
    vectors = _task_vectors(2)
    unified, masks, rescalers = fusion_bench.emr.emr_merge([dict(v) for v in vectors])
    ours = baselines.emr_merge({f"t{i}": v for i, v in enumerate(vectors)})
    for name in unified:
        assert torch.allclose(ours.unified[name], unified[name].float())
        for index in range(len(vectors)):
            # A mask matters only where the unified vector is non-zero.
            assert torch.equal(ours.unified[name] * ours.masks[f"t{index}"][name], unified[name] * masks[name][index])
    assert [ours.rescalers[f"t{i}"] for i in range(len(vectors))] == pytest.approx(rescalers.tolist(), rel=1e-5)
