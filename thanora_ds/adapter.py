"""The ThanoRA adapter layer: one LoRA of rank r whose rank indices are partitioned into task slices.

    A = [A_1; ...; A_T; A_c]        A_t: r_t x d_in   (rows)
    B = [B_1, ..., B_T, B_c]        B_t: d_out x r_t  (columns)
    y = W x + s * B A dropout(x),   s = alpha / r  (rsLoRA: alpha / sqrt(r))

Every sample flows through every block; the task split only matters to the initializer and to SPR. The option
``thanora.task_routing`` (an ablation beyond METHOD.md) masks the rank activations during training so that each
sample reaches only its own task's block and the shared block; evaluation and the merged model use every block. In mode
``corda`` the frozen W is the residual W_res = W - s B_0 A_0 with (B_0, A_0) the initial blocks, kept here as
buffers so that merge, export and resume can rebuild or undo it.

SPR (``thanora_ds.spr``) is computed inside ``forward`` because that is where ZeRO-3 has gathered A and B:
a loss term built there gets correct gradients on sharded parameters. Under activation checkpointing the
forward runs again during backward; the penalty is computed in the first forward only (its few small saved
tensors are kept outside the checkpoint's hooks, so the re-forward can skip it), once per layer and step, and
it enters the loss exactly once.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spr import spr_layer_penalty


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def _recomputing() -> bool:
    """Inside a backward pass: a forward running now is activation checkpointing's re-forward."""
    return torch._C._current_graph_task_id() != -1


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class ThanoraLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` (kept as ``base`` so module paths stay ``<name>.base.weight``)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0,
                 block_sizes: Sequence[int] | None = None, in_features: int | None = None,
                 out_features: int | None = None):
        super().__init__()
        self.base = base
        # Under ZeRO-3 base.weight is a partitioned placeholder: callers pass the real shape (ds_shape).
        self.in_features = in_features or base.in_features
        self.out_features = out_features or base.out_features
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.scale = lora_scale(alpha, rank, rslora)
        dtype = base.weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.block_sizes = list(block_sizes) if block_sizes is not None else [rank]  # [r_1..r_T, r_c]
        # Set only in mode corda; None buffers stay out of the state dict.
        self.register_buffer("corda_A0", None)
        self.register_buffer("corda_B0", None)
        self.spr_options: dict | None = None  # set by enable_spr(); None = no penalty
        self.spr_value: torch.Tensor | None = None
        # thanora.task_routing (training only): the task id of each sample of the current batch, [B]; None = every
        # sample flows through every block (METHOD.md's forward, and always at evaluation and after merging)
        self.route: torch.Tensor | None = None

    @property
    def task_sizes(self) -> list[int]:
        return self.block_sizes[:-1]

    @property
    def shared_rank(self) -> int:
        return self.block_sizes[-1]

    def set_block_sizes(self, task_sizes: Sequence[int], shared_rank: int) -> None:
        sizes = [int(s) for s in task_sizes] + [int(shared_rank)]
        if sum(sizes) != self.rank:
            raise ValueError(f"block sizes {sizes} do not sum to the adapter rank {self.rank}")
        self.block_sizes = sizes

    def set_corda_residual(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Record the initial blocks whose product was subtracted from the base weight."""
        self.corda_A0 = a0.detach().clone()
        self.corda_B0 = b0.detach().clone()

    def enable_spr(self, normalize: bool = True, terms: str = "both") -> None:
        self.spr_options = {"normalize": normalize, "terms": terms}

    def delta_weight(self) -> torch.Tensor:
        """s B A (d_out x d_in), the update that merging adds to the (residual) base weight."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.spr_options is not None and torch.is_grad_enabled() and len(self.task_sizes) > 1
                and not _recomputing()):
            # its saved tensors bypass activation checkpointing's hooks: the penalty's backward needs no re-forward,
            # and the re-forward (which runs inside backward) can skip it without shifting the checkpoint's
            # saved-tensor order
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                self.spr_value = spr_layer_penalty(self.lora_A, self.lora_B, self.task_sizes, **self.spr_options)
        hidden = F.linear(self.dropout(x), self.lora_A)                      # [..., r]: the rank-space activations
        if self.route is not None:
            mask = self.route_mask(hidden)
            hidden = hidden * (mask[:, None, :] if hidden.dim() == 3 else mask)
        return self.base(x) + self.scale * F.linear(hidden, self.lora_B)

    def route_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, r] 0/1: sample b keeps the rank indices of its own task's block and of the shared block."""
        sizes = self.block_sizes
        block_of_index = torch.repeat_interleave(torch.arange(len(sizes), device=hidden.device),
                                                 torch.tensor(sizes, device=hidden.device))
        route = self.route.to(hidden.device)
        own = block_of_index.unsqueeze(0) == route.unsqueeze(1)
        shared = (block_of_index == len(sizes) - 1).unsqueeze(0)
        return (own | shared).to(hidden.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.rank}, blocks={self.block_sizes}, "
                f"scale={self.scale:.4g}")
