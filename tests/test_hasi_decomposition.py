"""The cheaper HASI decomposition routes (hasi.DECOMPOSITIONS) against the fp64 SVD reference, on plain tensors.

Tolerances: gram64 (eigh of the smaller Gram matrix in fp64) equals svd64 to fp64 noise (|dH| <= 1e-8); the fp32
routes (gram32, svd32) give |dH| <= 5e-4 on these synthetic inputs (condition numbers up to ~1e6), singular values
within 1e-3 of sigma_1, the same leading right vectors (|cos| >= 1 - 1e-4) and, in the allocation test, the same
integer ranks. (On SmolLM2's real statistics gram32 was NOT within tolerance: |dH| up to 1.3e-2, 6 of 210 layers
with other ranks; docs/performance.md. It stays an explicit option, gram64 is the default.)"""
import pytest
import torch

from thanora_ds import hasi
from thanora_ds.hasi import allocate_ranks, normalized_spectral_entropy, task_spectrum

ENTROPY_TOL = {"gram64": 1e-8, "svd32": 5e-4, "gram32": 5e-4}


def layer_inputs(d_out: int, d_in: int, tokens: int, seed: int, decay: float):
    """A weight with a decaying spectrum and a task statistic C = X^T X / n from anisotropic tokens."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -3, min(d_out, d_in), dtype=torch.float64)
    weight = (u[:, :s.numel()] * s) @ v[:, :s.numel()].T
    scales = torch.exp(-decay * torch.arange(d_in, dtype=torch.float64) / d_in)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) * scales
    return weight.float(), (x.T @ x / tokens).float()


SHAPES = [(96, 64), (48, 96), (64, 64)]   # tall (K^T K route), wide (K K^T route), square


@pytest.mark.parametrize("d_out,d_in", SHAPES)
@pytest.mark.parametrize("route", ["gram32", "gram64", "svd32"])
def test_route_matches_fp64_svd(route, d_out, d_in):
    weight, cov = layer_inputs(d_out, d_in, tokens=400, seed=d_out + d_in, decay=4.0)
    keep = 8
    ref = task_spectrum(weight, cov, "weighted", keep=keep, decomposition="svd64")
    got = task_spectrum(weight, cov, "weighted", keep=keep, decomposition=route)
    assert got.sigma.dtype == ref.sigma.dtype == torch.float64 and got.sigma.shape == ref.sigma.shape
    assert (got.sigma[:-1] >= got.sigma[1:]).all()                         # decreasing
    assert (got.sigma - ref.sigma).abs().max() <= 1e-3 * ref.sigma[0]
    assert abs(normalized_spectral_entropy(got.sigma) - normalized_spectral_entropy(ref.sigma)) <= ENTROPY_TOL[route]
    # the kept right vectors: orthonormal rows, and the same directions (up to sign) as the reference
    assert got.vh.shape == ref.vh.shape == (keep, d_in)
    torch.testing.assert_close(got.vh @ got.vh.T, torch.eye(keep, dtype=torch.float64), atol=1e-4, rtol=0)
    cosines = (got.vh * ref.vh).sum(1).abs()
    assert cosines.min() >= 1 - 1e-4, cosines


@pytest.mark.parametrize("route", ["gram64", "gram32"])
def test_gram_routes_give_the_same_allocation(route):
    """Entropies of 6 layers x 3 tasks (different statistics per task) through both routes: same ranks."""
    ref_rows, got_rows = [], []
    for layer, (d_out, d_in) in enumerate(SHAPES * 2):
        ref_row, got_row = [], []
        for task, decay in enumerate((0.5, 3.0, 8.0)):
            weight, cov = layer_inputs(d_out, d_in, tokens=300, seed=10 * layer, decay=decay)
            cov = cov * (1 + task)   # scale must not matter (entropy of normalized spectrum)
            for rows, r in ((ref_row, "svd64"), (got_row, route)):
                rows.append(normalized_spectral_entropy(
                    task_spectrum(weight, cov, "weighted", keep=4, decomposition=r).sigma))
        ref_rows.append(ref_row)
        got_rows.append(got_row)
    ref = torch.tensor(ref_rows, dtype=torch.float64)
    got = torch.tensor(got_rows, dtype=torch.float64)
    assert (got - ref).abs().max() <= ENTROPY_TOL[route]
    assert ref.std(dim=1).min() > 1e-3           # the tasks differ, so the allocation is not trivially uniform
    types = [f"m{i % 3}" for i in range(len(SHAPES) * 2)]
    ranks_ref = allocate_ranks(ref, types, 12, "scaled_softmax", 3.0, 1)
    assert allocate_ranks(got, types, 12, "scaled_softmax", 3.0, 1) == ranks_ref
    assert any(r != [4, 4, 4] for r in ranks_ref)


def test_rank_deficient_statistic_wide_route():
    """Fewer tokens than d_in (a thin task): tiny singular values must not produce NaN vectors."""
    weight, cov = layer_inputs(32, 80, tokens=10, seed=3, decay=1.0)
    spec = task_spectrum(weight, cov, "weighted", keep=32, decomposition="gram32")
    assert torch.isfinite(spec.vh).all() and torch.isfinite(spec.sigma).all()
    torch.testing.assert_close(spec.vh.norm(dim=1), torch.ones(32, dtype=torch.float64), atol=1e-5, rtol=0)


def test_route_selection():
    assert hasi.decomposition_route() == hasi.DEFAULT_DECOMPOSITION
    assert hasi.decomposition_route("svd64") == "svd64"
    with pytest.raises(ValueError, match="decomposition"):
        hasi.decomposition_route("qr")
    from thanora_ds.config import ConfigError, ThanoraConfig
    with pytest.raises(ConfigError, match="thanora.hasi_decomposition"):
        ThanoraConfig(hasi_decomposition="qr").validate()
