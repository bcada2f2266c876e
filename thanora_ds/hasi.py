"""Heterogeneity-aware subspace initialization (METHOD.md section 2): the maths, on plain tensors.

Nothing here knows about models, hooks or ranks. The pipeline per target layer l and task t is

    C_t = S_t / n_t                          (input second moment of task t's content tokens)
    K_t = W (C_t + delta I)                  (spectrum="weighted", default; delta = 0.01 mean diag C_t)
        or C_t alone                          (spectrum="covariance": eigen-decomposition, undamped)
    sigma, V = spectrum of K_t
    H_t = -sum_i p_i log p_i / log n,  p = sigma / sum sigma      (normalized spectral entropy)

then, over all layers at once (scaled_softmax pools a scale per module type), ranks r_t^l by
``allocate_ranks`` and blocks by ``orthogonal_task_rows`` (default) or ``corda_blocks``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALLOCATIONS = ("scaled_softmax", "softmax", "proportional", "uniform")
SPECTRA = ("weighted", "covariance")
GAMMA_RULES = ("constant", "match_lora")
DECOMP_DTYPE = torch.float64  # SVDs of d x d statistics: fp64 keeps step-0 equalities at 1e-6
# How the weighted spectrum of K = W (C + delta I) is computed (docs/performance.md, "HASI at scale"):
#   gram64  default: eigh of the smaller Gram matrix (K^T K or K K^T) in fp64: sigma = sqrt(eigenvalues), the kept
#           right vectors directly (K^T K) or as normalized K^T u (K K^T); equal to svd64 to fp64 noise (entropies
#           within 1e-8), 1.5-1.9x faster on CPU (measured on the SmolLM2 and LLaMA-2-7B shapes)
#   svd64   the reference: torch.linalg.svd of K in fp64 (the route before issue 14)
#   gram32  the same in fp32: 2.3-4.5x faster per shape, but on SmolLM2's real statistics entropies moved by up to
#           1.3e-2 and 6 of 210 layers got other ranks (fp32 Gram of ill-conditioned statistics): opt-in only
#   svd32   fp32 SVD (measured, not recommended)
# tests/test_hasi_decomposition.py compares every route with svd64. A run picks one with thanora.hasi_decomposition.
DECOMPOSITIONS = ("gram64", "svd64", "gram32", "svd32")
DEFAULT_DECOMPOSITION = "gram64"


def decomposition_route(name: str | None = None) -> str:
    """The route to use: ``name``, else DEFAULT_DECOMPOSITION."""
    route = name or DEFAULT_DECOMPOSITION
    if route not in DECOMPOSITIONS:
        raise ValueError(f"HASI decomposition must be one of {DECOMPOSITIONS}, got {route!r}")
    return route


def common_prefix_length(sequences: Sequence[Sequence[int]], image_token: int | None = None) -> int:
    """Length of the longest token prefix shared by ALL sequences, at least 1 (position 0, the attention
    sink, is always excluded). Computed over every preview before sharding, so it is world-size free.
    A text rule (METHOD.md 2.2): it ends at the first ``image_token``, whose positions are always content,
    however identical the placeholder ids of image-first previews are."""
    if not sequences:
        return 1
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    n = 0
    while n < shortest and first[n] != image_token and all(s[n] == first[n] for s in sequences):
        n += 1
    # A prefix covering a whole sequence would leave it with no content tokens: keep the last one.
    return max(1, min(n, shortest - 1))


def damping(cov: torch.Tensor) -> float:
    """delta = 0.01 * mean(diag C)."""
    return 0.01 * float(cov.diagonal().mean())


@dataclass
class Spectrum:
    """Decreasing spectrum of one (task, layer): ``sigma`` (n,), right vectors ``vh`` (k, d_in) as rows,
    and for the weighted spectrum the left vectors ``u`` (d_out, k); ``k`` = how many leading vectors kept."""

    sigma: torch.Tensor
    vh: torch.Tensor
    u: torch.Tensor | None = None


def projected_covariances(spectra: Sequence[Spectrum], covs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[float]]:
    """For ``lora_matched_gains``: each task's C_t seen in the span of every task's kept right vectors,
    ``P_t = V C_t V^T`` with V = [vh_1; ...; vh_T] (m x m, m = the kept vectors of all tasks), and tr C_t. HASI's
    rows are combinations of V's rows, so with their coefficients G_t (A_t = G_t V) the block's input energy
    is exactly tr(A_t C_t A_t^T) = tr(G_t P_t G_t^T), with no d_in x d_in matrix kept until the ranks are known."""
    v = torch.cat([spec.vh.to(DECOMP_DTYPE) for spec in spectra])
    return ([v @ cov.to(DECOMP_DTYPE) @ v.T for cov in covs], [float(cov.diagonal().sum()) for cov in covs])


def lora_matched_gains(coefficients: Sequence[torch.Tensor], projected: Sequence[torch.Tensor],
                       traces: Sequence[float], d_in: int) -> list[float]:
    """Per-task gamma_t that gives HASI's unit-row block plain LoRA's initial input scale (``gamma_rule:
    match_lora``).

    Plain LoRA's A is Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)), variance
    1/(3 d_in), so E_A ||A_t x||^2 = r_t ||x||^2 / (3 d_in) and, over task t's inputs, r_t tr(C_t) / (3 d_in).
    HASI's r_t unit rows along the top directions capture tr(A_t C_t A_t^T) instead, usually several times
    more. gamma_t^2 = r_t tr(C_t) / (3 d_in tr(A_t C_t A_t^T)) equalizes the two, so that with B = 0 the first
    Adam steps on B move the output as much as with LoRA's A (the effective step size). ``coefficients[t]``
    (r_t x m) expresses task t's unit rows in the kept vectors (``orthogonal_task_rows(..., coefficients=...)``),
    ``projected``/``traces`` come from ``projected_covariances``."""
    gains = []
    for g, p, trace in zip(coefficients, projected, traces):
        r = g.shape[0]
        captured = float(torch.trace(g @ p @ g.T)) if r else 0.0
        gains.append(math.sqrt(r * trace / (3.0 * d_in * captured)) if r and captured > 0 else 1.0)
    return gains


def task_spectrum(weight: torch.Tensor, cov: torch.Tensor, spectrum: str = "weighted", keep: int | None = None,
                  decomposition: str | None = None) -> Spectrum:
    """Spectrum of K = W (C + delta I) (``weighted``) or of C alone (``covariance``, eigenvalues).

    ``decomposition`` (weighted only; see DECOMPOSITIONS) picks how K's spectrum is computed; the result is
    always returned in DECOMP_DTYPE. Left vectors ``u`` are returned by svd64/svd32 only (nothing downstream
    reads them)."""
    if spectrum not in SPECTRA:
        raise ValueError(f"thanora.spectrum must be one of {SPECTRA}, got {spectrum!r}")
    route = decomposition_route(decomposition)
    if spectrum == "covariance":
        cov = cov.to(DECOMP_DTYPE)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)
        sigma = evals[order].clamp_min(0.0)
        vh = evecs[:, order].T
        u = None
    else:
        dtype = torch.float64 if route.endswith("64") else torch.float32
        cov = cov.to(dtype)
        damped = cov + damping(cov) * torch.eye(cov.shape[0], dtype=dtype, device=cov.device)
        k = weight.to(dtype) @ damped
        if route.startswith("svd"):
            u, sigma, vh = torch.linalg.svd(k, full_matrices=False)
        else:
            sigma, vh = _gram_spectrum(k, keep)
            u = None
        sigma, vh = sigma.to(DECOMP_DTYPE), vh.to(DECOMP_DTYPE)
        u = None if u is None else u.to(DECOMP_DTYPE)
    if keep is not None:  # clones: slices would keep the full d x d factors alive until the blocks are built
        vh = vh[:keep].clone()
        u = None if u is None else u[:, :keep].clone()
    return Spectrum(sigma=sigma, vh=vh, u=u)


def _gram_spectrum(k: torch.Tensor, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (all min(m, n), decreasing) and the leading ``keep`` right singular vectors (rows) of
    the m x n matrix ``k`` from the eigendecomposition of its smaller Gram matrix, in k's dtype."""
    m, n = k.shape
    small = min(m, n)
    keep = small if keep is None else min(keep, small)
    if n <= m:   # K^T K = V S^2 V^T (n x n): the right vectors directly
        evals, evecs = torch.linalg.eigh(k.T @ k)
        sigma = evals.flip(0).clamp_min(0.0).sqrt()
        vh = evecs.flip(1)[:, :keep].T
    else:
        evals, evecs = torch.linalg.eigh(k @ k.T)   # K K^T = U S^2 U^T (m x m), then v_i = K^T u_i / sigma_i
        sigma = evals.flip(0).clamp_min(0.0).sqrt()
        vh = evecs.flip(1)[:, :keep].T @ k
        # renormalize rather than divide by sigma: identical in exact arithmetic, and safe for sigma_i ~ 0
        vh = vh / vh.norm(dim=1, keepdim=True).clamp_min(torch.finfo(k.dtype).tiny)
    # eigh's sign per vector is arbitrary and flips under rounding-level changes of the statistic (1 vs 2 ranks
    # sum it in another order): fix it by a fixed pseudo-random direction, so HASI stays world-size invariant
    probe = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(vh.device, vh.dtype)
    sign = torch.where(vh @ probe < 0, -1.0, 1.0).to(vh.dtype)
    return sigma, vh * sign[:, None]


