#!/usr/bin/env python
"""Step time of ThanoRA against plain LoRA (same rank, same DeepSpeed config), and where the time goes.

    python benchmarks/step_time.py --config configs/demo_smollm2.yaml --nproc 2 --steps 8

Runs, in this one invocation and with identical settings otherwise:
  lora      plain LoRA: thanora.mode=random, allocation=uniform, spr_lambda=0 (== PEFT LoRA, see tests)
  thanora   the config's ThanoRA settings (HASI + SPR)
  no_spr    the same ThanoRA run with spr_lambda=0 (its step time minus this = SPR's share)
and, in-process, SPR's forward+backward on the real adapter shapes (isolated cost). Prints ratios; the median
step time excludes the first two steps (warm-up). HASI is a one-off: reported in seconds and in steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
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
            f"train.max_steps={steps}", "train.save_every=0", "train.resume=never", "train.tensorboard=false",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo_smollm2.yaml"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides for every variant, e.g. data.preview_samples=16")
    args = parser.parse_args()
    torch.set_num_threads(1)
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
