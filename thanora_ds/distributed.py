"""Every torch.distributed / DeepSpeed-specific operation of thanora_ds lives here (the DeepSpeed JSON in ds_config.py).

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


def shutdown() -> None:
    """Destroy the process group, if any: a process that exits with a live gloo/NCCL group can abort in the
    group's destructor ("terminate called without an active exception") after all its work is done."""
    if is_initialized():
        dist.destroy_process_group()


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


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective_(tensor: torch.Tensor, op) -> torch.Tensor:
    if not (is_initialized() and world_size() > 1):
        return tensor
    device = _comm_device()
    if tensor.device == device:
        op(tensor)
    else:
        moved = tensor.to(device)
        op(moved)
        tensor.copy_(moved)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    return _collective_(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    return _collective_(tensor, lambda t: dist.broadcast(t, src=src))


def all_gather_objects(obj: Any) -> list[Any]:
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def partition_sizes(params: Iterable[torch.nn.Parameter]) -> tuple[int, int]:
    """(full number of elements, elements this rank holds): under ZeRO-3 the second is ~ 1/world of the first."""
    total = local = 0
    for p in params:
        if is_partitioned(p):
            total += p.ds_numel
            local += p.ds_tensor.numel()
        else:
            total += p.numel()
            local += p.numel()
    return total, local


def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None):
    """Context in which ZeRO-3 partitioned ``params`` hold their full values (a no-op for plain params).
    With ``modifier_rank``, what that rank writes into them is partitioned back on exit."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def write_param(param: torch.nn.Parameter, value: torch.Tensor | None, src: int = 0) -> None:
    """Set ``param`` to ``value`` (full shape) everywhere it lives: the module's copy and, when DeepSpeed's
    optimizer keeps its own fp32 master copy (ZeRO-1/2/3), that too. Collective in a multi-rank run: every
    rank calls it; only rank ``src`` needs ``value`` (others may pass None), it is broadcast from there."""
    from deepspeed.utils import safe_set_full_fp32_param

    shape = tuple(getattr(param, "ds_shape", param.shape))
    full = value.to(torch.float32).contiguous() if rank() == src else torch.empty(shape, dtype=torch.float32)
    broadcast_(full, src)
    with gathered([param], modifier_rank=src), torch.no_grad():
        if rank() == src or not is_partitioned(param):
            param.copy_(full.to(param.device, param.dtype))
    if hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, full.to(param.device))


def local_values(param: torch.Tensor) -> torch.Tensor:
    """The values of ``param`` this rank holds (its ZeRO-3 partition, or the whole tensor); no communication."""
    return param.ds_tensor if is_partitioned(param) else param.data


def non_finite_params(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the parameters with a NaN or inf anywhere, on any rank (collective: every rank gets the list)."""
    local = [name for name, p in named if not bool(torch.isfinite(local_values(p)).all())]
    if not any_rank(bool(local)):
        return []
    return sorted({n for names in all_gather_objects(local) for n in names})


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """A detached full copy of ``param`` on CPU (gathers a ZeRO-3 partition; collective in that case)."""
    with gathered([param]):
        return param.detach().to("cpu", copy=True)


# ----------------------------------------------------------------------------------------------------------
# Process group and DeepSpeed engine.

MPI_RANK_VARIABLES = (  # (rank, world size, local rank) as set by Open MPI, MPICH/PMI and SLURM's srun
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a batch script's own shell has SLURM_PROCID=0 and
    # SLURM_NTASKS=<allocation> (measured, SLURM 22.05), so a plain `python train.py` there would wait for
    # ranks that never come; only an srun step sets SLURM_STEP_NUM_TASKS.
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
)
MPI_LOCAL_SIZE_VARIABLES = {"ompi": "OMPI_COMM_WORLD_LOCAL_SIZE", "pmi": "MPI_LOCALNRANKS",
                            "slurm": "SLURM_STEP_TASKS_PER_NODE"}
DEFAULT_MASTER_PORT = 29500


