"""Tests for lmprune.masks on small hand-written tensors and small random layers."""

import math

import pytest
import torch

from lmprune.masks import (
    InputStatistics,
    lowest_mask,
    n_m_mask,
    random_mask,
    row_lowest_mask,
    sparsegpt_prune_,
    wanda_scores,
)

T, F = True, False


def mask_of(rows):
    return torch.tensor(rows, dtype=torch.bool)


def gram_hessian(inputs: torch.Tensor) -> torch.Tensor:
    """Return (2 / tokens) * X^T X for inputs of shape (tokens, in_features), in float32."""
    inputs = inputs.double()
    return (2.0 / inputs.shape[0] * inputs.T @ inputs).float()


def correlated_inputs(tokens: int, in_features: int, seed: int) -> torch.Tensor:
    """Return inputs driven by 4 shared factors plus small noise, so that the features correlate."""
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(tokens, 4, generator=generator)
    loadings = torch.randn(4, in_features, generator=generator)
    return factors @ loadings + 0.1 * torch.randn(tokens, in_features, generator=generator)


def random_weight(rows: int, columns: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


# lowest_mask, row_lowest_mask, n_m_mask


def test_lowest_mask_hand_example():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, 0.0]])

    assert torch.equal(lowest_mask(scores, 0.5), mask_of([[F, T, F], [T, F, T]]))


def test_lowest_mask_ties_prune_lower_index():
    all_equal = torch.full((2, 2), 2.0)
    boundary_tie = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 3.0]])

    assert torch.equal(lowest_mask(all_equal, 0.5), mask_of([[T, T], [F, F]]))
    assert torch.equal(lowest_mask(boundary_tie, 0.5), mask_of([[T, T, F], [F, T, F]]))


def test_lowest_mask_counts_use_python_round():
    scores = torch.arange(5.0)

    # round(2.5) == 2 in Python, which rounds halves to even.
    assert torch.equal(lowest_mask(scores, 0.5), mask_of([T, T, F, F, F]))
    assert not lowest_mask(scores, 0.0).any()
    for sparsity in (0.1, 0.25, 0.5, 0.9, 0.99):
        mask = lowest_mask(random_weight(7, 13, seed=0), sparsity)
        assert mask.sum().item() == round(sparsity * 91)


def test_lowest_mask_keeps_shape_and_empty_tensor():
    assert lowest_mask(torch.zeros(2, 3, 4), 0.5).shape == (2, 3, 4)
    assert lowest_mask(torch.zeros(0, 3), 0.5).shape == (0, 3)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, math.nan, True, "0.5", None])
def test_lowest_mask_rejects_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be .*\[0, 1\), got"):
        lowest_mask(torch.ones(4), sparsity)


def test_mask_functions_reject_nan_scores():
    scores = torch.tensor([[1.0, math.nan, 2.0, 3.0]])

    with pytest.raises(ValueError, match="NaN"):
        lowest_mask(scores, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        row_lowest_mask(scores, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        n_m_mask(scores, 2, 4)


def test_row_lowest_mask_hand_example():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.0, 0.0, 5.0, 0.0]])

    assert torch.equal(row_lowest_mask(scores, 0.5), mask_of([[F, T, F, T], [T, T, F, F]]))


def test_row_lowest_mask_counts_per_row():
    mask = row_lowest_mask(random_weight(6, 10, seed=1), 0.35)

    assert mask.sum(dim=1).tolist() == [round(0.35 * 10)] * 6


def test_row_lowest_mask_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"must be 2-D .* got shape \(4,\)"):
        row_lowest_mask(torch.ones(4), 0.5)


def test_n_m_mask_hand_example():
    scores = torch.tensor(
        [
            [1.0, 4.0, 3.0, 2.0, 8.0, 7.0, 6.0, 5.0],
            [2.0, 2.0, 2.0, 2.0, 0.0, 9.0, 0.0, 9.0],
        ]
    )
    expected = mask_of(
        [
            [T, F, F, T, F, F, T, T],
            [T, T, F, F, T, F, T, F],
        ]
    )

    assert torch.equal(n_m_mask(scores, kept=2, group=4), expected)


