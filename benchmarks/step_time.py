#!/usr/bin/env python
"""Step time of ThanoRA against plain LoRA (same rank, same DeepSpeed config), and where the time goes.

    python benchmarks/step_time.py --config configs/demo_smollm2.yaml --nproc 2 --steps 8

Runs, in this one invocation and with identical settings otherwise:
  lora      plain LoRA: thanora.mode=random, allocation=uniform, spr_lambda=0 (== PEFT LoRA, see tests)
  thanora   the config's ThanoRA settings (HASI + SPR)
  no_spr    the same ThanoRA run with spr_lambda=0 (its step time minus this = SPR's share)
and, in-process, SPR's forward+backward on the real adapter shapes (isolated cost). Prints ratios; the median
step time excludes the first two steps (warm-up). HASI is a one-off: reported in seconds and in steps.

``--probe --variants lora,thanora,...`` instead runs each variant of PROBE_VARIANTS in one fresh process (world size
1) with the Trainer's own setup and steps, and records per step process CPU seconds (user, sys), page faults, RSS and
glibc's heap (issue 14; docs/performance.md section 3).
"""
from __future__ import annotations

import argparse
import json
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from thanora_ds.distributed import free_port

VARIANTS = {
    "lora": ["thanora.mode=random", "thanora.allocation=uniform", "thanora.spr_lambda=0"],
    "thanora": [],
    "no_spr": ["thanora.spr_lambda=0"],
}
# On a shared machine the load changes during a run: each variant runs `--rounds` times, interleaved
# (lora, thanora, no_spr, lora, ...), and the fastest round counts.
WARMUP_STEPS = 2   # left out of every median (shared with benchmarks/peers.py)


def launch_command(script_args: list[str], nproc: int, python: str | None = None) -> list[str]:
    """``python script ...`` for one process, torchrun (on a free port) for more."""
    python = python or sys.executable
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", *script_args]
    return [python, *script_args]


def steady_median(values: list[float], warmup: int = WARMUP_STEPS) -> float:
    """Median after the warm-up steps (all of them when there are no more)."""
    return statistics.median(values[warmup:] or values)


def run(config: str, nproc: int, steps: int, out: Path, extra: list[str]) -> dict:
    args = [str(REPO / "launchers" / "train.py"), "--config", config, f"train.output_dir={out}",
            f"train.max_steps={steps}", "train.save_every=0", "train.resume=never", "train.report_to=[]",
            *extra]
    t0 = time.time()
    subprocess.run(launch_command(args, nproc), check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timings = json.loads((out / "timings.json").read_text())
    seconds = [m["step_seconds"] for m in metrics]
    return {"step_s": steady_median(seconds), "step_min_s": min(seconds[WARMUP_STEPS:] or seconds),
            "hasi_s": timings.get("hasi_seconds", 0.0), "wall_s": wall,
            "tokens_per_s": steady_median([m["tokens_per_s"] for m in metrics])}


def isolated_spr_seconds(out: Path, repeats: int = 20) -> float:
    """SPR forward+backward over every adapted layer with the run's real shapes and split."""
    from thanora_ds.initializer import Allocation
    from thanora_ds.spr import spr_layer_penalty

    alloc = Allocation.load(out / "allocation.json")
    weights = (out / "final" / "adapter_weights.safetensors")
    from safetensors.torch import load_file
    tensors = load_file(str(weights))
    blocks = [(tensors[f"{n}.lora_A"].requires_grad_(), tensors[f"{n}.lora_B"].requires_grad_(), r)
              for n, r in zip(alloc.layers, alloc.ranks)]
    t0 = time.perf_counter()
    for _ in range(repeats):
        total = sum(spr_layer_penalty(a, b, r) for a, b, r in blocks) / len(blocks)
        total.backward()
    return (time.perf_counter() - t0) / repeats


# ---------------------------------------------------------------------------------------------------------------
# HASI at scale: one decomposition K = W (C + delta I) per (d_out, d_in) shape and route, time and memory.
#   python benchmarks/step_time.py --hasi-shapes 576x576,4096x4096 --hasi-routes svd64,gram32 [--device cuda]
# Each (shape, route) runs in a fresh process (peak memory = its own: ru_maxrss on CPU, max_memory_allocated on
# CUDA, minus what the inputs hold); the inputs are the same for every route (seeded), so entropies compare.

LLAMA_SHAPES = {  # (d_out, d_in) of q/k/v/o, gate/up, down
    "smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "llama-2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],     # also LLaVA-1.5-7B's language model
    "llama-2-13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
}


