"""Subspace-preserving regularization (METHOD.md section 3), as a pure function of one layer's blocks.

For one adapted layer with task blocks A_1..A_T (rows of A) and B_1..B_T (columns of B):

    L_SPR^l = sum_{i<j} ( ||A_i A_j^T||_F^2 + ||B_i^T B_j||_F^2 )

With ``normalize=True`` each row of A_i and each column of B_i is divided by max(norm, eps) first, so the
terms are squared cosines and do not depend on the adapter's scale; all-zero columns (B at step 0)
contribute zero. The shared block (the last ``len(A) - sum(task_sizes)`` rows) is never penalized.

Why cross-Grams: <B_i A_i, B_j A_j>_F = tr((B_i^T B_j)(A_j A_i^T)), so task updates are orthogonal as soon
as either cross-Gram vanishes, and only r_i x r_j matrices are ever formed.
"""
from __future__ import annotations

from typing import Sequence

import torch

SPR_TERMS = ("both", "A", "B")


def _pairwise_cross_gram_sq(rows: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """sum_{i<j} ||R_i R_j^T||_F^2 for the row blocks R_t of ``rows`` (sizes[t] rows each).

    One Gram matrix of the task rows with its diagonal blocks masked out, halved: the same number as the
    explicit double loop in one matmul. Masking (not subtracting the diagonal blocks) keeps orthogonal
    blocks at exactly zero in fp32.
    """
    n = int(sum(sizes))
    task_rows = rows[:n]
    block = torch.repeat_interleave(torch.arange(len(sizes), device=rows.device),
                                    torch.tensor(list(sizes), device=rows.device))
    cross = block[:, None] != block[None, :]
    return (task_rows @ task_rows.T).pow(2).masked_fill(~cross, 0).sum() / 2


def spr_layer_penalty(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    task_sizes: Sequence[int],
    normalize: bool = True,
    terms: str = "both",
    eps: float = 1e-8,
) -> torch.Tensor:
    """L_SPR of one layer. ``lora_A``: r x d_in, ``lora_B``: d_out x r, ``task_sizes``: r_1..r_T."""
    if terms not in SPR_TERMS:
        raise ValueError(f"spr_terms must be one of {SPR_TERMS}, got {terms!r}")
    # The penalty is computed in fp32 whatever the training dtype: squared cosines of bf16 rows are noisy.
    a = lora_A.float()
    b_rows = lora_B.float().T  # columns of B as rows
    if normalize:
        a = a / a.norm(dim=1, keepdim=True).clamp_min(eps)
        b_rows = b_rows / b_rows.norm(dim=1, keepdim=True).clamp_min(eps)
    total = torch.zeros((), dtype=torch.float32, device=lora_A.device)
    if terms in ("both", "A"):
        total = total + _pairwise_cross_gram_sq(a, task_sizes)
    if terms in ("both", "B"):
        total = total + _pairwise_cross_gram_sq(b_rows, task_sizes)
    return total
