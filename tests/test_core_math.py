"""Pure maths of the method on plain tensors: SPR, entropy, allocation, orthogonal and CorDA blocks."""
import itertools

import pytest
import torch

from thanora_ds.hasi import (allocate_ranks, allocation_shares, common_prefix_length, corda_blocks,
                             largest_remainder_ranks, normalized_spectral_entropy, orthogonal_task_rows,
                             task_spectrum)
from thanora_ds.spr import spr_layer_penalty


def dense_spr(A, B, sizes, normalize):
    """The formula written out literally: sum over task pairs of ||A_i A_j^T||^2 + ||B_i^T B_j||^2."""
    if normalize:
        A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-8)
        B = B / B.norm(dim=0, keepdim=True).clamp_min(1e-8)
    starts = [0] + list(itertools.accumulate(sizes))
    total = 0.0
    for i, j in itertools.combinations(range(len(sizes)), 2):
        Ai, Aj = A[starts[i]:starts[i + 1]], A[starts[j]:starts[j + 1]]
        Bi, Bj = B[:, starts[i]:starts[i + 1]], B[:, starts[j]:starts[j + 1]]
        total = total + (Ai @ Aj.T).pow(2).sum() + (Bi.T @ Bj).pow(2).sum()
    return total


@pytest.mark.parametrize("normalize", [True, False])
def test_spr_value_and_gradient_match_dense_formula(normalize):
    torch.manual_seed(0)
    sizes = [3, 2, 4]
    A = torch.randn(11, 20, dtype=torch.float64, requires_grad=True)  # 9 task rows + 2 shared rows
    B = torch.randn(16, 11, dtype=torch.float64, requires_grad=True)
    ours = spr_layer_penalty(A.float(), B.float(), sizes, normalize=normalize)
    ga, gb = torch.autograd.grad(ours, (A, B))
    ref = dense_spr(A, B, sizes, normalize)
    ra, rb = torch.autograd.grad(ref, (A, B))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-5)
    # the shared block (last 2 rows / columns) is never penalized
    assert ga[9:].abs().max() == 0 and gb[:, 9:].abs().max() == 0


def test_spr_terms_options():
    torch.manual_seed(1)
    A, B = torch.randn(6, 10), torch.randn(8, 6)
    both = spr_layer_penalty(A, B, [3, 3])
    only_a = spr_layer_penalty(A, B, [3, 3], terms="A")
    only_b = spr_layer_penalty(A, B, [3, 3], terms="B")
    assert only_a > 0 and only_b > 0
    torch.testing.assert_close(both, only_a + only_b)
    with pytest.raises(ValueError, match="spr_terms"):
        spr_layer_penalty(A, B, [3, 3], terms="C")


def test_spr_zero_on_orthogonal_blocks_and_zero_B():
    q, _ = torch.linalg.qr(torch.randn(12, 12))
    A = q[:6]  # orthonormal rows
    B = torch.zeros(9, 6)
    assert spr_layer_penalty(A, B, [2, 2, 2]).item() < 1e-10
    Bq, _ = torch.linalg.qr(torch.randn(9, 9))
    assert spr_layer_penalty(A, Bq[:, :6], [2, 2, 2]).item() < 1e-10


def test_normalized_spr_is_scale_invariant_raw_is_not():
    torch.manual_seed(2)
    A, B = torch.randn(6, 10), torch.randn(8, 6)
    base = spr_layer_penalty(A, B, [2, 4])
    torch.testing.assert_close(spr_layer_penalty(7.0 * A, B, [2, 4]), base)
    torch.testing.assert_close(spr_layer_penalty(A, 0.01 * B, [2, 4]), base)
    # per-row scaling too: squared cosines
    torch.testing.assert_close(spr_layer_penalty(A * torch.rand(6, 1) * 5, B, [2, 4]), base)
    raw = spr_layer_penalty(A, B, [2, 4], normalize=False)
    assert not torch.allclose(spr_layer_penalty(7.0 * A, B, [2, 4], normalize=False), raw)