def normalized_spectral_entropy(sigma: torch.Tensor) -> float:
    """H = -sum p_i log p_i / log n with p = sigma / sum(sigma); in [0, 1]; 0 for an all-zero spectrum."""
    sigma = sigma.to(DECOMP_DTYPE).clamp_min(0.0)
    n = sigma.numel()
    total = sigma.sum()
    if n < 2 or total <= 0:
        return 0.0
    p = sigma / total
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    return float(-plogp.sum() / math.log(n))


def allocation_shares(entropy: torch.Tensor, module_types: Sequence[str], method: str, tau: float) -> torch.Tensor:
    """Shares pi[l, t] (rows sum to 1) from entropies H[l, t] of L layers and T tasks.

    scaled_softmax: softmax_t((H - mean_t H) / (tau * s_m)), s_m = RMS deviation pooled over layers of the same
    module type m (so one tau suits q_proj and down_proj alike); softmax: softmax_t(H / tau);
    proportional: H / sum_t H; uniform: 1/T. A larger tau always moves the shares towards uniform.
    """
    if method not in ALLOCATIONS:
        raise ValueError(f"thanora.allocation must be one of {ALLOCATIONS}, got {method!r}")
    h = entropy.to(DECOMP_DTYPE)
    _, n_tasks = h.shape
    uniform = torch.full_like(h, 1.0 / n_tasks)
    if method == "uniform":
        return uniform
    if method == "softmax":
        return torch.softmax(h / tau, dim=1)
    if method == "proportional":
        total = h.sum(dim=1, keepdim=True)
        return torch.where(total > 0, h / total.clamp_min(1e-300), uniform)
    dev = h - h.mean(dim=1, keepdim=True)
    shares = uniform.clone()
    for m in sorted(set(module_types)):
        rows = torch.tensor([i for i, t in enumerate(module_types) if t == m])
        s_m = float(dev[rows].pow(2).mean().sqrt())
        if s_m > 0:
            shares[rows] = torch.softmax(dev[rows] / (tau * s_m), dim=1)
    return shares


