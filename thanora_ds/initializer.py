"""HASI on a model: preview statistics, decompositions, allocation, and writing the blocks into the adapters.

Runs once before the first optimizer step, on the frozen model, in a separate no-grad eval pass (activation
checkpointing would otherwise run the statistics hooks twice). Distributed by construction:

* each rank previews its own disjoint share of every task's previews; statistics are summed across ranks;
* each target layer has one owner rank (round robin) that computes all of its tasks' decompositions, so
  each (task, layer) decomposition runs exactly once and the work spreads over ranks;
* memory is bounded by ``groups_per_pass``: statistics exist only for the input groups (q/k/v share one,
  gate/up one, o and down one each) of the current pass, T x d_in x d_in fp32 each, on the activations'
  device; the preview forward is repeated once per pass;
* the blocks are written with ``distributed.write_param`` (ZeRO-safe) from the owner rank.
With one process all of this degenerates to plain loops.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import distributed as D
from .distributed import reset_zero3_trace
from .host_memory import hasi_heap_scope, in_own_arena, trim_host_memory
from .adapter import ThanoraLinear
from .config import ThanoraConfig
from .models import family_of
from .statistics_cache import StatisticsCache
from .hasi import (
    allocate_ranks,
    corda_blocks,
    lora_matched_gains,
    normalized_spectral_entropy,
    orthogonal_task_rows,
    projected_covariances,
    task_spectrum,
    warn_thin_tasks,
)

log = logging.getLogger(__name__)

# batches of one task: dicts with input_ids, attention_mask (and pixel_values for LLaVA)
PreviewFn = Callable[[int], Iterable[dict]]


@dataclass
class Allocation:
    """What HASI decided, saved as JSON next to checkpoints (and reloaded on resume instead of re-running)."""

    tasks: list[str]
    mode: str
    allocation: str
    spectrum: str
    tau: float
    rank: int
    shared_rank: int
    prefix_length: int
    layers: list[str]
    module_types: list[str]
    ranks: list[list[int]]                     # [layer][task]
    entropy: list[list[float]]                 # [layer][task]
    token_counts: list[int] = field(default_factory=list)   # content tokens per task (first input group)
    sample_counts: list[int] = field(default_factory=list)  # preview samples per task

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        return cls(**json.loads(Path(path).read_text()))

    def apply(self, adapters: dict[str, ThanoraLinear]) -> None:
        """Set every adapter's block split (used on resume and after HASI)."""
        if list(adapters) != self.layers:
            raise ValueError("the allocation's layers do not match the model's adapters "
                             f"({len(self.layers)} vs {len(adapters)}): was it made for another model or targets?")
        for (name, adapter), ranks in zip(adapters.items(), self.ranks):
            adapter.set_block_sizes(ranks, self.shared_rank)


def module_type(name: str) -> str:
    return name.split(".")[-1]


def _input_groups(model: nn.Module, adapters: dict[str, ThanoraLinear], batch: dict) -> list[list[str]]:
    """Adapters that read the same input tensor (q/k/v; gate/up) share one statistic. Found by running one
    batch: consecutive adapter calls receiving the very same tensor object belong to one group."""
    order: list[tuple[str, torch.Tensor]] = []
    hooks = [a.register_forward_pre_hook(lambda m, args, n=n: order.append((n, args[0])))
             for n, a in adapters.items()]
    try:
        _preview_forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for name, x in order:
        if name in seen:
            continue  # a layer run twice (shared module): keep its first group
        seen.add(name)
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups


def _preview_forward(model: nn.Module, batch: dict) -> None:
    param, family = next(model.parameters()), family_of(model)
    kwargs = family.model_inputs(batch, param.device, param.dtype)
    with family.symmetric_forward(model, "pixel_values" in kwargs):
        model(**kwargs, use_cache=False, logits_to_keep=1)


def _content_mask(batch: dict, prefix_length: int, skip_system: bool = True) -> torch.Tensor:
    """Content tokens (METHOD.md 2.2): not padding, not the common prefix, not the record's own system turn."""
    mask = batch["attention_mask"].bool().clone()
    starts = torch.full((mask.shape[0],), prefix_length, dtype=torch.long)
    if skip_system and "content_start" in batch:
        starts = torch.maximum(starts, batch["content_start"].to(torch.long))
    mask &= torch.arange(mask.shape[1]).unsqueeze(0) >= starts.unsqueeze(1)
    if batch.get("padding_only"):
        mask[:] = False
    return mask


