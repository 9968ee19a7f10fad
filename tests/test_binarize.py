"""Spec tests of the T-Switch rules: per-sign top-k, ties, empty quotas, zeros, RMS scale."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from switch_adapter.codec.binarize import binarize


def test_positive_and_negative_entries_are_ranked_separately():
    tau = torch.tensor([4.0, 3.0, 2.0, 1.0, -0.4, -0.3, -0.2, -0.1])
    switch = binarize(tau, density=0.5)
    # top 2 of 4 positives by value, top 2 of 4 negatives by magnitude, although all negatives are small
    assert switch.mask.tolist() == [True, True, False, False, True, True, False, False]
    assert switch.positive.tolist() == [True, True, False, False]


def test_exactly_the_quota_is_kept_and_ties_at_the_cut_go_by_position():
    tau = torch.tensor([3.0, 1.0, 1.0, 0.5, -5.0, -2.0, -0.1, 1.0])
    switch = binarize(tau, density=0.5)
    # positives: quota floor(5 * 0.5) = 2, threshold 1.0: 3.0 and the first 1.0 (lowest position) are kept
    assert switch.mask.tolist() == [True, True, False, False, True, False, False, False]


def test_keep_ties_keeps_every_entry_at_the_cut_as_the_reference_does():
    tau = torch.tensor([3.0, 1.0, 1.0, 0.5, -5.0, -2.0, -0.1, 1.0])
    switch = binarize(tau, density=0.5, keep_ties=True)
    assert switch.mask.tolist() == [True, True, True, False, True, False, False, True]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]), min_size=1, max_size=200),
    st.floats(min_value=0.01, max_value=1.0),
)
def test_kept_count_is_exactly_the_quota_per_sign_with_many_ties(values, density):
    tau = torch.tensor(values)
    switch = binarize(tau, density=density)
    for side in (tau > 0, tau < 0):
        count, quota = int(side.sum()), int(int(side.sum()) * density)
        expected = count if quota == 0 else quota
        assert int((switch.mask & side).sum()) == expected


def test_a_partition_whose_quota_rounds_to_zero_is_kept_whole():
    tau = torch.tensor([0.3, -1.0, -2.0, -3.0, -4.0, -5.0])
    switch = binarize(tau, density=0.4)
    # one positive: floor(1 * 0.4) = 0 -> kept whole; five negatives: floor(5 * 0.4) = 2
    assert switch.mask.tolist() == [True, False, False, False, True, True]


def test_zeros_are_never_kept_and_all_zero_gives_zero_scale():
    switch = binarize(torch.tensor([0.0, 0.0, 2.0, 0.0]), density=1.0)
    assert switch.mask.tolist() == [False, False, True, False]
    empty = binarize(torch.zeros(5), density=0.5)
    assert not empty.mask.any() and empty.scale.item() == 0.0


def test_scale_is_the_rms_of_kept_entries_not_their_mean_magnitude():
    tau = torch.tensor([3.0, 1.0, -1.0, -3.0])
    switch = binarize(tau, density=1.0, scale_rule="rms")
    assert switch.scale.item() == pytest.approx(math.sqrt((9 + 1 + 1 + 9) / 4))
    reference = binarize(tau, density=0.5, scale_rule="rms")  # keeps 3.0 and -3.0
    assert reference.scale.item() == pytest.approx(3.0)
    assert binarize(tau, density=0.5).scale.item() == pytest.approx(math.sqrt(20 / 2))  # the default: "norm"
    torch.testing.assert_close(switch.to_dense(), switch.scale * torch.tensor([1.0, 1.0, -1.0, -1.0]))


def test_row_scale_is_one_rms_per_output_row():
    tau = torch.tensor([[1.0, -1.0], [0.0, 4.0], [0.0, 0.0]])
    switch = binarize(tau, density=1.0, scale_granularity="row")
    torch.testing.assert_close(switch.scale, torch.tensor([1.0, 4.0, 0.0]))
    torch.testing.assert_close(switch.to_dense(), torch.tensor([[1.0, -1.0], [0.0, 4.0], [0.0, 0.0]]))


def test_low_precision_inputs_are_computed_in_float32():
    tau = torch.randn(64, 64)
    a, b = binarize(tau, 0.3), binarize(tau.to(torch.bfloat16), 0.3)
    assert b.scale.dtype == torch.float32
    assert (a.mask != b.mask).float().mean() < 0.05  # bf16 rounding may move a few entries across the cut


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_the_unit_interval_is_refused(density):
    with pytest.raises(ValueError, match="density"):
        binarize(torch.randn(10), density)


def test_nan_or_inf_is_refused_with_the_tensor_name():
    with pytest.raises(ValueError, match="layer.0.query.weight.*NaN/Inf"):
        binarize(torch.tensor([1.0, float("nan")]), 0.5, name="layer.0.query.weight")
    with pytest.raises(ValueError, match="NaN/Inf"):
        binarize(torch.tensor([1.0, float("inf")]), 0.5)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=200),
    density=st.floats(0.01, 1.0),
)
def test_kept_counts_follow_the_quota_rule(values, density):
    tau = torch.tensor(values, dtype=torch.float32)
    switch = binarize(tau, density, keep_ties=True)  # the reference rule
    for sign in (1, -1):
        part = tau[tau * sign > 0]
        kept = int((switch.mask & (tau * sign > 0)).sum())
        quota = int(part.numel() * density)
        if part.numel() == 0:
            assert kept == 0
        elif quota == 0:
            assert kept == part.numel()
        else:
            assert kept >= quota  # ties can add entries, never remove
            threshold = torch.sort(part.abs(), descending=True).values[quota - 1]
            assert kept == int((part.abs() >= threshold).sum())
    assert not switch.mask[tau == 0].any()
    assert switch.positive.tolist() == (tau[switch.mask] > 0).tolist()


def test_norm_scale_rule_keeps_the_norm_of_the_whole_task_vector():
    tau = torch.tensor([4.0, 1.0, 1.0, 0.5, -3.0, -0.5])
    switch = binarize(tau, density=0.5, scale_rule="norm")
    assert torch.linalg.vector_norm(switch.to_dense()).item() == pytest.approx(torch.linalg.vector_norm(tau).item())
    assert switch.mask.tolist() == binarize(tau, density=0.5).mask.tolist()  # same mask, another scale
    rows = binarize(tau.view(2, 3), density=0.5, scale_rule="norm", scale_granularity="row")
    torch.testing.assert_close(
        torch.linalg.vector_norm(rows.to_dense(), dim=1), torch.linalg.vector_norm(tau.view(2, 3), dim=1)
    )


def test_unknown_scale_rule_is_refused():
    with pytest.raises(ValueError, match="scale_rule"):
        binarize(torch.randn(4), 0.5, scale_rule="mean")


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.sampled_from([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0, 3.5]), min_size=1, max_size=300),
    st.floats(min_value=0.01, max_value=1.0),
    st.booleans(),
)
def test_the_fused_cpu_route_keeps_the_same_entries_as_the_torch_route(values, density, keep_ties):
    from switch_adapter.codec.binarize import _keep_numpy, _keep_torch

    flat = torch.tensor(values)
    mask, kept = _keep_numpy(flat, density, keep_ties)
    reference_mask, reference_kept = _keep_torch(flat, density, keep_ties)
    assert torch.equal(mask, reference_mask) and torch.equal(kept, reference_kept)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_the_fused_cpu_route_matches_the_torch_route_on_gaussian_tensors(density):
    from switch_adapter.codec.binarize import _keep_numpy, _keep_torch

    flat = torch.randn(20_000, generator=torch.Generator().manual_seed(3)).round(decimals=2)
    for keep_ties in (False, True):
        mask, kept = _keep_numpy(flat, density, keep_ties)
        reference_mask, reference_kept = _keep_torch(flat, density, keep_ties)
        assert torch.equal(mask, reference_mask) and torch.equal(kept, reference_kept)