def test_n_m_mask_counts_per_group():
    mask = n_m_mask(random_weight(5, 16, seed=2), kept=4, group=8)

    assert mask.reshape(5, 2, 8).sum(dim=-1).eq(4).all()


def test_n_m_mask_rejects_indivisible_columns():
    with pytest.raises(ValueError, match="in_features 6 is not divisible by group 4"):
        n_m_mask(torch.ones(2, 6), kept=2, group=4)


@pytest.mark.parametrize(
    ("kept", "group", "message"),
    [
        (0, 4, r"kept must be in 1\.\.3 for group 4, got 0"),
        (4, 4, r"kept must be in 1\.\.3 for group 4, got 4"),
        (1, 1, "group must be at least 2, got 1"),
        (2.0, 4, "kept must be an integer, got 2.0"),
        (True, 4, "kept must be an integer, got True"),
    ],
)
def test_n_m_mask_rejects_bad_pattern(kept, group, message):
    with pytest.raises(ValueError, match=message):
        n_m_mask(torch.ones(2, 8), kept=kept, group=group)


# random_mask


def test_random_mask_exact_count():
    mask = random_mask((7, 9), 0.3, torch.Generator().manual_seed(0))

    assert mask.shape == (7, 9)
    assert mask.dtype == torch.bool
    assert mask.sum().item() == round(0.3 * 63)


def test_random_mask_same_seed_same_mask():
    first = random_mask((10, 10), 0.5, torch.Generator().manual_seed(3))
    second = random_mask((10, 10), 0.5, torch.Generator().manual_seed(3))

    assert torch.equal(first, second)


def test_random_mask_different_seed_differs():
    first = random_mask((10, 10), 0.5, torch.Generator().manual_seed(3))
    second = random_mask((10, 10), 0.5, torch.Generator().manual_seed(4))

    assert not torch.equal(first, second)


def test_random_mask_rejects_bad_arguments():
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got int"):
        random_mask((2, 2), 0.5, 0)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        random_mask((2, 2), 1.5, torch.Generator())


# wanda_scores


def test_wanda_unit_norms_equal_row_magnitude():
    weight = random_weight(8, 12, seed=5)
    scores = wanda_scores(weight, torch.ones(12))

    assert torch.equal(scores, weight.abs())
    assert torch.equal(row_lowest_mask(scores, 0.5), row_lowest_mask(weight.abs(), 0.5))


def test_wanda_large_norm_keeps_small_weight():
    weight = torch.tensor([[1.0, 0.2]])
    scores = wanda_scores(weight, torch.tensor([1.0, 10.0]))

    assert torch.allclose(scores, torch.tensor([[1.0, 2.0]]))
    assert torch.equal(row_lowest_mask(scores, 0.5), mask_of([[T, F]]))
    assert torch.equal(row_lowest_mask(weight.abs(), 0.5), mask_of([[F, T]]))


def test_wanda_scores_are_float32():
    scores = wanda_scores(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float16))

    assert scores.dtype == torch.float32


def test_wanda_rejects_mismatched_norms():
    with pytest.raises(ValueError, match=r"input_norms has shape \(3,\) .* must have shape \(4,\)"):
        wanda_scores(torch.ones(2, 4), torch.ones(3))


# InputStatistics


HAND_INPUTS = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 2.0]])


def test_input_statistics_hand_example():
    statistics = InputStatistics(3, hessian=True)
    statistics.update(HAND_INPUTS)

    # Sums of squares per feature: 1 + 9, 4 + 1, 0 + 4.
    assert torch.allclose(statistics.norms(), torch.tensor([10.0, 5.0, 4.0]).sqrt())
    # (2 / 2 tokens) * X^T X.
    expected_hessian = torch.tensor([[10.0, -1.0, 6.0], [-1.0, 5.0, -2.0], [6.0, -2.0, 4.0]])
    assert torch.allclose(statistics.hessian(), expected_hessian)
    assert statistics.hessian().dtype == torch.float32
    assert statistics.tokens == 2


