#!/usr/bin/env python
"""This framework against the tools a user would pick instead, in one invocation, same everything.

    python benchmarks/peers.py --config configs/demo_smollm2.yaml --nproc 2 --steps 8 --rounds 2 \
        [--llamafactory-python /path/to/venv/bin/python] [overrides ...]

Variants (same model, data, sequence lengths, rank, alpha, dropout, targets, micro-batch, activation
checkpointing, lr schedule and the very same filled DeepSpeed ZeRO-3 config):
  lora          this framework, plain LoRA (thanora.mode=random, allocation=uniform, spr_lambda=0)
  thanora       this framework, ThanoRA as the config says (HASI reported separately, SPR on)
  peft_hf       PEFT LoRA trained by the Hugging Face Trainer with the same DeepSpeed config and the very same
                batches per rank (this framework's sampler and collator feed its dataloader)
  llamafactory  LLaMA-Factory's LoRA (`run_exp`), when --llamafactory-python names a Python that has it
                (its own tokenization/template and sampler: same data and cutoff, not the same batches)
Variants run interleaved over --rounds (lora, thanora, peft_hf, ..., lora, ...); per variant the round with the
lowest median counts. Step time = median over the steps after --warmup (rank 0's wall time of the optimizer
step), tokens/s = tokens in the step (attention mask, all ranks) / step time, both over the same steps;
peak RSS per rank sampled every 0.2 s by this process over each rank's process, during training (after HASI
for thanora; HASI's own peak is printed apart). Ratios against peft_hf.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from step_time import WARMUP_STEPS, launch_command, steady_median

THANORA_VARIANTS = {
    "lora": ["thanora.mode=random", "thanora.allocation=uniform", "thanora.spr_lambda=0"],
    "thanora": [],
}
BASELINE = "peft_hf"
LABELS = {
    "lora": "this framework, plain LoRA",
    "thanora": "this framework, ThanoRA",
    "peft_hf": "PEFT LoRA + HF Trainer, same DeepSpeed config",
    "llamafactory": "LLaMA-Factory LoRA, same DeepSpeed config",
}


# ---------------------------------------------------------------------------------------------------------------
# Measurement from outside: per-rank RSS of the launched processes.

class RssSampler(threading.Thread):
    """Samples the RSS of every descendant Python process of ``root_pid``; phases come from marker files the
    workers write (``<out>/phase-<pid>.json``: {"train_start": t})."""

    def __init__(self, root_pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval, self.stop = root_pid, interval, threading.Event()
        self.samples: dict[int, list[tuple[float, int]]] = {}

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                procs = root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            now = time.time()
            for p in procs:
                try:
                    if "python" in p.name():
                        self.samples.setdefault(p.pid, []).append((now, p.memory_info().rss))
                except psutil.Error:
                    pass
            self.stop.wait(self.interval)


def run_variant(name: str, args, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    python = args.llamafactory_python if name == "llamafactory" else sys.executable
    worker = [str(Path(__file__).resolve()), "--worker", name, "--out", str(out), "--config", args.config,
              "--steps", str(args.steps), *args.overrides]
    cmd = launch_command(worker, args.nproc, python=python)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GLOO_SOCKET_IFNAME": "lo",
           "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = RssSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    wall = time.time() - t0
    if rc != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        return {"error": f"exit {rc}", "log_tail": tail, "wall_s": wall}
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    ranks = {}
    for marker in out.glob("phase-*.json"):
        info = json.loads(marker.read_text())
        ranks[info["rank"]] = info
    rss_train, rss_setup = [], []
    for rank in sorted(ranks):
        info = ranks[rank]
        samples = sampler.samples.get(info["pid"], [])
        rss_train.append(max((r for t, r in samples if t >= info["train_start"]), default=0) / 2**30)
        rss_setup.append(max((r for t, r in samples if t < info["train_start"]), default=0) / 2**30)
    if not ranks:  # a worker that cannot mark phases: the whole run, per process
        rss_train = sorted(max(r for _, r in s) / 2**30 for s in sampler.samples.values())
    cpu_files = sorted(out.glob("cpu-*.jsonl"))
    if cpu_files:   # CPU seconds per step summed over ranks: less sensitive than wall time to other load
        per_rank = [[json.loads(x) for x in f.read_text().splitlines()] for f in cpu_files]
        for i, s in enumerate(steps):
            s["cpu_seconds"] = sum(r[i] for r in per_rank if i < len(r))
    step_s = steady_median([s["seconds"] for s in steps], args.warmup)
    tokens = steady_median([s["tokens"] / s["seconds"] for s in steps], args.warmup)
    summary = {"step_s": step_s, "tokens_per_s": tokens, "rss_train_gb": rss_train, "rss_setup_gb": rss_setup,
               "wall_s": wall, "steps": steps}
    extra = out / "extra.json"
    if extra.is_file():
        summary.update(json.loads(extra.read_text()))
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Workers (one per rank, started by torchrun).

def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _append_cpu(out: Path, seconds: float) -> None:
    with open(out / f"cpu-{_rank()}.jsonl", "a") as f:
        f.write(json.dumps(seconds) + "\n")


def _mark_train_start(out: Path) -> None:
    (out / f"phase-{os.getpid()}.json").write_text(json.dumps(
        {"rank": _rank(), "pid": os.getpid(), "train_start": time.time()}))


def worker_thanora(variant: str, out: Path, config: str, steps: int, overrides: list[str]) -> None:
    """This framework's own loop (Trainer.fit), with HASI timed by the Trainer itself."""
    from thanora_ds import distributed as D
    from thanora_ds.train_config import load_train_config
    from thanora_ds.trainer import Trainer

    cfg = load_train_config(config, [*overrides, *THANORA_VARIANTS[variant], f"train.output_dir={out / 'run'}",
                                     f"train.max_steps={steps}", "train.save_every=0", "train.resume=never",
                                     "train.report_to=[]", "train.log_every=1"])
    trainer = Trainer(cfg)
    trainer.setup()
    _mark_train_start(out)
    step = trainer.train_step

    def timed_step():   # this rank's CPU seconds per step, next to the Trainer's own wall time
        c0 = time.process_time()
        record = step()
        _append_cpu(out, time.process_time() - c0)
        return record

    trainer.train_step = timed_step
    trainer.fit()
    if D.is_main():
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        with open(out / "steps.jsonl", "w") as f:
            f.writelines(json.dumps({"seconds": r["step_seconds"], "tokens": r["tokens_per_s"] * r["step_seconds"],
                                    "loss": r["task_loss"]}) + "\n" for r in records)
        (out / "extra.json").write_text(json.dumps({"hasi_s": trainer.hasi_seconds}))


