"""Every torch.distributed / DeepSpeed-specific operation of thanora_ds lives here.

The method's code (hasi, spr, adapter, initializer, merge) calls these helpers and never touches ZeRO-3
internals itself, so the same code runs in one plain process and on partitioned parameters:

* ``gathered(params, modifier_rank)``: full values of ZeRO-3 partitioned params inside the block (collective);
* ``write_param(param, value, src)``: the ZeRO-safe write of an engine-managed param (the gathered copy AND
  the optimizer's fp32 partition; either alone is lost or unseen, see notes/deepspeed-on-cpu.md);
* rank ownership (``owner_of``), reductions and broadcasts used by the distributed initializer.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def owner_of(index: int) -> int:
    """The rank that does the work for item ``index`` (round robin, so work spreads evenly)."""
    return index % world_size()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    if is_initialized() and world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None):
    """Context in which ZeRO-3 partitioned ``params`` hold their full values (a no-op for plain params).
    With ``modifier_rank``, what that rank writes into them is partitioned back on exit."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def write_param(param: torch.nn.Parameter, value: torch.Tensor | None, src: int = 0) -> None:
    """Set ``param`` to ``value`` (full shape). Collective under ZeRO-3: every rank calls it; only rank
    ``src`` needs to hold ``value`` (others may pass None), it is broadcast from there."""
    if not is_partitioned(param):
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        return
    from deepspeed.utils import safe_set_full_fp32_param

    shape = tuple(param.ds_shape)
    full = value.to(torch.float32).contiguous() if rank() == src else torch.empty(shape, dtype=torch.float32)
    broadcast_(full, src)
    with gathered([param], modifier_rank=src), torch.no_grad():
        if rank() == src:
            param.copy_(full.to(param.dtype))
    if hasattr(param, "_z3_optimizer"):
        safe_set_full_fp32_param(param, full)


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """A detached full copy of ``param`` on CPU (gathers a ZeRO-3 partition; collective in that case)."""
    with gathered([param]):
        return param.detach().to("cpu", copy=True)


def env_rank_variables() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK from the launcher's environment (torchrun, deepspeed, MPI, SLURM)."""
    found = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
             if k in os.environ}
    return found