def test_input_statistics_accumulates_updates():
    inputs = correlated_inputs(10, 5, seed=6)
    in_two_calls = InputStatistics(5, hessian=True)
    in_two_calls.update(inputs[:4].reshape(2, 2, 5))
    in_two_calls.update(inputs[4:])
    in_one_call = InputStatistics(5, hessian=True)
    in_one_call.update(inputs)

    assert in_two_calls.tokens == 10
    assert torch.allclose(in_two_calls.norms(), in_one_call.norms(), rtol=1e-6)
    assert torch.allclose(in_two_calls.hessian(), in_one_call.hessian(), rtol=1e-5, atol=1e-6)


def test_input_statistics_accepts_bfloat16():
    statistics = InputStatistics(3, hessian=False, device="cpu")
    statistics.update(HAND_INPUTS.to(torch.bfloat16))

    assert statistics.device == torch.device("cpu")
    assert torch.allclose(statistics.norms(), torch.tensor([10.0, 5.0, 4.0]).sqrt())


def test_input_statistics_without_inputs_raises():
    statistics = InputStatistics(3, hessian=True)

    with pytest.raises(RuntimeError, match="no input tokens"):
        statistics.norms()
    with pytest.raises(RuntimeError, match="no input tokens"):
        statistics.hessian()