class _StepClock:
    """Per-step wall time and token count for a Hugging Face Trainer (a TrainerCallback)."""

    def __init__(self, out: Path, tokens_per_step: list[int]):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock.t0, clock.c0 = time.time(), time.process_time()

            def on_step_end(self, args, state, control, **kw):
                import torch
                import torch.distributed as dist

                seconds = time.time() - clock.t0
                _append_cpu(clock.out, time.process_time() - clock.c0)
                step = state.global_step - 1
                tokens = torch.tensor([float(clock.tokens[step]) if step < len(clock.tokens) else 0.0])
                if dist.is_initialized():
                    dist.all_reduce(tokens)
                if _rank() == 0:
                    with open(clock.out / "steps.jsonl", "a") as f:
                        f.write(json.dumps({"seconds": seconds, "tokens": float(tokens)}) + "\n")

            def on_train_begin(self, args, state, control, **kw):
                _mark_train_start(clock.out)

        self.out, self.tokens, self.t0 = out, tokens_per_step, 0.0
        self.callback = Callback()


def worker_peft_hf(out: Path, config: str, steps: int, overrides: list[str]) -> None:
    """PEFT LoRA under the Hugging Face Trainer + DeepSpeed, fed this framework's batches for this rank."""
    import torch
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from thanora_ds import distributed as D
    from thanora_ds.data import build_multitask_data, collate_batch
    from thanora_ds.modeling import hidden_size, load_processor
    from thanora_ds.train_config import load_train_config

    cfg = load_train_config(config, overrides)
    D.init_distributed(cfg.dist)   # the same process group (gloo on CPU, nccl on CUDA) as this framework's runs
    # on a CPU-only host accelerate would otherwise see one process: name the backend
    state = PartialState(backend="gloo" if not torch.cuda.is_available() else None)
    tokenizer, _ = load_processor(cfg.model)
    data = build_multitask_data(cfg.data, tokenizer=tokenizer)
    template = json.loads(cfg.deepspeed_path().read_text())
    from thanora_ds.ds_config import fill_deepspeed_config
    ds_config = fill_deepspeed_config(
        template, micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.gradient_accumulation_steps,
        clip=cfg.train.max_grad_norm, bf16=cfg.model.dtype == "bf16", hidden_size=hidden_size(cfg.model.path),
        overrides=cfg.deepspeed.overrides)
    # This rank's examples in the order this framework's sampler draws them (Trainer._next_batch's logic).
    sampler = data.make_sampler(state.process_index, state.num_processes)
    draws = iter(sampler)
    n = steps * cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
    examples = []
    while len(examples) < n:
        try:
            task_id, index = next(draws)
        except StopIteration:
            draws = iter(sampler)
            continue
        examples.append(data.train_example(task_id, index))
    mb = cfg.train.micro_batch_size

    def collate(batch):
        full = collate_batch(batch, data.pad_token_id)
        return {k: full[k] for k in ("input_ids", "attention_mask", "labels")}

    per_step = mb * cfg.train.gradient_accumulation_steps
    tokens = [sum(len(e["input_ids"]) for e in examples[i:i + per_step]) for i in range(0, n, per_step)]
    clock = _StepClock(out, tokens)
    targs = TrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=mb,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, max_steps=steps,
        learning_rate=cfg.train.lr, warmup_steps=cfg.train.warmup_steps, lr_scheduler_type="cosine",
        weight_decay=cfg.train.weight_decay, adam_beta1=cfg.train.adam_betas[0], adam_beta2=cfg.train.adam_betas[1],
        adam_epsilon=cfg.train.adam_eps, max_grad_norm=cfg.train.max_grad_norm, seed=cfg.train.seed,
        gradient_checkpointing=cfg.model.activation_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, deepspeed=ds_config, bf16=cfg.model.dtype == "bf16",
        logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype,
                                                 attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False
    th = cfg.thanora
    model = get_peft_model(model, LoraConfig(r=th.rank, lora_alpha=th.alpha, lora_dropout=th.dropout,
                                             target_modules=list(th.targets), use_rslora=th.rslora,
                                             task_type="CAUSAL_LM"))

    class SameBatches(Trainer):
        def get_train_dataloader(self):   # no re-sharding or shuffling: exactly this rank's batches, in order
            return DataLoader(examples, batch_size=mb, shuffle=False, collate_fn=collate)

    trainer = SameBatches(model=model, args=targs, train_dataset=examples, data_collator=collate,
                          callbacks=[clock.callback])
    trainer.train()


