"""The training job: data -> model (ZeRO-3) -> adapters -> HASI -> DeepSpeed loop with SPR -> checkpoints.

Order matters and is chosen so that every user mistake surfaces before expensive work: the config is
validated, the data read, validated and tokenized, the resume checkpoint checked against this run, and only
then is the model loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed as D
from .checkpoint import (CheckpointError, Checkpoints, atomic_write_text, check_compatible, fault_requested,
                         to_universal, verify)
from .data import build_multitask_data, collate_batch, preview_batches
from .ds_config import fill_deepspeed_config, zero_stage
from .data.encode import IGNORE_INDEX
from .hasi import common_prefix_length
from .initializer import Allocation, plot_allocation, run_hasi, subtract_corda_residual
from .inject import inject_thanora, spr_loss
from .models import family_of_path, module_name, projector
from .run_lock import OutputLock, RunLockedError
from .train_config import TrainConfig
from .typed_config import ConfigError

log = logging.getLogger("thanora_ds")


class NonFiniteError(RuntimeError):
    pass


@dataclass
class StepStats:
    """What one optimizer step reports (summed over its micro-batches on this rank)."""
    loss_sum: float = 0.0
    spr: float = 0.0
    tokens: int = 0
    micro: int = 0
    task_loss: list[float] = field(default_factory=list)
    task_tokens: list[float] = field(default_factory=list)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position ([B, L-1]; 0 where the label is ignored)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(shift_labels.shape)


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warmup, then cosine decay to ``lr * min_ratio``: transformers' own schedule (as the HF Trainer)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=min_ratio)


def epoch_micro_sizes(draws_per_epoch: int, micro_batch: int, grad_accum: int) -> list[int]:
    """``train.num_epochs``: the micro-batch sizes of one epoch on one rank. The epoch's draws are spread as evenly
    as possible over ceil(draws / (micro_batch * grad_accum)) optimizer steps of ``grad_accum`` micro-batches each
    (sizes differ by at most one, none above ``micro_batch``), so that every draw of the epoch is trained on exactly
    once and no step borrows from the next epoch."""
    steps = math.ceil(draws_per_epoch / (micro_batch * grad_accum))
    micro = steps * grad_accum
    if draws_per_epoch < micro:
        raise ConfigError(f"train.num_epochs: an epoch has {draws_per_epoch} draws per rank, fewer than the "
                          f"{grad_accum} micro-batches of one optimizer step; lower train.gradient_accumulation_steps "
                          "or use train.max_steps")
    return [draws_per_epoch // micro + (1 if j < draws_per_epoch % micro else 0) for j in range(micro)]


def run_fingerprint(cfg: TrainConfig, tasks: list[str]) -> dict:
    """What must be equal for a checkpoint to belong to this run (everything else may change on resume)."""
    from .modeling import weights_digest

    th = cfg.thanora
    return {
        "model": str(Path(cfg.model.path).resolve()),
        # the base model's identity survives a move of its folder: its config and (sampled) weights
        "model_config_sha256": hashlib.sha256((Path(cfg.model.path) / "config.json").read_bytes()).hexdigest(),
        "model_weights_digest": weights_digest(cfg.model.path),
        "tasks": list(tasks),
        "thanora": {k: getattr(th, k) for k in ("rank", "alpha", "rslora", "targets", "shared_rank", "mode",
                                                  "train_projector")},
        "dtype": cfg.model.dtype,
        **({"adapters": False} if not cfg.train.adapters else {}),   # projector-only runs (LLaVA stage 1)
    }


def data_layout(cfg: TrainConfig, world: int) -> dict:
    """How the global batch is split; a checkpoint of another layout resumes through DeepSpeed's universal form."""
    return {"world_size": world, "micro_batch_size": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps}


class _StopRequest:
    """SIGTERM (SLURM preemption, scancel) or SIGUSR1 (SLURM's warning before the time limit): finish the
    current step, checkpoint, exit 0."""

    def __init__(self):
        self.requested = False
        self.reason = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.request(f"received {signal.Signals(signum).name}")

    def request(self, reason: str) -> None:
        self.requested, self.reason = True, reason
        log.warning("%s: will checkpoint after this step and exit", reason)


