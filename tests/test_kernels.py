"""The kernels that apply kept switch entries (numba and torch paths) against dense deltas."""

import numpy as np
import pytest
import torch

from switch_adapter.autoswitch import kernels
from switch_adapter.autoswitch.kernels import (
    add_embedding_deltas,
    add_in_place,
    add_row_deltas,
    assignment_for_rows,
    fast_kernels_available,
    scatter_deltas,
)
from switch_adapter.autoswitch.tables import LINEAR, TRANSPOSED, EntryTable

numba = pytest.importorskip("numba", reason="pip install numba (the kernels' fast path); the torch path is tested too")


@pytest.fixture(params=["numba", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("SWITCH_ADAPTER_KERNELS", "torch")
    kernels._numba_kernels.cache_clear()
    yield request.param
    kernels._numba_kernels.cache_clear()


def random_table(rows: int, cols: int, tasks: int, seed: int, per_row_scale: bool, wide: bool) -> EntryTable:
    """``tasks`` random switches of a ``[rows, cols]`` weight: density 0.1-0.4 (one task empty), odd multipliers
    (+-1, or up to +-15 for multi-bit units in int16 when ``wide``), one scale or one per row. Columns in 16 bits
    up to 65,536 columns, as the router's tables."""
    generator = torch.Generator().manual_seed(seed)
    positions, multipliers, counts, row_ptrs, scales = [], [], [0], [], []
    for t in range(tasks):
        density = 0.0 if t == 1 else 0.1 + 0.1 * t
        kept = torch.randperm(rows * cols, generator=generator)[: int(density * rows * cols)].sort().values
        levels = 8 if wide else 1
        mult = (torch.randint(0, levels, (kept.numel(),), generator=generator) * 2 + 1) * (
            torch.randint(0, 2, (kept.numel(),), generator=generator) * 2 - 1
        )
        positions.append(kept.to(torch.int32))
        multipliers.append(mult.to(torch.int16 if wide else torch.int8))
        counts.append(kept.numel())
        ptr = torch.zeros(rows + 1, dtype=torch.int32)
        ptr[1:] = torch.cumsum(torch.bincount(kept // cols, minlength=rows), 0)
        row_ptrs.append(ptr)
        scales.append(torch.rand(rows if per_row_scale else 1, generator=generator) + 0.1)
    width = max(s.numel() for s in scales)
    padded = torch.zeros(tasks, width)
    for t, s in enumerate(scales):
        padded[t, : s.numel()] = s
    return EntryTable(
        tasks=tuple(f"t{t}" for t in range(tasks)), keys=(),
        columns=(torch.cat(positions) % cols).to(torch.uint16 if cols <= 2**16 else torch.int32),
        multipliers=torch.cat(multipliers), offsets=torch.cumsum(torch.tensor(counts), 0),
        row_ptr=torch.stack(row_ptrs), scales=padded,
        chunks=torch.tensor([rows * cols // s.numel() for s in scales]), rows=rows, cols=cols,
    )  # fmt: skip


def dense_deltas(table: EntryTable) -> list[torch.Tensor]:
    out = []
    for t in range(len(table.tasks)):
        delta = torch.zeros(table.numel, dtype=torch.float64)
        start, stop = int(table.offsets[t]), int(table.offsets[t + 1])
        kept = table.positions(t)
        scale = table.scales[t].double()[kept // int(table.chunks[t])]
        delta[kept] = table.multipliers[start:stop].double() * scale
        out.append(delta.view(table.rows, table.cols))
    return out


SAMPLES = [[(0, 1.0)], [(2, 0.5), (3, 0.5)], [], [(1, 1.0)], [(3, 0.25), (0, 0.75)]]  # top-1, soft, base, empty


@pytest.mark.parametrize("per_row_scale", [False, True], ids=["one-scale", "row-scales"])
@pytest.mark.parametrize("wide", [False, True], ids=["1-bit", "multi-bit"])
@pytest.mark.parametrize("kind", [LINEAR, TRANSPOSED])
@pytest.mark.parametrize("tokens", [3, 17, 40], ids=["short-runs", "runs-of-8-and-more", "spans-of-4-lanes"])
@pytest.mark.parametrize("order", ["sample-after-sample", "interleaved"])
def test_row_deltas_equal_dense_deltas(backend, kind, per_row_scale, wide, tokens, order):
    """Rows sample after sample (a forward pass) or interleaved (decoding steps of a mixed batch: the rows of one
    composition are spread over the call, in lanes of 8 and a remainder); 40 rows per sample make spans of 4 lanes
    that share one read of the entries."""
    table = random_table(24, 40, 4, seed=1, per_row_scale=per_row_scale, wide=wide)
    deltas = dense_deltas(table)
    x = torch.randn(len(SAMPLES) * tokens, table.cols if kind == LINEAR else table.rows)
    if order == "interleaved":
        row_sample = np.tile(np.arange(len(SAMPLES)), tokens)
    else:
        row_sample = np.repeat(np.arange(len(SAMPLES)), tokens)
    y = torch.randn(x.shape[0], table.rows if kind == LINEAR else table.cols)
    expected = y.double().clone()
    for r, s in enumerate(row_sample):
        for t, w in SAMPLES[s]:
            weight = deltas[t] if kind == LINEAR else deltas[t].T  # as [out, in]
            expected[r] += w * (weight @ x[r].double())
    assignment = assignment_for_rows(row_sample, SAMPLES)
    used = assignment.lane_rows[assignment.lane_rows < len(row_sample)]
    assert sorted(used.tolist()) == list(range(len(row_sample)))  # every row in exactly one lane slot
    spans = assignment.span_ptr
    assert spans[0] == 0 and spans[-1] == len(assignment.lane_ptr) - 1 and (np.diff(spans) <= 4).all()
    for first, stop in zip(spans[:-1], spans[1:]):  # a span's lanes share one composition
        compositions = {tuple(SAMPLES[row_sample[assignment.lane_rows[8 * lane]]]) for lane in range(first, stop)}
        assert len(compositions) == 1
    add_row_deltas(y, x, table, assignment, kind)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("per_row_scale", [False, True], ids=["one-scale", "row-scales"])
def test_embedding_deltas_equal_dense_rows(backend, per_row_scale):
    table = random_table(30, 16, 4, seed=2, per_row_scale=per_row_scale, wide=True)
    deltas = dense_deltas(table)
    ids = torch.randint(0, 30, (len(SAMPLES) * 4,), generator=torch.Generator().manual_seed(0))
    row_sample = np.repeat(np.arange(len(SAMPLES)), 4)
    y = torch.randn(ids.numel(), 16)
    expected = y.double().clone()
    for r, s in enumerate(row_sample):
        for t, w in SAMPLES[s]:
            expected[r] += w * deltas[t][ids[r]]
    add_embedding_deltas(y, ids, table, assignment_for_rows(row_sample, SAMPLES))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_row_scale", [False, True], ids=["one-scale", "row-scales"])
def test_scatter_composes_the_weight(backend, per_row_scale):
    table = random_table(12, 20, 4, seed=3, per_row_scale=per_row_scale, wide=False)
    deltas = dense_deltas(table)
    weight = torch.randn(12, 20)
    expected = weight.double() + 0.25 * deltas[0] + 0.75 * deltas[3]
    scatter_deltas(weight.view(-1), table, [(0, 0.25), (3, 0.75), (1, 1.0)])
    torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_row_scale", [False, True], ids=["one-scale", "row-scales"])
def test_in_place_composition_is_put_back_exactly(backend, per_row_scale):
    """Two tasks that share kept positions added to a live weight (the one-composition path), then put back: the
    weight in between is the composition, and afterwards bit for bit the original."""
    table = random_table(40, 64, 4, seed=5, per_row_scale=per_row_scale, wide=True)
    deltas = dense_deltas(table)
    weight = torch.randn(40, 64)
    original = weight.clone()
    put_back = add_in_place(weight.view(-1), table, [(2, 0.5), (3, -1.5), (1, 1.0)])
    expected = original.double() + 0.5 * deltas[2] - 1.5 * deltas[3]
    torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=1e-6)
    put_back()
    assert torch.equal(weight, original)


def test_rows_wider_than_16_bit_columns(backend):
    """A weight with more than 65,536 columns keeps int32 columns; every kernel still equals the dense deltas."""
    table = random_table(3, 70_001, 4, seed=6, per_row_scale=True, wide=False)
    assert table.columns.dtype == torch.int32 and int(table.columns.max()) > 2**16
    deltas = dense_deltas(table)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(SAMPLES), table.cols, generator=generator)
    y = torch.zeros(len(SAMPLES), table.rows)
    add_row_deltas(y, x, table, assignment_for_rows(np.arange(len(SAMPLES)), SAMPLES), LINEAR)
    zero = torch.zeros(table.rows, dtype=torch.float64)
    expected = torch.stack([sum((w * deltas[t] @ x[r].double() for t, w in SAMPLES[r]), zero) for r in range(5)])
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-3)  # float32 sums of up to 28,000 entries
    weight = torch.randn(table.rows, table.cols, generator=generator)
    original = weight.clone()
    put_back = add_in_place(weight.view(-1), table, [(0, 1.0), (3, 0.5)])
    torch.testing.assert_close(weight.double(), original.double() + deltas[0] + 0.5 * deltas[3], rtol=1e-6, atol=1e-6)
    put_back()
    assert torch.equal(weight, original)


def test_torch_path_is_chosen_when_forced_or_for_other_dtypes(monkeypatch):
    kernels._numba_kernels.cache_clear()
    assert fast_kernels_available()
    monkeypatch.setenv("SWITCH_ADAPTER_KERNELS", "torch")
    kernels._numba_kernels.cache_clear()
    try:
        assert not fast_kernels_available()
    finally:
        monkeypatch.delenv("SWITCH_ADAPTER_KERNELS")
        kernels._numba_kernels.cache_clear()
    # bfloat16 rows take the torch path even with numba present, and still get the right sums
    table = random_table(8, 10, 4, seed=4, per_row_scale=False, wide=False)
    x = torch.randn(5, 10).bfloat16()
    y = torch.zeros(5, 8, dtype=torch.bfloat16)
    add_row_deltas(y, x, table, assignment_for_rows(np.arange(5), SAMPLES), LINEAR)
    reference = torch.stack([sum((w * dense_deltas(table)[t] @ x[r].double() for t, w in SAMPLES[r]),
                                 torch.zeros(8, dtype=torch.float64)) for r in range(5)])  # fmt: skip
    torch.testing.assert_close(y.double(), reference, rtol=2e-2, atol=2e-2)


def test_starting_the_kernels_keeps_torchs_thread_count():
    """numba's OpenMP pool resets torch's thread count when it starts; loading the kernels puts the user's back."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import numpy as np
        import torch

        wanted = torch.get_num_threads() + 1  # not the default, which a reset would return to
        torch.set_num_threads(wanted)
        from switch_adapter.autoswitch import kernels

        assert kernels.fast_kernels_available()
        x = np.ones((8, 4), dtype=np.float32)
        lanes = np.empty(32, dtype=np.float32)
        kernels._numba_kernels().pack_lanes(lanes, x, np.arange(8, dtype=np.int64))  # a parallel kernel
        print(torch.get_num_threads() == wanted)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