def _host_address() -> str:
    """This host's address as its peers reach it: the address of GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
    when one names a single interface, else the first of `hostname -I` (as DeepSpeed's MPI discovery does;
    the hostname itself often resolves to 127.0.1.1 on Debian-like systems), else the hostname."""
    import socket
    import subprocess

    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        name = os.environ.get(var, "")
        if name and not name.startswith(("^", "=")) and "," not in name:
            if name == "lo":
                return "127.0.0.1"
            try:
                import fcntl
                import struct

                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
                return socket.inet_ntoa(packed[20:24])
            except OSError:
                pass
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostname()


def _slurm_first_node() -> str | None:
    """The address of the first node of the SLURM allocation (its NodeAddr, else its name)."""
    import subprocess

    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30, check=True).stdout.split()
        first = hosts[0]
        node = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True, text=True,
                              timeout=30).stdout
        for token in node.split():
            if token.startswith("NodeAddr="):
                return token.split("=", 1)[1] or first
        return first
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0] if "[" not in nodelist else None


def free_port() -> int:
    """A TCP port free right now (for rendezvous addresses chosen by us, not by a launcher)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi4py_comm():
    """COMM_WORLD of mpi4py, or None when mpi4py is not installed (the `mpi` extra)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def adopt_launcher_environment() -> str:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from whichever launcher started us and
    return its name: "torch" (torchrun, the deepspeed launcher: they set all five), "ompi" / "pmi" (mpirun,
    mpiexec), "slurm" (srun tasks), "pmix" (srun --mpi=pmix with mpi4py), or "single".

    When MASTER_ADDR / MASTER_PORT are not set by the user or the launcher:
    * under MPI (mpirun, or srun --mpi=pmix) with mpi4py installed, rank 0 picks its address (127.0.0.1 when
      every rank is on one host) and a free port, and broadcasts both over MPI;
    * under srun without mpi4py, the address is the first node of the allocation (scontrol show hostnames)
      and the port 20000 + job id % 20000, the same on every task;
    * one process without a launcher: 127.0.0.1 and a free port;
    * otherwise 127.0.0.1:29500 (one host only)."""
    launcher = "single"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        launcher = "torch"
    else:
        for rank_var, size_var, local_var in MPI_RANK_VARIABLES:
            if rank_var in os.environ and size_var in os.environ:
                os.environ["RANK"], os.environ["WORLD_SIZE"] = os.environ[rank_var], os.environ[size_var]
                os.environ["LOCAL_RANK"] = os.environ.get(local_var, "0")
                launcher = rank_var.split("_")[0].lower()
                break
        else:
            if "PMIX_RANK" in os.environ and _mpi4py_comm() is not None:   # srun --mpi=pmix, Open MPI >= 4
                comm = _mpi4py_comm()
                local = comm.Split_type(_mpi_shared_type(), key=comm.Get_rank())
                os.environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()),
                                  LOCAL_RANK=str(local.Get_rank()))
                launcher = "pmix"
            else:
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if launcher not in ("torch", "single") and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        _derive_master(launcher)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # one process, no launcher: any free port, so that several single-process runs can share a machine
    os.environ.setdefault("MASTER_PORT", str(free_port() if launcher == "single" else DEFAULT_MASTER_PORT))
    return launcher


def _mpi_shared_type():
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED


def _one_host(launcher: str) -> bool:
    size = int(os.environ["WORLD_SIZE"])
    if launcher == "slurm" and "SLURM_STEP_NUM_NODES" in os.environ:
        return os.environ["SLURM_STEP_NUM_NODES"] == "1"
    local = os.environ.get(MPI_LOCAL_SIZE_VARIABLES.get(launcher, ""), "")
    return local.isdigit() and int(local) == size


def _derive_master(launcher: str) -> None:
    """MASTER_ADDR / MASTER_PORT for an MPI or srun launch (see adopt_launcher_environment)."""
    comm = _mpi4py_comm() if launcher in ("ompi", "pmi", "pmix") else None
    if comm is not None and comm.Get_size() == int(os.environ["WORLD_SIZE"]):
        one_host = comm.Split_type(_mpi_shared_type()).Get_size() == comm.Get_size()   # collective: all ranks
        if comm.Get_rank() == 0:
            addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if one_host else _host_address())
            port = os.environ.get("MASTER_PORT") or str(free_port())
            choice = (addr, port)
        else:
            choice = None
        addr, port = comm.bcast(choice, root=0)
    elif launcher == "slurm":
        addr = "127.0.0.1" if _one_host(launcher) else _slurm_first_node()
        job = os.environ.get("SLURM_JOB_ID", "")
        port = str(20000 + int(job) % 20000) if job.isdigit() else None
        if addr is None:
            raise RuntimeError("cannot tell the master address of this multi-node srun launch: set MASTER_ADDR "
                               "(launchers/slurm/train.sbatch does) or install mpi4py")
    else:
        if not _one_host(launcher):
            raise RuntimeError(f"multi-node {launcher} launch without MASTER_ADDR/MASTER_PORT: export them "
                               "(mpirun -x MASTER_ADDR=<rank 0 host> -x MASTER_PORT=<port>) or install mpi4py "
                               "(pip install -e .[mpi]) so that rank 0 broadcasts its address")
        addr, port = "127.0.0.1", None
    os.environ.setdefault("MASTER_ADDR", addr)
    if port:
        os.environ.setdefault("MASTER_PORT", port)


LAUNCHER_VARIABLES = ("LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_STEP_ID")


def watch_launcher(on_lost, interval_s: float = 2.0) -> bool:
    """Under a launcher (torchrun, deepspeed, mpirun, srun), call ``on_lost(reason)`` once, from a daemon thread,
    when this rank's parent process is gone (the launcher was killed: its ranks would otherwise train on,
    orphaned, into an output directory a rerun may be using). Returns whether a watch was started; a plain
    ``python launchers/train.py`` is not watched (its parent is a shell that may legitimately go away)."""
    import threading
    import time

    if not any(v in os.environ for v in LAUNCHER_VARIABLES):
        return False
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_s)
        on_lost(f"the launcher process (pid {parent}) is gone")

    threading.Thread(target=watch, name="thanora-launcher-watch", daemon=True).start()
    return True


def apply_dist_settings(settings) -> dict[str, str]:
    """Export the NCCL / gloo / torch.distributed variables of a ``DistConfig`` (train_config.py) before the
    process group starts; returns what changed. Empty keys leave the environment as it is."""
    import logging

    changed = {}
    for key, value in settings.environment().items():
        if os.environ.get(key) != value:
            if key in os.environ:
                logging.getLogger(__name__).info("dist: %s=%s (was %s in the environment)", key, value, os.environ[key])
            os.environ[key] = value
            changed[key] = value
    return changed


def init_distributed(settings) -> None:
    """Start the process group the way DeepSpeed expects, on GPUs (nccl) or CPUs (gloo), from a ``DistConfig``
    (train_config.py): its backend, timeout and NCCL/gloo variables."""
    import datetime

    import deepspeed
    import deepspeed.ops

    apply_dist_settings(settings)
    backend, timeout_minutes = settings.backend, settings.timeout_minutes
    adopt_launcher_environment()
    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        # DeepSpeed's CPU accelerator would JIT-compile a shared-memory all-reduce with g++ (minutes, and
        # it fails without a compiler); gloo does the job. Not used at all on CUDA.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if backend == "auto":
        backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=timeout_minutes))


def reset_zero3_trace(engine) -> bool:
    """Forget the parameter-fetch trace ZeRO-3 recorded during forwards that are not training steps (HASI's
    previews, an evaluation), and the release decisions derived from it.

    The coordinator records the module order of the first forward(+backward) after each reset and then
    prefetches by it. HASI's no-grad, eval-mode previews (outside the engine) leave a COMPLETE trace of a
    forward-only pass; the first training step invalidates it half-way, the second re-records, and only the third
    runs with a training trace, so the slow first prefetching step (seconds on CPU, measured in
    docs/performance.md) falls one step later than in a plain LoRA run. Invalidated here, the first training step
    records, exactly as without HASI.

    Invalidating is not enough: the coordinator memoizes which parameters a module may release at a trace step
    (``__params_to_release``, an unbounded ``functools.lru_cache`` keyed by coordinator, module and step) and
    DeepSpeed (0.19.8) never clears it when the trace changes. Under a forward-only trace a layer's weights are
    released after its forward; a training trace keeps them for activation checkpointing's re-forward. With the
    stale answers every training step after HASI released and re-gathered every weight once more (2 ranks,
    tiny LLaMA: 114 instead of 65 parameters all-gathered per step, steps 1.2-1.5x slower; docs/performance.md
    section 3). Returns whether a trace was reset. Collective-free, same on every rank."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = offload.get_param_coordinator() if offload is not None else None
    if coordinator is None or not hasattr(coordinator, "_invalidate_trace"):
        return False
    cache = zero3_release_cache(type(coordinator))
    if cache is not None:
        cache.cache_clear()
    if coordinator.is_invalid_trace():
        return False
    coordinator._invalidate_trace()
    return True