def hasi_inputs(d_out: int, d_in: int, device: str, seed: int = 0):
    """A weight and a task statistic with realistic structure: W with a decaying spectrum, C from 2 d_in
    anisotropic tokens (fp32, as HASI holds them)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    w = w * torch.linspace(1.0, 0.05, d_in)          # column scales: a spread of singular values
    x = torch.randn(2 * d_in, d_in, generator=g) * torch.exp(-3.0 * torch.arange(d_in) / d_in)
    cov = x.T @ x / x.shape[0]
    return w.to(device), cov.to(device)


def hasi_one(d_out: int, d_in: int, route: str, device: str, keep: int, repeats: int) -> dict:
    import resource

    from thanora_ds.hasi import normalized_spectral_entropy, task_spectrum

    w, cov = hasi_inputs(d_out, d_in, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    task_spectrum(w[:64, :64], cov[:64, :64], keep=8, decomposition=route)   # library warm-up (cuSOLVER handles)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        spec = task_spectrum(w, cov, "weighted", keep=keep, decomposition=route)
        sync()
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"d_out": d_out, "d_in": d_in, "route": route, "device": device, "seconds": min(times),
            "peak_mb": max(peak, 0) / 2**20, "entropy": normalized_spectral_entropy(spec.sigma),
            "sigma_head": spec.sigma[:keep].tolist(), "vh": spec.vh.cpu().tolist() if keep <= 8 else None}


def hasi_table(shapes: list[tuple[int, int]], routes: list[str], device: str, keep: int, repeats: int,
               threads: int) -> list[dict]:
    rows = []
    for d_out, d_in in shapes:
        for route in routes:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--hasi-one", f"{d_out}x{d_in}", "--hasi-routes", route,
                   "--device", device, "--keep", str(keep), "--repeats", str(repeats), "--threads", str(threads)]
            out = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            ref = next((r for r in rows if (r["d_out"], r["d_in"]) == (d_out, d_in) and r["route"] == routes[0]), row)
            print(f"{d_out:>6}x{d_in:<6} {route:7s} {row['seconds']:8.2f}s  peak {row['peak_mb']:8.0f} MB  "
                  f"H {row['entropy']:.6f} (dH vs {routes[0]} {row['entropy'] - ref['entropy']:+.1e})  "
                  f"speed-up {ref['seconds'] / row['seconds']:.2f}x", flush=True)
    return rows


def hasi_allocation_by_route(config: str, routes: list[str], overrides: list[str]) -> dict:
    """HASI (statistics, entropies, allocation) on the real model of ``config`` in one plain process, once per
    decomposition route: entropy differences and whether the integer ranks agree with the first route."""

    from thanora_ds.data import build_multitask_data, preview_batches
    from thanora_ds.hasi import common_prefix_length
    from thanora_ds.initializer import run_hasi
    from thanora_ds.inject import inject_thanora
    from thanora_ds.modeling import load_model, load_processor
    from thanora_ds.train_config import load_train_config

    cfg = load_train_config(config, overrides)
    tokenizer, processor = load_processor(cfg.model)
    data = build_multitask_data(cfg.data, tokenizer=tokenizer, processor=processor)
    model = load_model(cfg.model, None)
    adapters = inject_thanora(model, cfg.thanora, len(data.tasks))
    prefix = common_prefix_length([ex["input_ids"] for t in data.tasks for ex in data.preview[t]])
    out = {}
    for route in routes:
        cfg.thanora.hasi_decomposition = route
        t0 = time.perf_counter()
        alloc = run_hasi(model, adapters, cfg.thanora, data.tasks,
                         lambda t: preview_batches(data, data.tasks[t], cfg.train.preview_batch_size), prefix)
        out[route] = {"seconds": time.perf_counter() - t0, "entropy": alloc.entropy, "ranks": alloc.ranks}
        ref = out[routes[0]]
        dh = max(abs(a - b) for ra, rb in zip(alloc.entropy, ref["entropy"]) for a, b in zip(ra, rb))
        same = sum(a == b for a, b in zip(alloc.ranks, ref["ranks"]))
        print(f"{route:7s} HASI {out[route]['seconds']:6.1f}s  max |dH| vs {routes[0]} {dh:.2e}  "
              f"layers with identical ranks {same}/{len(alloc.ranks)}", flush=True)
        out[route].update(max_abs_dh=dh, layers_same_ranks=same, layers=len(alloc.ranks))
    return out


# ---------------------------------------------------------------------------------------------------------------
# In-process probe (issue 14, step gap): one variant per fresh process, the Trainer's own setup and train_step,
# per step process CPU seconds (user, system), minor page faults, RSS, live tensor bytes and subnormal values in the
# trainable parameters and their optimizer states; optionally a torch profile of some steps.
#   python benchmarks/step_time.py --probe --steps 6 --rounds 2 --variants lora,thanora,stats_only
# Variants are interleaved per round (same batches: the sampler depends on train.seed only); the ratios printed are
# paired per step (median over the steps after the warm-up) against the first variant.

PROBE_VARIANTS = {
    **VARIANTS,
    "stats_only": ["thanora.mode=random", "thanora.allocation=scaled_softmax"],     # HASI statistics, no A written
    # plain LoRA whose (unchanged) A and B are written once through HASI's ZeRO-safe write path (write_param)
    "lora_written": VARIANTS["lora"],
    # plain LoRA after one malloc/free of HASI's largest statistic (T x 1536 x 1536 fp32 = 28.3 MB on SmolLM2):
    # raises glibc's dynamic mmap threshold as HASI does, nothing else
    "lora_mmap28": VARIANTS["lora"],
    # ThanoRA with HASI outside host_memory.hasi_heap_scope (as before the issue-14 heap fix)
    "thanora_noscope": VARIANTS["thanora"],
    # the statistics-only init with HASI on the caller's thread (as before host_memory.in_own_arena)
    "stats_noarena": ["thanora.mode=random", "thanora.allocation=scaled_softmax"],
    # plain LoRA that enters and leaves hasi_heap_scope and runs release_after_hasi, with no HASI work in between:
    # the allocator settings and the trim HASI leaves, nothing else
    "lora_scope": VARIANTS["lora"],
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _live_tensor_bytes() -> int:
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                key = storage.data_ptr()
                if key and key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
        except Exception:   # noqa: BLE001 - exotic objects in gc
            pass
    return total


def _subnormals(tensors) -> tuple[int, int]:
    tiny = torch.finfo(torch.float32).tiny
    sub = total = 0
    for t in tensors:
        t = t.detach().float()
        sub += int(((t != 0) & (t.abs() < tiny)).sum())
        total += t.numel()
    return sub, total


def _trainer_state_tensors(trainer) -> dict[str, list[torch.Tensor]]:
    """This rank's fp32 master partitions, their Adam states and the module's (partitioned) adapter values."""
    opt = trainer.engine.optimizer
    flat = list(getattr(opt, "fp32_partitioned_groups_flat", []))
    states = [v for st in opt.optimizer.state.values() for v in st.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0]
    from thanora_ds import distributed as D
    params = [D.local_values(p) for p in trainer.trainable]
    return {"fp32_master": flat, "adam_states": states, "module_params": params}


def _wait_for_parties(barrier: Path, variant: str, parties: int, timeout: float = 3600.0) -> None:
    """--parallel: every variant of a round finishes its setup (HASI or not) before any of them steps."""
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / f"ready-{variant}").touch()
    deadline = time.time() + timeout
    while len(list(barrier.glob("ready-*"))) < parties:
        if time.time() > deadline:
            raise TimeoutError(f"{barrier}: the other variants of this round did not finish their setup")
        time.sleep(0.5)


def probe_child(variant: str, config: str, steps: int, out: Path, overrides: list[str], profile_steps: list[int],
                flush_denormal: bool, barrier: Path | None = None, parties: int = 1) -> dict:
    import os
    import resource

    from thanora_ds import distributed as D
    from thanora_ds.train_config import load_train_config
    from thanora_ds.trainer import Trainer

    if flush_denormal:
        torch.set_flush_denormal(True)
    if variant == "stats_noarena":
        import thanora_ds.initializer as I
        I.in_own_arena = lambda fn, *a, **k: fn(*a, **k)
    if variant == "thanora_noscope":
        import contextlib

        import thanora_ds.initializer as I
        I.hasi_heap_scope = lambda *a, **k: contextlib.nullcontext(False)
    cfg = load_train_config(config, [f"train.output_dir={out}", f"train.max_steps={steps}", "train.save_every=0",
                                     "train.resume=never", "train.report_to=[]", *overrides,
                                     *PROBE_VARIANTS[variant]])
    trainer = Trainer(cfg)
    t0 = time.process_time()
    trainer.setup()
    setup_cpu = time.process_time() - t0
    if variant == "lora_written":
        for adapter in trainer.adapters.values():
            for param in (adapter.lora_A, adapter.lora_B):
                D.write_param(param, D.full_tensor(param), src=0)
    if variant == "lora_scope":
        from thanora_ds.host_memory import hasi_heap_scope
        from thanora_ds.initializer import release_after_hasi
        with hasi_heap_scope():
            pass
        release_after_hasi(trainer.engine)
    if variant == "lora_mmap28":
        block = torch.empty(3 * 1536 * 1536, dtype=torch.float32)
        del block
        from thanora_ds.host_memory import trim_host_memory
        trim_host_memory()
    from thanora_ds.host_memory import heap_info, mmap_threshold
    record = {"variant": variant, "setup_cpu_s": setup_cpu, "hasi_s": trainer.hasi_seconds,
              "mmap_threshold_after_setup": mmap_threshold(), "heap_after_setup": heap_info(),
              "rss_after_setup": _rss_bytes(), "live_after_setup": _live_tensor_bytes(), "steps": []}
    record["subnormal_after_setup"] = {k: _subnormals(v) for k, v in _trainer_state_tensors(trainer).items()}
    trainer.engine.train()
    if cfg.train.eval_every and len(trainer.tasks) > 1 and trainer.adapters:
        trainer.mechanism_summary()     # as Trainer.fit does before its first step
    if barrier is not None:
        _wait_for_parties(barrier, variant, parties)
    perf_ctl = os.environ.get("THANORA_PERF_CTL")       # --perf: the sampled profile covers the steps only
    if perf_ctl:
        with open(perf_ctl, "w") as ctl:
            ctl.write("enable\n")
    for step in range(1, steps + 1):
        prof = None
        if step in profile_steps:
            from torch.profiler import ProfilerActivity, profile
            prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            prof.__enter__()
        r0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        metrics = trainer.train_step()
        r1, c1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        if prof is not None:
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            (out.parent / f"profile-{variant}-step{step}.txt").write_text(table)
        record["steps"].append({"step": step, "cpu_s": c1 - c0, "wall_s": w1 - w0, "user_s": r1.ru_utime - r0.ru_utime,
                                "sys_s": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt,
                                "rss": _rss_bytes(), "loss": metrics["loss"],
                                "tokens": round(metrics["tokens_per_s"] * metrics["step_seconds"]),
                                "heap": heap_info()})
    if perf_ctl:
        with open(perf_ctl, "w") as ctl:
            ctl.write("disable\n")
    record["mmap_threshold_end"] = mmap_threshold()
    record["live_end"] = _live_tensor_bytes()
    record["subnormal_end"] = {k: _subnormals(v) for k, v in _trainer_state_tensors(trainer).items()}
    record["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.close()
    D.shutdown()
    return record


def probe(config: str, steps: int, rounds: int, variants: list[str], overrides: list[str], profile_steps: str,
          flush_denormal: bool, json_path: str, parallel: bool = False, perf: bool = False) -> dict:
    """``parallel``: the variants of a round run at the same time, each pinned to its own core (the cores rotate
    between rounds) and held after setup until all are set up, so that their steps share the same machine load:
    a pairing in time where a shared machine's load changes faster than a run lasts."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    cores = sorted(os.sched_getaffinity(0))
    if parallel and len(variants) > len(cores):
        raise SystemExit(f"--parallel: {len(variants)} variants need as many cores, this process may use {len(cores)}")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            out = Path(json_path).with_suffix("") if json_path else Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            barrier = out / f"barrier-{round_}"
            shutil.rmtree(barrier, ignore_errors=True)   # an earlier invocation's ready files must not count

            def command(i: int, variant: str) -> list[str]:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-one", variant, "--config", config,
                       "--steps", str(steps), "--out", str(out / f"{variant}-{round_}"),
                       "--profile-steps", profile_steps, *(["--flush-denormal"] if flush_denormal else []),
                       *([f"--barrier={barrier}", f"--parties={len(variants)}"] if parallel else []), *overrides]
                if perf:   # whole process, kernel included (page faults, allocator), steps only (THANORA_PERF_CTL)
                    ctl = out / f"{variant}-{round_}.perfctl"
                    if not ctl.exists():
                        os.mkfifo(ctl)
                    cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-g", "--delay=-1",
                           f"--control=fifo:{ctl}", "-o", str(out / f"{variant}-{round_}.perf.data"), *cmd]
                return ["taskset", "-c", str(cores[(i + round_) % len(cores)]), *cmd] if parallel else cmd

            # files, not pipes: a child blocked on a full pipe while another is waited for would stall both
            logs = {v: (out / f"{v}-{round_}.stdout", out / f"{v}-{round_}.stderr") for v in variants}
            launched = {}
            envs = {v: dict(env, **({"THANORA_PERF_CTL": str(out / f"{v}-{round_}.perfctl")} if perf else {}))
                    for v in variants}
            for i, v in enumerate(variants if parallel else []):
                with open(logs[v][0], "w") as o, open(logs[v][1], "w") as e:
                    launched[v] = subprocess.Popen(command(i, v), cwd=REPO, env=envs[v], stdout=o, stderr=e,
                                                   text=True)
            for i, variant in enumerate(variants):
                if parallel:
                    returncode = launched[variant].wait()
                    stdout, stderr = (f.read_text(errors="replace") for f in logs[variant])
                else:
                    proc = subprocess.run(command(i, variant), cwd=REPO, env=envs[variant], capture_output=True,
                                          text=True)
                    stdout, stderr, returncode = proc.stdout, proc.stderr, proc.returncode
                if returncode != 0:
                    raise RuntimeError(f"{variant} failed:\n{stderr[-4000:]}")
                rec = json.loads(stdout.split("PROBE ", 1)[1])
                rec["round"] = round_
                runs[variant].append(rec)
                cpu = [s["cpu_s"] for s in rec["steps"]]
                print(f"round {round_} {variant:12s} setup cpu {rec['setup_cpu_s']:.0f}s  cpu/step "
                      + " ".join(f"{c:.2f}" for c in cpu) + "  sys/step "
                      + " ".join(f"{s['sys_s']:.2f}" for s in rec["steps"])
                      + f"  minflt/step {statistics.median([s['minflt'] for s in rec['steps']]):.0f}"
                      + f"  RSS setup/end {rec['rss_after_setup'] / 1e9:.2f}/{rec['steps'][-1]['rss'] / 1e9:.2f} GB"
                      + f"  live end {rec['live_end'] / 1e9:.2f} GB  mmap threshold setup/end "
                      + f"{(rec['mmap_threshold_after_setup'] or 0) / 2**20:.1f}/{(rec['mmap_threshold_end'] or 0) / 2**20:.1f} MiB"
                      + f"  heap arena/free end {rec['steps'][-1]['heap']['arena'] / 1e9:.2f}/"
                      + f"{rec['steps'][-1]['heap']['fordblks'] / 1e9:.2f} GB  subnormal {rec['subnormal_end']}",
                      flush=True)
                if json_path:
                    Path(json_path).write_text(json.dumps(runs, indent=1))
    ref = variants[0]
    # per step the cheaper round of each variant (same batches), then the median of the paired ratios
    def best(v):
        return [min(r["steps"][i]["cpu_s"] for r in runs[v]) for i in range(steps)]

    def measured_cpu(rec: dict) -> float:
        return sum(s["cpu_s"] for s in rec["steps"][WARMUP_STEPS:])

    base = best(ref)
    for v in variants[1:]:
        ratios = [a / b for a, b in zip(best(v)[WARMUP_STEPS:], base[WARMUP_STEPS:])]
        per_round = [measured_cpu(a) / measured_cpu(b) for a, b in zip(runs[v], runs[ref])]
        print(f"CPU s per step {v} / {ref}: median {statistics.median(ratios):.3f}  per step "
              + " ".join(f"{x:.3f}" for x in ratios) + f"  |  per round (sum of steps {WARMUP_STEPS + 1}-{steps}, "
              + "paired by round) " + " ".join(f"{x:.3f}" for x in per_round)
              + f"  median {statistics.median(per_round):.3f}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo_smollm2.yaml"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--hasi-shapes", default="", help="d_outxd_in,... or a model name of LLAMA_SHAPES: "
                        "measure HASI's decomposition per shape instead of step time")
    parser.add_argument("--hasi-routes", default="svd64,gram32", help="hasi.DECOMPOSITIONS, the first is the reference")
    parser.add_argument("--hasi-one", default="", help=argparse.SUPPRESS)
    parser.add_argument("--hasi-allocation", action="store_true",
                        help="run HASI on --config's real model once per --hasi-routes route and compare entropies/ranks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", type=int, default=24, help="right vectors kept (2 (r - r_c); r=16, 3 tasks: 24)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="", help="write the HASI rows to this JSON file")
    parser.add_argument("--probe", action="store_true", help="in-process per-step CPU time / RSS probe (one process)")
    parser.add_argument("--probe-one", default="", help=argparse.SUPPRESS)
    parser.add_argument("--variants", default="lora,thanora", help="--probe: variants of PROBE_VARIANTS, first = reference")
    parser.add_argument("--profile-steps", default="", help="--probe: steps to run under the torch profiler, e.g. 4")
    parser.add_argument("--flush-denormal", action="store_true", help="--probe: torch.set_flush_denormal(True)")
    parser.add_argument("--parallel", action="store_true",
                        help="--probe: the variants of a round run at once, one core each (pairing in time)")
    parser.add_argument("--perf", action="store_true",
                        help="--probe: each variant under `perf record -e cpu-clock -g`, the steps only (<out>/*.perf.data)")
    parser.add_argument("--barrier", default="", help=argparse.SUPPRESS)
    parser.add_argument("--parties", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every variant, e.g. data.preview_samples=16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.hasi_one:
        d_out, d_in = (int(x) for x in args.hasi_one.split("x"))
        print(json.dumps(hasi_one(d_out, d_in, args.hasi_routes, args.device, args.keep, args.repeats)))
        return
    if args.probe_one:
        steps_p = [int(x) for x in args.profile_steps.split(",") if x]
        rec = probe_child(args.probe_one, args.config, args.steps, Path(args.out), args.overrides, steps_p,
                          args.flush_denormal, Path(args.barrier) if args.barrier else None, args.parties)
        print("PROBE " + json.dumps(rec), flush=True)
        return
    if args.probe:
        probe(args.config, args.steps, args.rounds, args.variants.split(","), args.overrides, args.profile_steps,
              args.flush_denormal, args.json, args.parallel, args.perf)
        return
    if args.hasi_allocation:
        rows = hasi_allocation_by_route(args.config, args.hasi_routes.split(","), args.overrides)
        if args.json:
            Path(args.json).write_text(json.dumps(rows))
        return
    if args.hasi_shapes:
        shapes = []
        for item in args.hasi_shapes.split(","):
            shapes += LLAMA_SHAPES[item] if item in LLAMA_SHAPES else [tuple(int(x) for x in item.split("x"))]
        rows = hasi_table(shapes, args.hasi_routes.split(","), args.device, args.keep, args.repeats, args.threads)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, extra in VARIANTS.items():
                r = run(args.config, args.nproc, args.steps, Path(tmp) / f"{name}-{round_}", args.overrides + extra)
                print(f"round {round_} {name:8s} step median {r['step_s']:.3f}s min {r['step_min_s']:.3f}s  "
                      f"HASI {r['hasi_s']:.1f}s  tokens/s {r['tokens_per_s']:.0f}  wall {r['wall_s']:.0f}s", flush=True)
                if name not in results or r["step_s"] < results[name]["step_s"]:
                    results[name] = r
        spr_iso = isolated_spr_seconds(Path(tmp) / "thanora-0")
    lora, th, no_spr = results["lora"], results["thanora"], results["no_spr"]
    print()
    print(f"step time ThanoRA / plain LoRA           : {th['step_s'] / lora['step_s']:.3f}")
    print(f"SPR share of the ThanoRA step (end-to-end): {(th['step_s'] - no_spr['step_s']) / th['step_s']:+.3f}")
    print(f"SPR share of the ThanoRA step (isolated)  : {spr_iso / th['step_s']:.4f}  ({spr_iso * 1e3:.2f} ms, 1 process)")
    print(f"HASI (one-off)                            : {th['hasi_s']:.1f}s = {th['hasi_s'] / th['step_s']:.1f} steps; "
          f"{th['hasi_s'] / (th['hasi_s'] + args.steps * th['step_s']):.3f} of this {args.steps}-step run")


if __name__ == "__main__":
    main()