def largest_remainder_ranks(shares: torch.Tensor, total: int, min_rank: int) -> list[int]:
    """Integer ranks summing to ``total``: min_rank each, the rest split by ``shares`` with floors first, then
    one more to the largest remainders (ties to the lower task index)."""
    n_tasks = shares.numel()
    spare = total - n_tasks * min_rank
    if spare < 0:
        raise ValueError(f"cannot give {n_tasks} tasks min_rank={min_rank} each from {total} task ranks")
    exact = [float(s) * spare for s in shares]
    ranks = [min_rank + math.floor(x) for x in exact]
    left = total - sum(ranks)
    order = sorted(range(n_tasks), key=lambda t: (-(exact[t] - math.floor(exact[t])), t))
    for t in order[:left]:
        ranks[t] += 1
    return ranks


def allocate_ranks(
    entropy: torch.Tensor,
    module_types: Sequence[str],
    task_rank_total: int,
    method: str = "scaled_softmax",
    tau: float = 3.0,
    min_rank: int = 1,
) -> list[list[int]]:
    """r_t^l for every layer l (rows) and task t, each row summing to ``task_rank_total`` = r - r_c."""
    shares = allocation_shares(entropy, module_types, method, tau)
    return [largest_remainder_ranks(shares[l], task_rank_total, min_rank) for l in range(shares.shape[0])]