class Trainer:
    def __init__(self, cfg: TrainConfig, check_only: bool = False):
        self.cfg = cfg
        self.check_only = check_only  # validate config, data and resume checkpoint, then stop before the model
        self.out = Path(cfg.train.output_dir)
        self.checkpoints = Checkpoints(self.out, cfg.train.keep_last)
        self.stop = _StopRequest()
        self.metrics_file = None
        self.trackers = None
        self.lock: OutputLock | None = None
        # test hook: THANORA_TRACE_SAMPLES=1 writes the ids of every micro-batch to OUTPUT/trace/rank-R.jsonl
        self.trace = None
        self.eval_items = None
        self.reshaped = False       # the resume checkpoint has another data-parallel layout
        self.universal_root = None

    # ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        D.init_distributed(cfg.dist)
        self.rank, self.world = D.rank(), D.world_size()
        if not self.check_only:
            self._lock_output_dir()
            D.watch_launcher(self.stop.request)
        torch.manual_seed(cfg.train.seed)
        from .modeling import hidden_size, load_model, load_processor, weight_shapes

        self.family = family_of_path(cfg.model.path)
        self.tokenizer, self.processor = load_processor(cfg.model)
        t0 = time.time()
        self.data = build_multitask_data(cfg.data, tokenizer=self.tokenizer, processor=self.processor)
        self.tasks = self.data.tasks
        log.info("data: %d tasks %s, train sizes %s, preview %s (%.1fs)", len(self.tasks), self.tasks,
                 self.data.task_sizes, [len(self.data.preview[t]) for t in self.tasks], time.time() - t0)
        cfg.thanora.validate(len(self.tasks))
        cfg.thanora.check_rank_fits(weight_shapes(cfg.model.path), len(self.tasks), self.family.never_adapted)
        self.fingerprint = run_fingerprint(cfg, self.tasks)
        self.resume_from = self._resume_checkpoint()

        try:
            self.ds_config = fill_deepspeed_config(
                cfg.deepspeed_template(), micro_batch_size=cfg.train.micro_batch_size,
                grad_accum=cfg.train.gradient_accumulation_steps, clip=cfg.train.max_grad_norm,
                bf16=cfg.model.dtype == "bf16", hidden_size=hidden_size(cfg.model.path))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.zero = zero_stage(self.ds_config)
        if self.reshaped:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.sampler = self.data.make_sampler(self.rank, self.world)
        self.micro_sizes = None  # per micro step of an epoch (train.num_epochs); None: always micro_batch_size
        if cfg.train.num_epochs is not None:
            self.micro_sizes = epoch_micro_sizes(len(self.sampler), cfg.train.micro_batch_size,
                                                 cfg.train.gradient_accumulation_steps)
            self.max_steps = cfg.train.num_epochs * len(self.micro_sizes) // cfg.train.gradient_accumulation_steps
            log.info("train.num_epochs=%d: %d optimizer steps (%d per epoch)", cfg.train.num_epochs, self.max_steps,
                     self.max_steps // cfg.train.num_epochs)
        else:
            self.max_steps = cfg.train.max_steps
        if self.check_only:
            log.info("check passed: config, %d tasks of data, %s; nothing loaded or written", len(self.tasks),
                     f"resume from {self.resume_from}" if self.resume_from else "a fresh start")
            return
        model = load_model(cfg.model, self.ds_config)
        self.partition = D.partition_sizes(model.parameters())
        log.info("model loaded: %d parameters, %d held by this rank", *self.partition)
        self.adapters = inject_thanora(model, cfg.thanora, len(self.tasks), adapters=cfg.train.adapters)
        optimizer = torch.optim.AdamW(self._param_groups(model), lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                                      eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay)
        scheduler = cosine_schedule(optimizer, cfg.train.warmup_steps, self.max_steps, cfg.train.min_lr_ratio)
        import deepspeed

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.model = self.engine.module
        self.named_trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in self.named_trainable]
        self.step = 0
        self.hasi_seconds = 0.0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        else:
            self._initialize_subspaces()
        self.draws = iter(self.sampler)  # continues from the (restored) sampler state
        if os.environ.get("THANORA_TRACE_SAMPLES") == "1":
            (self.out / "trace").mkdir(parents=True, exist_ok=True)
            self.trace = open(self.out / "trace" / f"rank-{self.rank}.jsonl", "a")
        if D.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
            timings = {"setup_seconds": time.time() - t0, "hasi_seconds": self.hasi_seconds,
                       "parameters": self.partition[0], "parameters_on_rank0_after_load": self.partition[1]}
            (self.out / "timings.json").write_text(json.dumps(timings))
            self.metrics_file = open(self.out / "metrics.jsonl", "a")
            from .trackers import Trackers
            self.trackers = Trackers(cfg.train.report_to, self.out, cfg.train.run_name or self.out.name,
                                     json.loads(json.dumps(cfg.to_dict(), default=str)))

    def _lock_output_dir(self) -> None:
        """Rank 0 takes the output directory's lock (held until the run ends); every rank learns the outcome."""
        error = None
        if D.is_main():
            self.lock = OutputLock(self.out)
            try:
                self.lock.acquire()
            except RunLockedError as err:
                self.lock, error = None, str(err)
        error = D.all_gather_objects(error)[0]
        if error:
            raise RunLockedError(error)

    def _param_groups(self, model) -> list[dict]:
        cfg = self.cfg
        module = projector(model)
        proj_ids = {id(p) for p in module.parameters()} if module is not None else set()
        adapters = [p for p in model.parameters() if p.requires_grad and id(p) not in proj_ids]
        groups = [{"params": adapters, "lr": cfg.train.lr}] if adapters else []   # none with train.adapters: false
        proj = [p for p in model.parameters() if p.requires_grad and id(p) in proj_ids]
        if proj:
            groups.append({"params": proj, "lr": cfg.train.projector_lr or cfg.train.lr})
        return groups

    def _resume_checkpoint(self) -> Path | None:
        """The checkpoint to resume from, verified against its manifest before the model is loaded. ``auto``
        falls back from a damaged checkpoint to the newest intact one (warning, the damaged one set aside); an
        explicit path must be intact; another run's checkpoint is refused either way."""
        mode = self.cfg.train.resume
        if mode == "never":
            if self.checkpoints.complete():  # a fresh start here would mix its checkpoints and metrics with theirs
                raise CheckpointError(f"train.resume=never, but {self.checkpoints.root} holds checkpoints of an earlier "
                                      "run; start afresh in another train.output_dir (or resume it: train.resume=auto)")
            return None
        explicit = mode != "auto"
        rejected: list[tuple[Path, str]] = []
        for path in [Path(mode)] if explicit else self.checkpoints.candidates():
            problem = verify(path)
            if problem is None:
                try:
                    meta = Checkpoints.read_meta(path)
                except CheckpointError as err:
                    problem = str(err)
            if problem is not None:
                if explicit:
                    raise CheckpointError(f"train.resume: {path} is damaged, not resumed: {problem}")
                log.warning("checkpoint %s is damaged, trying the previous one: %s", path.name, problem)
                rejected.append((path, problem))
                continue
            self.reshaped = check_compatible(meta, self.fingerprint, data_layout(self.cfg, self.world), path)
            if self.reshaped and not self.check_only:
                log.warning("%s was written with %s, this run has %s: resuming through DeepSpeed's universal "
                            "checkpoint (the data position carries over by sample count)", path.name,
                            meta.get("layout"), data_layout(self.cfg, self.world))
                self.universal_root = to_universal(path)
            D.barrier()  # every rank has verified before a damaged one is moved
            for bad, why in rejected if not self.check_only else []:
                self.checkpoints.set_aside(bad, why)
            self.resume_meta = meta
            return path
        if rejected:
            raise CheckpointError(f"no intact checkpoint to resume in {self.checkpoints.root}:\n  "
                                  + "\n  ".join(f"{p.name}: {why}" for p, why in rejected)
                                  + "\n(start afresh in another train.output_dir)")
        return None

    # ------------------------------------------------------------------------------------------------------
    def _initialize_subspaces(self) -> None:
        cfg = self.cfg
        t0 = time.time()
        if not self.adapters:  # train.adapters: false: nothing to initialize; an empty allocation keeps the files
            th = cfg.thanora
            self.allocation = Allocation(list(self.tasks), th.mode, th.allocation, th.spectrum, th.tau, th.rank, 0, 0,
                                         [], [], [], [])
            if D.is_main():
                self.out.mkdir(parents=True, exist_ok=True)
                self.allocation.save(self.out / "allocation.json")
            log.info("train.adapters: false: no adapters, no HASI; training the multimodal projector alone")
            return
        previews = [list(self.data.preview[t]) for t in self.tasks]
        prefix = common_prefix_length([ex["input_ids"] for exs in previews for ex in exs],
                                      self.family.image_token_id(self.processor))

        def batches(t: int):
            return preview_batches(self.data, self.tasks[t], cfg.train.preview_batch_size, self.rank, self.world)

        cache = None
        if cfg.thanora.statistics_cache:
            from .statistics_cache import StatisticsCache, statistics_key

            fp = self.fingerprint
            key = statistics_key({"weights": fp["model_weights_digest"], "config": fp["model_config_sha256"],
                                  "dtype": cfg.model.dtype, "targets": cfg.thanora.targets, "tasks": self.tasks,
                                  "prefix": prefix, "exclude_system_turn": cfg.thanora.exclude_system_turn},
                                 previews)
            cache = StatisticsCache(cfg.thanora.statistics_cache, key)
        self.allocation = run_hasi(self.model, self.adapters, cfg.thanora, self.tasks, batches, prefix,
                                   sample_counts=[len(p) for p in previews],
                                   groups_per_pass=cfg.train.hasi_groups_per_pass, cache=cache)
        from .initializer import release_after_hasi  # issue 14: drop ZeRO-3's preview trace and HASI's freed heap

        release_after_hasi(self.engine)
        self.hasi_seconds = time.time() - t0
        log.info("HASI: prefix %d tokens, %.1fs, ranks of layer 0: %s", prefix, self.hasi_seconds,
                 self.allocation.ranks[0] if self.allocation.ranks else None)
        if D.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            self.allocation.save(self.out / "allocation.json")
            plot_allocation(self.allocation, self.out / "allocation.png")

    def _corda_init_bytes(self) -> bytes | None:
        if self.cfg.thanora.mode != "corda":
            return None
        from safetensors.torch import save

        tensors = {}
        for name, a in self.adapters.items():
            tensors[f"{name}.corda_A0"] = a.corda_A0.contiguous()
            tensors[f"{name}.corda_B0"] = a.corda_B0.contiguous()
        return save(tensors)

    def _resume(self, path: Path) -> None:
        self.allocation = Allocation.load(path / "allocation.json")
        self.allocation.apply(self.adapters)
        if self.cfg.thanora.mode == "corda":
            from safetensors.torch import load_file

            init = load_file(str(path / "corda_init.safetensors"))
            for name, adapter in self.adapters.items():
                subtract_corda_residual(adapter, init[f"{name}.corda_A0"], init[f"{name}.corda_B0"])
        state = Checkpoints.load(self.engine, path, self.universal_root)
        bad = D.non_finite_params(self.named_trainable)
        if bad:
            raise CheckpointError(f"{path} holds non-finite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''});"
                                  " not resumed (train.resume=PATH picks an earlier checkpoint)")
        self.step = int(self.resume_meta["step"])
        if self.universal_root is None:
            self.sampler.load_state_dict(state["sampler"])
            D.set_rng_state(state["rng"])
        else:  # another layout: the same global sample count; fresh per-rank RNG streams (dropout), seeded per step
            self.sampler.seek(state["sampler"])
            D.seed_everything(self.cfg.train.seed + 1000003 * self.step + self.rank)
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path:
        extra = {"allocation.json": self.allocation.to_json().encode()}
        corda = self._corda_init_bytes()
        if corda is not None:
            extra["corda_init.safetensors"] = corda
        meta = {"step": self.step, "world_size": self.world, "layout": data_layout(self.cfg, self.world),
                "fingerprint": self.fingerprint,
                "config": self.cfg.to_dict()}
        meta = json.loads(json.dumps(meta, default=str))
        path = self.checkpoints.save(self.engine, self.step, meta,
                                     {"sampler": self.sampler.state_dict(), "rng": D.rng_state()}, extra)
        log.info("checkpoint %s", path)
        return path

    # ------------------------------------------------------------------------------------------------------
    def _next_batch(self, micro: int) -> dict:
        """The ``micro``-th micro-batch of the current optimizer step."""
        size = self.cfg.train.micro_batch_size
        if self.micro_sizes is not None:
            per_step = self.cfg.train.gradient_accumulation_steps
            size = self.micro_sizes[(self.step * per_step + micro) % len(self.micro_sizes)]
        examples = []
        for _ in range(size):
            try:
                task_id, index = next(self.draws)
            except StopIteration:  # end of an epoch: the sampler's state has moved on to the next one
                self.draws = iter(self.sampler)
                task_id, index = next(self.draws)
            examples.append(self.data.train_example(task_id, index))
        if self.trace is not None:
            self.trace.write(json.dumps({"step": self.step + 1, "ids": [e["id"] for e in examples]}) + "\n")
            self.trace.flush()
        return collate_batch(examples, self.data.pad_token_id)

    def _micro_step(self, stats: StepStats, micro: int) -> None:
        batch = self._next_batch(micro)
        device = self.engine.device
        inputs = self.family.model_inputs(batch, device, next(self.model.parameters()).dtype)
        if self.cfg.thanora.task_routing:   # kept for activation checkpointing's re-forward; cleared after backward
            for adapter in self.adapters.values():
                adapter.route = batch["task_ids"]
        with self.family.symmetric_forward(self.model, "pixel_values" in inputs):
            logits = self.engine(**inputs, use_cache=False).logits
        labels = batch["labels"].to(device)
        per_token = token_losses(logits, labels)
        valid = (labels[:, 1:] != IGNORE_INDEX)
        n_tokens = int(valid.sum())
        task_loss = per_token.sum() / max(n_tokens, 1)
        spr = spr_loss(self.adapters.values())
        loss = task_loss if spr is None else task_loss + self.cfg.thanora.spr_lambda * spr
        if D.any_rank(not bool(torch.isfinite(loss))):
            raise NonFiniteError(f"non-finite loss at step {self.step + 1} (task loss {task_loss.item():.4g}, SPR "
                                 f"{(spr.item() if spr is not None else 0.0):.4g}); stopped before the optimizer step. "
                                 "Lower train.lr, check the data, or use fp32.")
        self.engine.backward(loss)
        if self.cfg.thanora.task_routing:
            for adapter in self.adapters.values():
                adapter.route = None
        with torch.no_grad():
            per_sample = per_token.sum(1).detach().float().cpu()
            tokens = valid.sum(1).float().cpu()
            for t, loss_t, n_t in zip(batch["task_ids"].tolist(), per_sample.tolist(), tokens.tolist()):
                stats.task_loss[t] += loss_t
                stats.task_tokens[t] += n_t
        stats.loss_sum += float(task_loss.detach())
        stats.spr = float(spr.detach()) if spr is not None else 0.0
        stats.tokens += int(batch["attention_mask"].sum())
        stats.micro += 1

    def train_step(self) -> dict:
        cfg = self.cfg
        T = len(self.tasks)
        stats = StepStats(task_loss=[0.0] * T, task_tokens=[0.0] * T)
        t0 = time.time()
        for micro in range(cfg.train.gradient_accumulation_steps):
            self._micro_step(stats, micro)
            if self.engine.is_gradient_accumulation_boundary():
                grad_norm = D.global_grad_norm(self.trainable, self.zero)
                if D.any_rank(not math.isfinite(grad_norm)):
                    raise NonFiniteError(f"non-finite gradient norm at step {self.step + 1}; stopped before the "
                                         "optimizer step. Lower train.lr or check the data.")
            lr = self.scheduler.get_last_lr()[0]
            try:
                self.engine.step()
            except RuntimeError as err:  # torch's Adam: "value cannot be converted to type float without overflow"
                if "overflow" not in str(err):
                    raise
                raise NonFiniteError(f"the optimizer step of step {self.step + 1} overflowed at lr {lr:.3g} ({err}); "
                                     "stopped without saving. Lower train.lr.") from None
        self._check_weights(self.step + 1)
        self.step += 1
        seconds = time.time() - t0
        summed = torch.tensor([stats.loss_sum / stats.micro, float(stats.tokens)] + stats.task_loss + stats.task_tokens,
                              dtype=torch.float64)
        D.all_reduce_sum_(summed)
        loss = float(summed[0]) / self.world
        task_loss = summed[2:2 + T]
        task_tokens = summed[2 + T:]
        return {
            "step": self.step, "loss": loss + cfg.thanora.spr_lambda * stats.spr, "task_loss": loss,
            "spr": stats.spr, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": float(summed[1]) / seconds,
            "step_seconds": seconds,
            **{f"loss/{name}": float(task_loss[t] / task_tokens[t]) for t, name in enumerate(self.tasks)
               if task_tokens[t] > 0},
        }

    def evaluate(self) -> dict:
        """Per-task eval loss (and scores with train.eval_generate) on the eval splits, sharded over the ranks;
        logged like the training metrics (``eval/loss/<task>``, OUTPUT/eval.jsonl and the trackers) and written to
        OUTPUT/eval/step-N.json."""
        from .evaluate import eval_items, evaluate_sharded
        cfg = self.cfg.train
        if self.eval_items is None:  # built once: the eval examples and their reference answers
            self.eval_items = {t: items for t, items in eval_items(self.data, self.tokenizer).items() if items}
        t0 = time.time()
        self.model.eval()
        results = evaluate_sharded(self.model, self.eval_items, self.data, self.tokenizer, cfg.micro_batch_size,
                                   cfg.eval_max_new_tokens, cfg.eval_generate)
        self.model.train()
        D.reset_zero3_trace(self.engine)  # the eval forwards are not the training order ZeRO-3 should prefetch by
        record = {"step": self.step, "eval_seconds": time.time() - t0, **self.mechanism_summary()}
        for task, r in results.items():
            if r["loss"] is not None:
                record[f"eval/loss/{task}"] = r["loss"]
            if r.get("score") is not None:
                record[f"eval/score/{task}"] = r["score"]
        if D.is_main():
            (self.out / "eval").mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "eval" / f"step-{self.step:08d}.json",
                              json.dumps({"step": self.step, "tasks": results}, indent=1))
            with open(self.out / "eval.jsonl", "a") as f:
                self.log_metrics(record, None, f)
            log.info("eval at step %d: %s", self.step, ", ".join(f"{k.split('/', 1)[1]} {v:.4f}"
                                                                  for k, v in record.items() if k.startswith("eval/")))
        return results

    def mechanism(self) -> dict[str, dict]:
        """Per-layer mechanism metrics (thanora_ds.mechanism: effective rank of s B A, cross-task overlaps, task
        shares), on rank 0; collective (gathers every A and B)."""
        from .mechanism import layer_metrics

        out = {}
        for name, adapter in self.adapters.items():
            a, b = D.full_tensor(adapter.lora_A), D.full_tensor(adapter.lora_B)
            if D.is_main():
                out[name] = layer_metrics(a, b, adapter.block_sizes, adapter.scale)
        return out

    def mechanism_summary(self) -> dict:
        from .mechanism import summarize

        return summarize(self.mechanism(), self.tasks) if len(self.tasks) > 1 and self.adapters else {}

    def _check_weights(self, step: int) -> None:
        """After the optimizer step: a non-finite trainable weight stops the run before anything is saved, so the
        last checkpoint written stays the newest (and intact) one."""
        if fault_requested("nan_adapter", step) and D.is_main():
            with torch.no_grad():
                D.local_values(self.trainable[0]).view(-1)[0] = float("nan")
        bad = D.non_finite_params(self.named_trainable)
        if bad:
            latest = self.checkpoints.latest()
            raise NonFiniteError(f"non-finite weights after the optimizer step of step {step} in {len(bad)} parameter(s) "
                                 f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); stopped without saving, "
                                 f"the newest checkpoint is still {latest.name if latest else 'none'}. Lower train.lr.")

    def log_metrics(self, record: dict, bar, file=None) -> None:
        """Rank 0: one record into ``file`` (metrics.jsonl by default) and the trackers."""
        if not D.is_main():
            return
        file = file or self.metrics_file
        file.write(json.dumps(record) + "\n")
        file.flush()
        if self.trackers is not None:
            self.trackers.log(record, record["step"])
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", spr=f"{record['spr']:.3g}", lr=f"{record['lr']:.2e}",
                            gnorm=f"{record['grad_norm']:.3g}", tok_s=f"{record['tokens_per_s']:.0f}")

    def fit(self) -> int:
        from tqdm import tqdm

        cfg = self.cfg
        self.engine.train()
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True) if D.is_main() else None
        if cfg.train.eval_every and self.step == 0 and len(self.tasks) > 1 and self.adapters:
            mech = {"step": 0, **self.mechanism_summary()}   # the subspaces as HASI left them
            if D.is_main():
                with open(self.out / "eval.jsonl", "a") as f:
                    self.log_metrics(mech, None, f)
        last_saved = self.step if self.resume_from is not None else None
        while self.step < self.max_steps:
            record = self.train_step()
            if self.step % cfg.train.log_every == 0 or self.step == self.max_steps:
                self.log_metrics(record, bar)
            if bar is not None:
                bar.update(1)
            stop = D.any_rank(self.stop.requested) or self.step == cfg.train.stop_at_step
            if stop or (cfg.train.save_every and self.step % cfg.train.save_every == 0):
                self.save()
                last_saved = self.step
            if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or self.step == self.max_steps):
                self.evaluate()
            if fault_requested("pause_after", self.step):  # test hook: a run that is alive but idle
                deadline = time.time() + 600
                while not D.any_rank(self.stop.requested) and time.time() < deadline:
                    time.sleep(0.2)
                stop = True
            if stop:
                break
        if self.step >= self.max_steps and last_saved != self.step:
            self.save()
        if bar is not None:
            bar.close()
        finished = self.step >= self.max_steps
        if finished:
            self.write_final_adapter()
        reason = self.stop.reason
        if not finished:   # a stop one rank was asked for (its signal, its launcher watch) stopped every rank
            reason = next((r for r in D.all_gather_objects(reason) if r), "")
        self.write_status("finished" if finished else "stopped", reason)
        return self.step

    def write_status(self, state: str, reason: str = "") -> None:
        """OUTPUT/status.json: how the run ended (finished / stopped / failed), for scripts and for users whose
        launcher's exit code says less (torchrun exits 1 after forwarding a SIGTERM even when every rank saved)."""
        if not D.is_main():
            return
        latest = self.checkpoints.latest()
        status = {"state": state, "step": self.step, "max_steps": self.max_steps, "reason": reason,
                  "latest_checkpoint": str(latest) if latest else None,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "status.json", json.dumps(status, indent=1))
        if state == "stopped":
            log.warning("stopped at step %d (%s); checkpoint %s saved; this rank exits 0 and the same command "
                        "resumes (torchrun itself exits 1 after forwarding a SIGTERM: %s says what happened)",
                        self.step, reason or "train.stop_at_step", latest.name if latest else "-", self.out / "status.json")

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
        for f in (self.metrics_file, self.trace):
            if f is not None:
                f.close()
        if self.lock is not None:
            self.lock.release()

    def write_final_adapter(self) -> None:
        """Gathered fp32 adapter weights (+ trained projector) of the finished run in one safetensors file."""
        from safetensors.torch import save_file

        tensors = {}
        for name, adapter in self.adapters.items():
            tensors[f"{name}.lora_A"] = D.full_tensor(adapter.lora_A).float()
            tensors[f"{name}.lora_B"] = D.full_tensor(adapter.lora_B).float()
        proj = projector(self.model)
        if proj is not None and self.cfg.thanora.train_projector:
            prefix = module_name(self.model, proj)
            for n, p in proj.named_parameters():
                tensors[f"{prefix}.{n}"] = D.full_tensor(p).float()
        if D.is_main():
            final = self.out / "final"
            final.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(final / "adapter_weights.safetensors"))
            self.allocation.save(final / "allocation.json")
            if len(self.tasks) > 1 and self.adapters:
                from .mechanism import layer_metrics

                per_layer = {name: layer_metrics(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"],
                                                 adapter.block_sizes, adapter.scale)
                             for name, adapter in self.adapters.items()}
                atomic_write_text(final / "mechanism.json", json.dumps({"tasks": self.tasks, "layers": per_layer}))


def train(cfg: TrainConfig, check_only: bool = False) -> int:
    """Run the job; with ``check_only`` validate everything that precedes the model load and return 0."""
    from .modeling import release_zero3_model_loading

    trainer = Trainer(cfg, check_only)
    try:
        trainer.setup()
        return 0 if check_only else trainer.fit()
    except NonFiniteError as err:
        trainer.write_status("failed", str(err))
        raise
    finally:
        trainer.close()
        release_zero3_model_loading()