def _equalized_previews(previews: PreviewFn, num_tasks: int) -> list[list[dict]]:
    """Every rank must run the same number of forwards under ZeRO-3 (each one gathers parameters
    collectively). Ranks with fewer preview batches of a task repeat one as a padding-only batch that
    contributes no statistics."""
    task_batches = [list(previews(t)) for t in range(num_tasks)]
    counts = torch.tensor([len(b) for b in task_batches], dtype=torch.float64)
    if D.world_size() > 1:
        gathered = D.all_gather_objects(counts.tolist())
        counts = torch.tensor(gathered, dtype=torch.float64).max(dim=0).values
    any_batch = next((b for batches in task_batches for b in batches), None)
    if any_batch is None:
        raise ValueError("HASI: this rank received no preview sample at all; lower the world size or add data")
    for t, batches in enumerate(task_batches):
        while len(batches) < int(counts[t]):
            batches.append({**(batches[-1] if batches else any_batch), "padding_only": True})
    return task_batches


class _StatisticsCollector:
    """Forward pre-hooks that accumulate S_t = sum X^T X and n_t over content tokens for a set of groups."""

    def __init__(self, adapters: dict[str, ThanoraLinear], groups: list[list[str]], num_tasks: int):
        self.task = 0
        self.mask: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.hooks = []
        self.num_tasks = num_tasks
        self.dims = {g[0]: adapters[g[0]].in_features for g in groups}
        for group in groups:
            self.hooks.append(adapters[group[0]].register_forward_pre_hook(self._hook(group[0])))

    def _hook(self, leader: str):
        def hook(module, args):
            x = args[0]
            if leader not in self.sums:  # allocated on the activations' device (GPU memory on GPUs)
                d = self.dims[leader]
                self.sums[leader] = torch.zeros(self.num_tasks, d, d, dtype=torch.float32, device=x.device)
                self.counts[leader] = torch.zeros(self.num_tasks, dtype=torch.float64, device=x.device)
            tokens = x[self.mask.to(x.device)].to(torch.float32)
            self.sums[leader][self.task] += tokens.T @ tokens
            self.counts[leader][self.task] += tokens.shape[0]
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def run_hasi(model: nn.Module, adapters: dict[str, ThanoraLinear], cfg: ThanoraConfig, tasks: list[str],
             previews: PreviewFn, prefix_length: int, sample_counts: list[int] | None = None,
             groups_per_pass: int = 0, cache: StatisticsCache | None = None) -> Allocation:
    """``_run_hasi`` inside ``hasi_heap_scope`` and on a thread of its own (its own malloc arena) when it computes
    statistics (issue 14: HASI's working memory off the heap that training reuses); a plain LoRA initialization
    (random, uniform) leaves malloc as it is."""
    needs_statistics = not (cfg.mode == "random" and cfg.allocation == "uniform")
    if not needs_statistics:
        return _run_hasi(model, adapters, cfg, tasks, previews, prefix_length, sample_counts, groups_per_pass, cache)
    with hasi_heap_scope():
        return in_own_arena(_run_hasi, model, adapters, cfg, tasks, previews, prefix_length, sample_counts,
                            groups_per_pass, cache)