def test_input_statistics_rejects_bad_use():
    statistics = InputStatistics(3, hessian=False)

    with pytest.raises(ValueError, match=r"inputs have shape \(2, 4\) .* last dimension must be 3"):
        statistics.update(torch.ones(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        statistics.update(torch.ones(2, 3, dtype=torch.int64))
    statistics.update(HAND_INPUTS)
    with pytest.raises(RuntimeError, match="hessian=False"):
        statistics.hessian()
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        InputStatistics(0, hessian=False)


# sparsegpt_prune_ with an identity Hessian: no correlations, so no compensation


def test_sparsegpt_identity_equals_global_magnitude():
    original = random_weight(8, 16, seed=7)
    weight = original.clone()

    mask = sparsegpt_prune_(weight, torch.eye(16), 0.5, block_size=128)

    assert torch.equal(mask, lowest_mask(original.abs(), 0.5))
    assert torch.equal(weight[~mask], original[~mask])
    assert weight[mask].eq(0).all()


def test_sparsegpt_identity_one_row_magnitude():
    original = random_weight(1, 32, seed=8)
    whole_row = original.clone()
    in_blocks = original.clone()

    whole_row_mask = sparsegpt_prune_(whole_row, torch.eye(32), 0.5, block_size=64)
    block_mask = sparsegpt_prune_(in_blocks, torch.eye(32), 0.5, block_size=8)

    assert torch.equal(whole_row_mask, row_lowest_mask(original.abs(), 0.5))
    assert torch.equal(whole_row[~whole_row_mask], original[~whole_row_mask])
    # With smaller blocks the mask is magnitude within each block of 8 columns.
    for start in range(0, 32, 8):
        expected = lowest_mask(original[:, start : start + 8].abs(), 0.5)
        assert torch.equal(block_mask[:, start : start + 8], expected)
    assert torch.equal(in_blocks[~block_mask], original[~block_mask])


@pytest.mark.parametrize("block_size", [8, 128])
def test_sparsegpt_identity_n_m_equals_magnitude(block_size):
    original = random_weight(6, 16, seed=9)
    weight = original.clone()

    mask = sparsegpt_prune_(weight, torch.eye(16), kept=2, group=4, block_size=block_size)

    assert torch.equal(mask, n_m_mask(original.abs(), 2, 4))
    assert torch.equal(weight[~mask], original[~mask])
    assert weight[mask].eq(0).all()


# sparsegpt_prune_ compensation


def test_sparsegpt_two_inputs_least_squares():
    inputs = torch.tensor([[1.0, 1.0], [2.0, 1.0], [0.0, 1.0], [1.0, 2.0]])
    hessian = gram_hessian(inputs)
    # H = [[a, b], [b, c]] = [[3, 2.5], [2.5, 3.5]].
    b, c = hessian[0, 1].item(), hessian[1, 1].item()
    w0, w1 = 0.05, 1.0
    weight = torch.tensor([[w0, w1]])

    mask = sparsegpt_prune_(weight, hessian, 0.5, dampening=1e-10)

    assert torch.equal(mask, mask_of([[T, F]]))
    assert weight[0, 0].item() == 0.0
    assert weight[0, 1].item() == pytest.approx(w1 + w0 * b / c, rel=1e-6)
    solution = torch.linalg.lstsq(inputs[:, 1:].double(), inputs.double() @ torch.tensor([w0, w1]).double()).solution
    assert weight[0, 1].item() == pytest.approx(solution.item(), rel=1e-6)


@pytest.mark.parametrize("block_size", [16, 128])
def test_sparsegpt_beats_magnitude_reconstruction(block_size):
    inputs = correlated_inputs(256, 64, seed=10)
    original = random_weight(16, 64, seed=11)
    magnitude = original.masked_fill(lowest_mask(original.abs(), 0.5), 0.0)
    pruned = original.clone()

    mask = sparsegpt_prune_(pruned, gram_hessian(inputs), 0.5, block_size=block_size)

    sparsegpt_error = torch.linalg.norm((original - pruned) @ inputs.T)
    magnitude_error = torch.linalg.norm((original - magnitude) @ inputs.T)
    assert sparsegpt_error < magnitude_error
    assert pruned[mask].eq(0).all()
    # Each block of block_size columns prunes round(0.5 * 16 * width) weights.
    assert mask.sum().item() == 512


def reference_obs_update(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Apply SparseGPT's column-by-column update for a fixed mask in float64, without blocks.

    The dampening is 0.01, the default of sparsegpt_prune_.
    """
    hessian = hessian.double().clone()
    hessian.diagonal().add_(0.01 * hessian.diagonal().mean())
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    result = weight.double().clone()
    for i in range(result.shape[1]):
        kept = result[:, i].masked_fill(mask[:, i], 0.0)
        error = (result[:, i] - kept) / upper[i, i]
        result[:, i:] -= error[:, None] * upper[i, i:][None, :]
        result[:, i] = kept
    return result.float()


@pytest.mark.parametrize("block_size", [16, 128])
def test_sparsegpt_matches_unblocked_reference(block_size):
    hessian = gram_hessian(correlated_inputs(256, 64, seed=10))
    original = random_weight(16, 64, seed=11)
    pruned = original.clone()

    mask = sparsegpt_prune_(pruned, hessian, 0.5, block_size=block_size)

    assert torch.allclose(pruned, reference_obs_update(original, hessian, mask), atol=1e-4)


def test_sparsegpt_n_m_independent_of_block_size():
    # N:M masks are chosen on the current weights at each group, which do not depend on
    # how the updates are batched, so the block size changes only the rounding.
    hessian = gram_hessian(correlated_inputs(128, 32, seed=12))
    original = random_weight(8, 32, seed=13)
    small_blocks = original.clone()
    one_block = original.clone()

    small_mask = sparsegpt_prune_(small_blocks, hessian, kept=2, group=4, block_size=4)
    one_mask = sparsegpt_prune_(one_block, hessian, kept=2, group=4, block_size=32)

    assert torch.equal(small_mask, one_mask)
    assert torch.allclose(small_blocks, one_block, rtol=1e-4, atol=1e-4)
    assert small_mask.reshape(8, 8, 4).sum(dim=-1).eq(2).all()


def test_sparsegpt_dead_inputs():
    inputs = correlated_inputs(64, 6, seed=14)
    inputs[:, 2] = 0.0
    weight = random_weight(4, 6, seed=15)

    mask = sparsegpt_prune_(weight, gram_hessian(inputs), 0.5)

    assert torch.isfinite(weight).all()
    assert weight[:, 2].eq(0).all()
    assert mask[:, 2].all()
    assert mask.sum().item() == 12


def test_sparsegpt_rejects_indefinite_hessian():
    hessian = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1

    with pytest.raises(ValueError, match="not positive definite.*pruning.sparsegpt.dampening or add calibration samples"):
        sparsegpt_prune_(torch.ones(2, 2), hessian, 0.5)


def test_sparsegpt_keeps_bfloat16():
    hessian = gram_hessian(correlated_inputs(64, 16, seed=16))
    weight = random_weight(8, 16, seed=17).to(torch.bfloat16)

    mask = sparsegpt_prune_(weight, hessian, 0.5)

    assert weight.dtype == torch.bfloat16
    assert weight[mask].eq(0).all()
    assert mask.sum().item() == 64


def test_sparsegpt_writes_through_transposed_view():
    # A GPT-2 Conv1D weight is stored as (in_features, out_features).
    hessian = gram_hessian(correlated_inputs(64, 8, seed=18))
    conv1d_weight = random_weight(8, 4, seed=19)
    linear_weight = conv1d_weight.T.clone()

    view_mask = sparsegpt_prune_(conv1d_weight.T, hessian, 0.5)
    copy_mask = sparsegpt_prune_(linear_weight, hessian, 0.5)

    assert torch.equal(view_mask, copy_mask)
    assert torch.equal(conv1d_weight.T, linear_weight)


def test_sparsegpt_leaves_hessian_unchanged():
    hessian = gram_hessian(correlated_inputs(64, 8, seed=20))
    hessian[3, :] = 0.0
    hessian[:, 3] = 0.0
    before = hessian.clone()

    sparsegpt_prune_(random_weight(4, 8, seed=21), hessian, 0.5)

    assert torch.equal(hessian, before)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sparsity": 0.5, "kept": 2, "group": 4}, "not both"),
        ({}, "missing pruning target"),
        ({"kept": 2}, "needs both kept and group"),
        ({"kept": 2, "group": 4, "block_size": 6}, "block_size 6 is not a multiple of group 4"),
        ({"kept": 2, "group": 3}, "in_features 8 is not divisible by group 3"),
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": 0.5, "block_size": 0}, "block_size must be a positive integer, got 0"),
        ({"sparsity": 0.5, "dampening": -0.1}, "dampening must be a finite number >= 0, got -0.1"),
    ],
)
def test_sparsegpt_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        sparsegpt_prune_(torch.ones(2, 8), torch.eye(8), **arguments)


def test_sparsegpt_rejects_bad_tensors():
    with pytest.raises(ValueError, match=r"hessian has shape \(4, 4\) .* must have shape \(8, 8\)"):
        sparsegpt_prune_(torch.ones(2, 8), torch.eye(4), 0.5)
    with pytest.raises(ValueError, match="hessian contains NaN or infinite values"):
        sparsegpt_prune_(torch.ones(2, 2), torch.tensor([[1.0, math.nan], [math.nan, 1.0]]), 0.5)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.float64"):
        sparsegpt_prune_(torch.ones(2, 2, dtype=torch.float64), torch.eye(2), 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparsegpt_cuda_matches_cpu():
    hessian = gram_hessian(correlated_inputs(128, 32, seed=22))
    on_cpu = random_weight(8, 32, seed=23)
    on_cuda = on_cpu.cuda()

    cpu_mask = sparsegpt_prune_(on_cpu, hessian, 0.5, block_size=16)
    cuda_mask = sparsegpt_prune_(on_cuda, hessian.cuda(), 0.5, block_size=16)

    assert cuda_mask.device.type == "cuda"
    assert torch.equal(cuda_mask.cpu(), cpu_mask)
    assert torch.allclose(on_cuda.cpu(), on_cpu, rtol=1e-3, atol=1e-4)