def test_entropy_bounds():
    assert normalized_spectral_entropy(torch.ones(10)) == pytest.approx(1.0)
    assert normalized_spectral_entropy(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(0.0)
    assert normalized_spectral_entropy(torch.zeros(5)) == 0.0
    h = normalized_spectral_entropy(torch.tensor([4.0, 2.0, 1.0]))
    assert 0 < h < 1


def synthetic_covariances(d=24, seed=0):
    """Task 0: a peaked input spectrum (few directions); task 1: flat (many directions)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    peaked = q @ torch.diag(torch.logspace(0, -4, d, dtype=torch.float64)) @ q.T
    flat = q @ torch.diag(torch.linspace(1.0, 0.5, d, dtype=torch.float64)) @ q.T
    weight = torch.randn(20, d, generator=g, dtype=torch.float64)
    return weight, [peaked, flat]


@pytest.mark.parametrize("spectrum", ["weighted", "covariance"])
def test_flatter_task_gets_more_rank_and_tau_moves_towards_uniform(spectrum):
    weight, covs = synthetic_covariances()
    h = torch.tensor([[normalized_spectral_entropy(task_spectrum(weight, c, spectrum).sigma) for c in covs]])
    assert h[0, 1] > h[0, 0]  # flat spectrum = higher entropy
    types = ["q_proj"]
    for method in ("softmax", "proportional"):
        ranks = allocate_ranks(h, types, 16, method, tau=0.1, min_rank=1)[0]
        assert ranks[1] > ranks[0] and sum(ranks) == 16
    # several layers of one type so scaled_softmax has a pooled scale
    h3 = torch.cat([h, h * 0.9, h * 1.1]).clamp(max=1)
    ranks = allocate_ranks(h3, types * 3, 16, "scaled_softmax", tau=1.0, min_rank=1)
    assert all(r[1] > r[0] and sum(r) == 16 for r in ranks)
    # tau up -> shares move towards uniform, monotonically
    for method in ("softmax", "scaled_softmax"):
        gaps = [float(allocation_shares(h3, types * 3, method, tau)[0].diff().abs()) for tau in (0.1, 0.5, 2, 10)]
        assert gaps == sorted(gaps, reverse=True) and gaps[-1] < gaps[0]
    assert allocate_ranks(h, types, 16, "uniform")[0] == [8, 8]


def test_scaled_softmax_pools_scale_per_module_type():
    # q layers have a tiny spread, down layers a large one: per-type scaling gives both the same split
    h = torch.tensor([[0.50, 0.51], [0.50, 0.51], [0.3, 0.6], [0.3, 0.6]])
    shares = allocation_shares(h, ["q_proj", "q_proj", "down_proj", "down_proj"], "scaled_softmax", tau=3.0)
    torch.testing.assert_close(shares[0], shares[2])
    # zero spread -> uniform
    flat = allocation_shares(torch.full((2, 3), 0.4), ["o_proj"] * 2, "scaled_softmax", 3.0)
    torch.testing.assert_close(flat, torch.full((2, 3), 1 / 3, dtype=flat.dtype))


def test_largest_remainder_rounding():
    assert largest_remainder_ranks(torch.tensor([0.5, 0.3, 0.2]), 10, 1) == [5, 3, 2]
    # 7 spare * [1/3]*3 = 2.333 each: floors 2, one more to the lowest index
    assert largest_remainder_ranks(torch.tensor([1 / 3] * 3), 10, 1) == [4, 3, 3]
    # min_rank is honoured even for a share of ~0
    ranks = largest_remainder_ranks(torch.tensor([0.999, 0.001, 0.0]), 12, 2)
    assert sum(ranks) == 12 and min(ranks) >= 2
    with pytest.raises(ValueError):
        largest_remainder_ranks(torch.tensor([0.5, 0.5]), 3, 2)


def test_orthogonal_rows_are_mutually_orthogonal_and_keep_leading_row():
    weight, covs = synthetic_covariances()
    covs = covs + [covs[0] * 2.0]  # task 2 shares task 0's directions: forces Gram-Schmidt work
    spectra = [task_spectrum(weight, c, "weighted", keep=12) for c in covs]
    ranks = [3, 4, 3]
    rows = orthogonal_task_rows(spectra, ranks, gamma=0.5)
    assert rows.shape == (10, 24)
    gram = rows @ rows.T
    torch.testing.assert_close(gram, 0.25 * torch.eye(10, dtype=gram.dtype), atol=1e-10, rtol=0)
    # the overall leading row (each task's first vector has ratio 1: task 0 first) is kept as is
    torch.testing.assert_close(rows[0], 0.5 * spectra[0].vh[0])
    # task 2's own top vectors coincide with task 0's: they were replaced, still orthogonal to task 0
    assert (rows[:3] @ rows[7:].T).abs().max() < 1e-10


def test_corda_blocks_reconstruct_rank_r_product():
    weight, covs = synthetic_covariances()
    cov = covs[1]
    b, a = corda_blocks(weight, cov, rank=5, scale=2.0)
    damped = cov + 0.01 * cov.diagonal().mean() * torch.eye(24, dtype=cov.dtype)
    u, s, vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    expected = (u[:, :5] * s[:5]) @ vh[:5] @ torch.linalg.inv(damped)
    torch.testing.assert_close(2.0 * b @ a, expected)
    # prefixes of a larger decomposition equal the smaller one (the initializer slices per task rank)
    b8, a8 = corda_blocks(weight, cov, rank=8, scale=2.0)
    torch.testing.assert_close(b8[:, :5], b)
    torch.testing.assert_close(a8[:5], a)


def test_common_prefix_length():
    assert common_prefix_length([[1, 5, 7, 9], [1, 5, 8], [1, 5, 7]]) == 2
    assert common_prefix_length([[3, 4], [5, 6]]) == 1   # at least the attention sink
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # keep one content token
    # a text rule: it ends at the first image token, however identical the placeholders of image-first previews
    img = 99
    assert common_prefix_length([[1, 5, img, img, 7, 8], [1, 5, img, img, 7, 9]]) == 5
    assert common_prefix_length([[1, 5, img, img, 7, 8], [1, 5, img, img, 7, 9]], image_token=img) == 2
