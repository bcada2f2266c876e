"""Mechanism metrics: does SPR keep the task subspaces apart, and how does each task use its block?

Pure functions on one layer's factors (A: r x d_in rows, B: d_out x r columns, block sizes [r_1..r_T, r_c]),
so that "SPR preserves the subspaces" can be checked directly rather than only through end scores:

    effective_rank(s B A)   exp(entropy of the normalized singular values) (Roy & Vetterli 2007): how many
                            directions the update really uses, in [1, r] (0 for a zero update)
    update_overlap          mean over task pairs i < j of |<dW_i, dW_j>_F| / (||dW_i|| ||dW_j||), the cosine
                            of the two tasks' updates dW_t = s B_t A_t; 0 = orthogonal updates
    row_overlap             mean over pairs of ||Q_i Q_j^T||_F^2 / min(r_i, r_j), Q_t an orthonormal basis of
                            A_t's row space: the mean squared cosine of the principal angles between the tasks'
                            input subspaces (0 = orthogonal, 1 = one inside the other); HASI starts it at 0
    col_overlap             the same for B_t's column spaces (output subspaces)
    task_share              each task's share of sum_t ||dW_t x||^2: with ``cov`` = E[x x^T] of the layer's
                            inputs, E||dW_t x||^2 = tr(dW_t C dW_t^T); without it, ||dW_t||_F^2 (isotropic x)

Everything is computed from r x r products, never a d_out x d_in matrix.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import torch


def _blocks(a: torch.Tensor, b: torch.Tensor, sizes: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, start = [], 0
    for size in sizes:
        out.append((a[start:start + size], b[:, start:start + size]))
        start += size
    return out


def singular_values_of_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of B A (d_out x r times r x d_in) from the r x r core of two thin QRs."""
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    _, r_b = torch.linalg.qr(b.to(torch.float64))
    _, r_a = torch.linalg.qr(a.to(torch.float64).T)
    return torch.linalg.svdvals(r_b @ r_a.T)


def effective_rank(sigma: torch.Tensor) -> float:
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def _basis(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the rows of m (numerically zero directions dropped)."""
    if m.shape[0] == 0:
        return m
    u, s, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
    keep = s > s.max() * 1e-6 if s.numel() and float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
    return vh[keep]


def subspace_overlap(m_i: torch.Tensor, m_j: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of m_i and m_j (0 if either is 0)."""
    q_i, q_j = _basis(m_i), _basis(m_j)
    k = min(q_i.shape[0], q_j.shape[0])
    if k == 0:
        return 0.0
    return float((q_i @ q_j.T).pow(2).sum()) / k


def layer_metrics(a: torch.Tensor, b: torch.Tensor, sizes: Sequence[int], scale: float,
                  cov: torch.Tensor | None = None) -> dict:
    """The metrics above for one layer; ``sizes`` = [r_1, ..., r_T, r_c] (the last block is the shared one)."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    tasks = _blocks(a, b, sizes)[:-1]
    sigma = scale * singular_values_of_product(b, a)
    pairs = list(combinations(range(len(tasks)), 2))
    update, rows, cols = [], [], []
    for i, j in pairs:
        (a_i, b_i), (a_j, b_j) = tasks[i], tasks[j]
        if a_i.shape[0] == 0 or a_j.shape[0] == 0:
            continue
        inner = torch.trace((b_i.T @ b_j) @ (a_j @ a_i.T))      # <B_i A_i, B_j A_j>_F
        norm_i = torch.trace((b_i.T @ b_i) @ (a_i @ a_i.T)).clamp_min(0).sqrt()
        norm_j = torch.trace((b_j.T @ b_j) @ (a_j @ a_j.T)).clamp_min(0).sqrt()
        denominator = float(norm_i * norm_j)
        update.append(abs(float(inner)) / denominator if denominator > 0 else 0.0)
        rows.append(subspace_overlap(a_i, a_j))
        cols.append(subspace_overlap(b_i.T, b_j.T))
    energy = []
    for a_t, b_t in tasks:
        if cov is None:
            energy.append(float(torch.trace((b_t.T @ b_t) @ (a_t @ a_t.T))))
        else:   # tr(B A C A^T B^T) = tr((B^T B)(A C A^T))
            energy.append(float(torch.trace((b_t.T @ b_t) @ (a_t @ cov.to(torch.float64) @ a_t.T))))
    total = sum(energy)
    mean = (lambda xs: sum(xs) / len(xs) if xs else 0.0)
    return {
        "effective_rank": effective_rank(sigma),
        "update_overlap": mean(update),
        "row_overlap": mean(rows),
        "col_overlap": mean(cols),
        "task_share": [e / total if total > 0 else 0.0 for e in energy],
    }


def summarize(per_layer: dict[str, dict], tasks: Sequence[str]) -> dict:
    """Means over layers (the task shares per task), for a metrics line."""
    if not per_layer:
        return {}
    layers = list(per_layer.values())
    out = {f"mech/{key}": sum(m[key] for m in layers) / len(layers)
           for key in ("effective_rank", "update_overlap", "row_overlap", "col_overlap")}
    for t, task in enumerate(tasks):
        out[f"mech/task_share/{task}"] = sum(m["task_share"][t] for m in layers) / len(layers)
    return out