@torch.no_grad()
def _run_hasi(model: nn.Module, adapters: dict[str, ThanoraLinear], cfg: ThanoraConfig, tasks: list[str],
              previews: PreviewFn, prefix_length: int, sample_counts: list[int] | None = None,
              groups_per_pass: int = 0, cache: StatisticsCache | None = None) -> Allocation:
    """Initialize the adapters' task blocks from preview statistics and return the allocation.

    ``previews(t)`` yields this rank's share of task t's preview batches; ``prefix_length`` is the common
    token prefix of all previews (``hasi.common_prefix_length`` over every preview, before sharding). With a
    ``cache`` holding this run's statistics, no preview forward runs after the one that finds the input groups.
    """
    num_tasks = len(tasks)
    names = list(adapters)
    types = [module_type(n) for n in names]
    shared = cfg.resolved_shared_rank(num_tasks)
    task_total = cfg.rank - shared
    needs_statistics = not (cfg.mode == "random" and cfg.allocation == "uniform")
    was_training = model.training
    model.eval()

    entropy = torch.zeros(len(names), num_tasks, dtype=torch.float64)
    spectra_by_layer: dict[int, list] = {}          # owner rank only: what building the blocks needs later
    token_counts = [0] * num_tasks
    if needs_statistics:
        task_batches = _equalized_previews(previews, num_tasks)
        first_batch = next(b for batches in task_batches for b in batches)
        groups = _input_groups(model, adapters, first_batch)
        group_of = {n: g[0] for g in groups for n in g}
        missing = [n for n in names if n not in group_of]
        if missing:
            raise RuntimeError(f"HASI: adapters never called by the preview forward: {missing[:3]}...")
        per_pass = groups_per_pass if groups_per_pass > 0 else len(groups)
        passes = -(-len(groups) // per_pass)
        cached = cache is not None and cache.usable({g[0]: adapters[g[0]].in_features for g in groups}, num_tasks)
        bar = tqdm(total=(0 if cached else passes * sum(len(b) for b in task_batches)) + len(names), desc="HASI",
                   unit="step", disable=not D.is_main(), dynamic_ncols=True)
        for start in range(0, len(groups), per_pass):
            chunk = groups[start:start + per_pass]
            collector = _StatisticsCollector(adapters, chunk, num_tasks)
            bar.set_postfix_str(f"{'cached statistics' if cached else 'preview pass'} {start // per_pass + 1}/{passes}")
            if cached:
                for group in chunk:
                    collector.sums[group[0]], collector.counts[group[0]] = cache.load(group[0])
            try:
                for t in range(0 if cached else num_tasks):
                    collector.task = t
                    for batch in task_batches[t]:
                        collector.mask = _content_mask(batch, prefix_length, cfg.exclude_system_turn)
                        _preview_forward(model, batch)
                        bar.update(1)
            finally:
                collector.remove()
            for group in chunk if not cached else []:  # same order on every rank
                D.all_reduce_sum_(collector.sums[group[0]])
                D.all_reduce_sum_(collector.counts[group[0]])
                if cache is not None and D.is_main():
                    cache.save(group[0], collector.sums[group[0]], collector.counts[group[0]])
            if start == 0:
                token_counts = [int(c) for c in collector.counts[chunk[0][0]]]
            # Two phases so that the ranks decompose in parallel: first every layer's weight is gathered (a
            # collective) and kept by its owner only; then each rank decomposes its own layers with no collective
            # in between (a gather per layer between decompositions would make every rank wait for each owner,
            # serializing the work over the ranks).
            bar.set_postfix_str("decompositions")
            owned = []
            for group in chunk:
                leader = group[0]
                counts = collector.counts[leader]
                covs = [collector.sums[leader][t] / max(float(counts[t]), 1.0) for t in range(num_tasks)]
                for name in group:
                    index = names.index(name)
                    weight = _owned_weight(adapters[name], index, covs[0].device)
                    if weight is None:
                        bar.update(1)
                    else:
                        owned.append((name, index, weight, covs))
            for name, index, weight, covs in owned:
                _decompose_layer(adapters[name], index, weight, covs, cfg, task_total, entropy, spectra_by_layer)
                bar.update(1)
            del collector, owned
        bar.close()
        if cache is not None and not cached and D.is_main():
            cache.finish([g[0] for g in groups])
        warn_thin_tasks(token_counts, tasks, cfg.rank)
        D.all_reduce_sum_(entropy)   # each (layer, task) entry was filled by its owner only
    ranks = allocate_ranks(entropy, types, task_total, cfg.allocation if needs_statistics else "uniform",
                           cfg.tau, cfg.min_rank)
    allocation = Allocation(
        tasks=list(tasks), mode=cfg.mode, allocation=cfg.allocation, spectrum=cfg.spectrum, tau=cfg.tau,
        rank=cfg.rank, shared_rank=shared, prefix_length=prefix_length, layers=names, module_types=types,
        ranks=ranks, entropy=entropy.tolist(), token_counts=token_counts, sample_counts=list(sample_counts or []))
    allocation.apply(adapters)
    if cfg.mode != "random":
        for index, name in enumerate(names):
            _write_blocks(adapters[name], index, ranks[index], cfg, spectra_by_layer.pop(index, None))
    model.train(was_training)
    return allocation


def _owned_weight(adapter: ThanoraLinear, index: int, device) -> torch.Tensor | None:
    """A copy of layer ``index``'s full base weight on its owner rank (None on the others). Collective."""
    with D.gathered([adapter.base.weight]):   # every rank enters, only the owner keeps a copy
        if D.rank() != D.owner_of(index):
            return None
        return adapter.base.weight.detach().to(device, copy=True)


def _decompose_layer(adapter: ThanoraLinear, index: int, weight: torch.Tensor, covs: list[torch.Tensor],
                     cfg: ThanoraConfig, task_total: int, entropy: torch.Tensor, keep: dict) -> None:
    """Owner rank of layer ``index``: entropies of every task, and the vectors the blocks will need."""
    saved = []
    for t, cov in enumerate(covs):
        spec = task_spectrum(weight, cov, cfg.spectrum, keep=min(2 * task_total, cov.shape[0]),
                             decomposition=cfg.hasi_decomposition)
        entropy[index, t] = normalized_spectral_entropy(spec.sigma)
        if cfg.mode == "orthogonal":
            saved.append(spec)
        elif cfg.mode == "corda":
            saved.append(corda_blocks(weight, cov, task_total, adapter.scale))
    if cfg.mode == "orthogonal" and cfg.gamma_rule == "match_lora":
        keep[index] = (saved, projected_covariances(saved, covs))
    else:
        keep[index] = (saved, None)


def _write_blocks(adapter: ThanoraLinear, index: int, ranks: list[int], cfg: ThanoraConfig, saved) -> None:
    """Build layer ``index``'s blocks on its owner rank and write them into the (possibly sharded) adapter.
    The shared block keeps its plain LoRA init."""
    owner = D.owner_of(index)
    task_rows = sum(ranks)
    current_a = D.full_tensor(adapter.lora_A)   # collective under ZeRO-3
    current_b = D.full_tensor(adapter.lora_B)
    a_full = b_full = a0 = b0 = None
    if D.rank() == owner:
        if cfg.mode == "orthogonal":
            spectra, scale_inputs = saved
            coefficients = [] if scale_inputs is not None else None
            task_a = orthogonal_task_rows(spectra, ranks, cfg.gamma, coefficients=coefficients)
            if scale_inputs is not None:   # gamma_rule match_lora: per-task gains on top of gamma
                gains = lora_matched_gains(coefficients, *scale_inputs, adapter.in_features)
                task_a = task_a * torch.repeat_interleave(torch.tensor(gains, dtype=task_a.dtype),
                                                          torch.tensor(ranks))[:, None]
            task_b = torch.zeros(adapter.out_features, task_rows, dtype=torch.float64)
        else:  # corda: each task's own top-r_t factors
            task_b = torch.cat([b[:, :r] for (b, _), r in zip(saved[0], ranks)], dim=1)
            task_a = torch.cat([a[:r] for (_, a), r in zip(saved[0], ranks)], dim=0)
        a_full = torch.cat([task_a.to(current_a.dtype), current_a[task_rows:]], dim=0)
        b_full = torch.cat([task_b.to(current_b.dtype), current_b[:, task_rows:]], dim=1)
        if cfg.mode == "corda":
            # (A_0, B_0) at full rank r with zero shared rows, so the PEFT export is exactly rank 2r
            a0 = torch.cat([a_full[:task_rows], torch.zeros_like(a_full[task_rows:])]).to(torch.float32)
            b0 = torch.cat([b_full[:, :task_rows], torch.zeros_like(b_full[:, task_rows:])], 1).to(torch.float32)
    D.write_param(adapter.lora_A, a_full, src=owner)
    D.write_param(adapter.lora_B, b_full, src=owner)
    if cfg.mode == "corda":
        shape_b, shape_a = (adapter.out_features, adapter.rank), (adapter.rank, adapter.in_features)
        b0 = D.broadcast_(b0 if D.rank() == owner else torch.empty(shape_b), owner)
        a0 = D.broadcast_(a0 if D.rank() == owner else torch.empty(shape_a), owner)
        subtract_corda_residual(adapter, a0, b0)


def subtract_corda_residual(adapter: ThanoraLinear, a0: torch.Tensor, b0: torch.Tensor) -> None:
    """W <- W - s B_0 A_0 (computed in fp64, identically on every rank) and remember (A_0, B_0)."""
    adapter.set_corda_residual(a0, b0)
    weight = adapter.base.weight
    with D.gathered([weight], modifier_rank=0), torch.no_grad():
        delta = adapter.scale * (b0.to(torch.float64) @ a0.to(torch.float64))
        weight.copy_((weight.to(torch.float64) - delta.to(weight.device)).to(weight.dtype))


def release_after_hasi(engine) -> None:
    """What HASI leaves behind that a plain LoRA run does not have: ZeRO-3's preview trace and freed heap."""
    reset_zero3_trace(engine)
    trim_host_memory()


def plot_allocation(allocation: Allocation, path: str | Path) -> None:
    """PNG of ranks per task over depth, one panel per module type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted(set(allocation.module_types), key=allocation.module_types.index)
    fig, axes = plt.subplots(1, len(types), figsize=(3.2 * len(types), 3), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], types):
        rows = [i for i, t in enumerate(allocation.module_types) if t == m]
        for t, task in enumerate(allocation.tasks):
            ax.plot(range(len(rows)), [allocation.ranks[i][t] for i in rows], marker="o", ms=3, label=task)
        ax.set_title(m)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("rank r_t")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"ThanoRA allocation ({allocation.allocation}, tau={allocation.tau}, r={allocation.rank}, "
                 f"shared={allocation.shared_rank})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