def zero3_release_cache(coordinator_class):
    """The ``functools.lru_cache`` behind ``PartitionedParameterCoordinator.__params_to_release`` (wrapped by
    DeepSpeed's ``instrument_w_nvtx``, which keeps it in its closure), or None where this DeepSpeed has none."""
    fn = getattr(coordinator_class, f"_{coordinator_class.__name__}__params_to_release", None)
    for _ in range(4):   # a few wrapper layers at most
        if fn is None or hasattr(fn, "cache_clear"):
            return fn
        inner = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents)]
        fn = getattr(fn, "__wrapped__", None) or (inner[0] if len(inner) == 1 else None)
    return None


def global_grad_norm(params: Iterable[torch.nn.Parameter], stage: int) -> float:
    """L2 norm of the averaged gradient at the accumulation boundary, BEFORE the optimizer step (so a
    non-finite gradient can stop the run first). ZeRO-3: each rank's disjoint fp32 grad partition, squared
    and summed across ranks; ZeRO-1/2: DeepSpeed's full gradient (collective); no ZeRO: ``p.grad``."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if stage == 3:
            grad = safe_get_local_grad(p)
        elif stage in (1, 2):
            grad = safe_get_full_grad(p)
        else:
            grad = p.grad
        if grad is not None:
            total += grad.detach().double().pow(2).sum().cpu()
    if stage == 3:
        all_reduce_sum_(total)
    return float(total.sqrt())


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (for stop requests and non-finite values)."""
    t = torch.tensor([1.0 if flag else 0.0])
    all_reduce_sum_(t)
    return bool(t.item() > 0)


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# Reading a ZeRO checkpoint offline (one process, no process group, any world size it was written with).