def orthogonal_task_rows(spectra: Sequence[Spectrum], ranks: Sequence[int], gamma: float = 1.0, tol: float = 1e-6,
                         coefficients: list | None = None) -> torch.Tensor:
    """Stacked A rows [A_1; ...; A_T] with A_i A_j^T = 0 for i != j, each task from its own top vectors.

    Candidates (task t, index i < r_t) are visited in decreasing sigma_i / sigma_1 of their own task (ties:
    lower task, then lower i) and Gram-Schmidt'ed against the rows already accepted; a candidate whose residual
    norm falls under ``tol`` is replaced by its task's next unused singular vector. Rows are unit norm, then
    scaled by gamma; the result keeps each task's rows in task order. A list passed as ``coefficients`` receives, per task, the
    unit rows' coefficients in the stacked kept vectors [vh_1; ...; vh_T] (what ``lora_matched_gains`` needs).
    """
    offsets = [0]
    for spec in spectra:
        offsets.append(offsets[-1] + spec.vh.shape[0])
    order = []
    for t, (spec, r_t) in enumerate(zip(spectra, ranks)):
        lead = float(spec.sigma[0]) if spec.sigma.numel() and float(spec.sigma[0]) > 0 else 1.0
        order += [(-float(spec.sigma[i]) / lead if i < spec.sigma.numel() else 0.0, t, i) for i in range(r_t)]
    order.sort()
    next_unused = list(ranks)
    accepted: list[tuple[torch.Tensor, torch.Tensor]] = []     # (unit row, its coefficients)
    rows_of_task: list[list[torch.Tensor]] = [[] for _ in spectra]
    coefs_of_task: list[list[torch.Tensor]] = [[] for _ in spectra]
    for _, t, i in order:
        candidate_index = i
        while True:
            vh = spectra[t].vh
            if candidate_index >= vh.shape[0]:
                raise ValueError(f"task {t} ran out of singular vectors while orthogonalizing its block")
            v = vh[candidate_index].to(DECOMP_DTYPE)
            coef = torch.zeros(offsets[-1], dtype=DECOMP_DTYPE)
            coef[offsets[t] + candidate_index] = 1.0
            for _ in range(2):  # modified Gram-Schmidt, twice for stability
                for q, q_coef in accepted:
                    c = q @ v
                    v = v - c * q
                    coef = coef - c.to(coef.device) * q_coef
            norm = float(v.norm())
            if norm >= tol:
                break
            candidate_index = next_unused[t]
            next_unused[t] += 1
        q = v / norm
        accepted.append((q, coef / norm))
        rows_of_task[t].append(q)
        coefs_of_task[t].append(coef / norm)
    if coefficients is not None:
        coefficients[:] = [torch.stack(c) if c else torch.zeros(0, offsets[-1], dtype=DECOMP_DTYPE)
                           for c in coefs_of_task]
    rows = [torch.stack(r) for r in rows_of_task if r]
    return gamma * torch.cat(rows) if rows else torch.zeros(0, spectra[0].vh.shape[1], dtype=DECOMP_DTYPE)


def corda_blocks(weight: torch.Tensor, cov: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA-style (B_t, A_t) of one task: with C' = C + delta I and W C' = U S V^T,
    B_t = U_r sqrt(S_r / s), A_t = sqrt(S_r / s) V_r^T pinv(C'), so s B_t A_t = U_r S_r V_r^T pinv(C')."""
    cov = cov.to(DECOMP_DTYPE)
    damped = cov + damping(cov) * torch.eye(cov.shape[0], dtype=cov.dtype)
    u, sigma, vh = torch.linalg.svd(weight.to(DECOMP_DTYPE) @ damped, full_matrices=False)
    root = (sigma[:rank] / scale).sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * (vh[:rank] @ torch.linalg.pinv(damped))
    return b, a


def warn_thin_tasks(token_counts: Sequence[int], tasks: Sequence[str], needed: int) -> None:
    """A task with fewer preview tokens than ranks to fill still gets min_rank; say so."""
    for name, n in zip(tasks, token_counts):
        if n < needed:
            warnings.warn(
                f"HASI: task {name!r} has only {n} preview content tokens (< {needed}); its statistics are "
                "rank-deficient and it keeps at least min_rank", stacklevel=2)