LLAMAFACTORY_TEMPLATE = "smollm2"


def worker_llamafactory(out: Path, config: str, steps: int, overrides: list[str]) -> None:
    """LLaMA-Factory's LoRA SFT via llamafactory.train.tuner.run_exp, in LLaMA-Factory's own environment.
    Runs without thanora_ds installed: the config is read with yaml, the DeepSpeed config filled here the same
    way (the values this framework would put for "auto")."""
    import deepspeed
    import deepspeed.ops
    import torch
    import yaml
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu:  # as thanora_ds.distributed does: no JIT-built shared-memory all-reduce op, gloo
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    PartialState(backend="gloo" if cpu else None)
    from transformers import AutoConfig, TrainerCallback

    raw = yaml.safe_load(Path(config).read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    base = Path(config).resolve().parent
    model_path = Path(raw["model"]["path"])
    model_path = model_path if model_path.is_absolute() and model_path.exists() else (
        Path.cwd() / model_path if (Path.cwd() / model_path).exists() else base / model_path)
    train, th, dcfg = raw.get("train", {}), raw.get("thanora", {}), raw["data"]
    # data: every source as one alpaca/sharegpt-style JSON file LLaMA-Factory reads offline
    records = []
    for src in dcfg["sources"]:
        for line in (base / src["path"]).read_text().splitlines():
            r = json.loads(line)
            if "messages" in r:
                msgs = r["messages"]
                records.append({"instruction": "\n".join(m["content"] for m in msgs if m["role"] == "user"), "input": "",
                                "output": "\n".join(m["content"] for m in msgs if m["role"] == "assistant")})
            else:
                records.append({"instruction": r["prompt"], "input": "", "output": r["response"]})
    data_dir = out / "lf_data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "demo.json").write_text(json.dumps(records))
    (data_dir / "dataset_info.json").write_text(json.dumps({"demo": {"file_name": "demo.json"}}))
    hidden = AutoConfig.from_pretrained(model_path).hidden_size
    ds = json.loads((REPO / raw.get("deepspeed", {}).get("config", "ds_configs/zero3.json")).read_text())
    mb = int(train.get("micro_batch_size", 4))
    accum = int(train.get("gradient_accumulation_steps", 1))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fills = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": accum,
             "train_batch_size": mb * accum * world, "gradient_clipping": float(train.get("max_grad_norm", 1.0))}
    ds.update({k: v for k, v in fills.items() if ds.get(k) == "auto"})
    ds["bf16"] = {"enabled": raw["model"].get("dtype") == "bf16"}
    z = ds["zero_optimization"]
    for k, v in {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                 "stage3_param_persistence_threshold": 10 * hidden}.items():
        if z.get(k) == "auto":
            z[k] = v
    (out / "ds_config.json").write_text(json.dumps(ds))

    class Clock(TrainerCallback):
        """Step wall time; tokens from the Trainer's own all-rank count of non-padding input tokens."""
        seen = 0

        def on_train_begin(self, args, state, control, **kw):
            _mark_train_start(out)

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.time(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            seconds = time.time() - self.t0
            _append_cpu(out, time.process_time() - self.c0)
            tokens, Clock.seen = state.num_input_tokens_seen - Clock.seen, state.num_input_tokens_seen
            if _rank() == 0:
                with open(out / "steps.jsonl", "a") as f:
                    f.write(json.dumps({"seconds": seconds, "tokens": float(tokens)}) + "\n")

    try:  # LLaMA-Factory 0.9.5 imports torchaudio at module level (audio inputs only); no torchaudio release loads
        import torchaudio  # noqa: F401  # with torch 2.13 (newest is 2.11.1): a text-only run gets a stub
    except (ImportError, OSError):
        import types

        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    from llamafactory.train.tuner import run_exp

    cutoff = int(dcfg.get("max_length", 384))
    args = {
        "stage": "sft", "do_train": True, "model_name_or_path": str(model_path), "finetuning_type": "lora",
        "lora_rank": int(th.get("rank", 16)), "lora_alpha": int(th.get("alpha", 32)),
        "lora_dropout": float(th.get("dropout", 0.05)),
        "lora_target": ",".join(th.get("targets", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])),
        "dataset": "demo", "dataset_dir": str(data_dir), "template": LLAMAFACTORY_TEMPLATE, "cutoff_len": cutoff,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "output_dir": str(out / "run"),
        "per_device_train_batch_size": mb, "gradient_accumulation_steps": accum, "max_steps": steps,
        "learning_rate": float(train.get("lr", 2e-4)), "lr_scheduler_type": "cosine",
        "warmup_steps": int(train.get("warmup_steps", 0)), "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "deepspeed": str(out / "ds_config.json"), "bf16": raw["model"].get("dtype") == "bf16",
        "gradient_checkpointing": bool(raw["model"].get("activation_checkpointing", True)),
        "flash_attn": raw["model"].get("attn_implementation", "sdpa"), "use_cpu": not torch.cuda.is_available(),
        "seed": int(train.get("seed", 42)), "disable_tqdm": True, "plot_loss": False,
        "include_num_input_tokens_seen": "non_padding",
    }
    run_exp(args=args, callbacks=[Clock()])