def read_zero_trainable(tag_dir) -> dict[str, torch.Tensor]:
    """The trainable parameters (adapters, a trained projector) of a DeepSpeed ZeRO-1/2/3 checkpoint folder, by
    full parameter name, as fp32 CPU tensors reassembled from the optimizer's fp32 partitions of every rank.

    Uses DeepSpeed's own ``zero_to_fp32`` reassembly with frozen parameters excluded; the per-rank files are
    memory-mapped, so the frozen base-model fragments a checkpoint may also hold are never read into RAM."""
    from deepspeed.checkpoint.constants import BUFFER_NAMES, PARAM_SHAPES
    from deepspeed.utils import zero_to_fp32 as z

    tag_dir = str(tag_dir)
    states = []
    for file in z.get_model_state_files(tag_dir):
        sd = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        if BUFFER_NAMES not in sd or PARAM_SHAPES not in sd:
            raise ValueError(f"{file} is not a DeepSpeed ZeRO model state file")
        states.append(z.zero_model_state(buffers={}, param_shapes=sd[PARAM_SHAPES],
                                         shared_params=list(sd.get("shared_params", {}).items()),
                                         ds_version=sd.get("ds_version"), frozen_param_shapes=None,
                                         frozen_param_fragments=None))
        del sd
    stage, world, flat_groups, paddings = z.parse_optim_states(z.get_optim_files(tag_dir), tag_dir)
    if stage <= 2:
        lazy = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, states, True, paddings)
    else:
        lazy = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, states, True)
    return {name: t.contiguous().float().clone() for name, t in lazy.items()}