# ---------------------------------------------------------------------------------------------------------------

def table(results: dict[str, dict]) -> str:
    base = results.get(BASELINE, {})
    lines = ["| variant | median step | tokens/s | peak RSS per rank (training) | step vs PEFT+HF | one-off |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {LABELS.get(name, name)} | failed: {r['error']} | | | | |")
            continue
        ratio = f"{r['step_s'] / base['step_s']:.2f}" if "step_s" in base else "n/a"
        rss = " / ".join(f"{x:.1f}" for x in r["rss_train_gb"]) + " GB"
        one_off = f"HASI {r['hasi_s']:.0f} s (peak RSS " + " / ".join(f"{x:.1f}" for x in r["rss_setup_gb"]) + " GB)" \
            if r.get("hasi_s") else ""
        lines.append(f"| {LABELS.get(name, name)} | {r['step_s']:.2f} s | {r['tokens_per_s']:.0f} | {rss} | {ratio} "
                     f"| {one_off} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo_smollm2.yaml"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="steps left out of the medians")
    parser.add_argument("--variants", default="lora,thanora,peft_hf,llamafactory")
    parser.add_argument("--llamafactory-python", default=os.environ.get("LLAMAFACTORY_PYTHON", ""),
                        help="a Python with llamafactory installed (a separate venv); empty: variant skipped")
    parser.add_argument("--json", default="", help="write all figures to this JSON file")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every variant (section.key=value)")
    args = parser.parse_args()
    if args.worker:
        out = Path(args.out)
        if args.worker in THANORA_VARIANTS:
            worker_thanora(args.worker, out, args.config, args.steps, args.overrides)
        elif args.worker == "peft_hf":
            worker_peft_hf(out, args.config, args.steps, args.overrides)
        elif args.worker == "llamafactory":
            worker_llamafactory(out, args.config, args.steps, args.overrides)
        return
    variants = [v for v in args.variants.split(",") if v]
    skipped = {}
    if "llamafactory" in variants and not args.llamafactory_python:
        variants.remove("llamafactory")
        skipped["llamafactory"] = "no --llamafactory-python given"
    results: dict[str, dict] = {}
    rounds: dict[str, list[list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in variants:
                r = run_variant(name, args, Path(tmp) / f"{name}-{round_}")
                if "error" in r:
                    print(f"round {round_} {name}: FAILED ({r['error']})\n{r['log_tail']}", flush=True)
                else:
                    print(f"round {round_} {name:12s} step {r['step_s']:.2f}s  tokens/s {r['tokens_per_s']:.0f}  "
                          f"peak RSS/rank {[round(x, 2) for x in r['rss_train_gb']]} GB  HASI {r.get('hasi_s', 0):.0f}s  "
                          f"wall {r['wall_s']:.0f}s  steps {[round(s['seconds'], 1) for s in r['steps']]}", flush=True)
                best = results.get(name)
                if best is None or "error" in best or ("error" not in r and r["step_s"] < best["step_s"]):
                    results[name] = r
                if "error" not in r:
                    rounds.setdefault(name, []).append(r["steps"])
    print()
    print(table(results))
    for name, why in skipped.items():
        print(f"{name}: not run ({why})")
    if BASELINE in results and "step_s" in results[BASELINE]:
        print()
        for name, r in results.items():
            if name != BASELINE and "step_s" in r:
                print(f"step time {name} / {BASELINE}: {r['step_s'] / results[BASELINE]['step_s']:.3f}   "
                      f"tokens/s ratio: {r['tokens_per_s'] / results[BASELINE]['tokens_per_s']:.3f}")
    if "lora" in results and "thanora" in results and "step_s" in results["thanora"]:
        th, lo = results["thanora"], results["lora"]
        print(f"step time thanora / lora: {th['step_s'] / lo['step_s']:.3f}   peak RSS thanora - lora per rank: "
              f"{[round(a - b, 2) for a, b in zip(th['rss_train_gb'], lo['rss_train_gb'])]} GB")
    paired = paired_ratios(rounds, args.warmup)
    if paired:
        print()
        print("paired over the same batches (lora, thanora, peft_hf feed identical batches): per step the fastest "
              f"round, then the median over steps {args.warmup + 1}..{args.steps} of the ratio to {BASELINE}")
        for name, ratios in paired.items():
            print(f"  {name:8s} wall {ratios['wall']:.3f}   CPU seconds {ratios['cpu']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "skipped": skipped,
                                               "rounds": rounds, "paired": paired}, indent=1))


def paired_ratios(rounds: dict[str, list[list[dict]]], warmup: int) -> dict[str, dict]:
    """Step-by-step ratios to the baseline over identical batches (variants fed the same batches only)."""
    if BASELINE not in rounds:
        return {}

    def best(name: str, key: str) -> list[float]:
        n = min(len(r) for r in rounds[name])
        return [min(r[i].get(key, r[i]["seconds"]) for r in rounds[name]) for i in range(n)]

    out = {}
    for name in rounds:
        if name in (BASELINE, "llamafactory"):
            continue
        ratios = {}
        for key, label in (("seconds", "wall"), ("cpu_seconds", "cpu")):
            a, b = best(name, key), best(BASELINE, key)
            ratios[label] = statistics.median(x / y for x, y in list(zip(a, b))[warmup:])
        out[name] = ratios
    return out


if __name__ == "__main__":
    main()
