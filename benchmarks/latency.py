#!/usr/bin/env python
"""Inference latency of the merged model against the base model and the unmerged adapted model, in one run.

    python benchmarks/latency.py --checkpoint OUTPUT_DIR [--tag TAG]     (a training run: merged with stream_merge)
    python benchmarks/latency.py --model BASE_DIR --synthetic [--rank 16] (no run needed: random adapters)

Loads the three models into this one process: ``base`` (from_pretrained of the base folder), ``adapted`` (base +
ThanoRA adapters, unmerged, as evaluated from a live checkpoint) and ``merged`` (checkpoint mode: the folder
launchers/merge.py's code writes, loaded with from_pretrained; synthetic mode: ``merge.merge_into_base`` of the
adapted model, in memory). Then, in interleaved rounds (so load from other processes hits all three alike),
times (best of --rounds, and median) a no-grad forward of a [batch, seq] input and a greedy generation of exactly --new-tokens tokens, and
prints medians and the ratios merged/base (expected ~1.0: the merged model IS the base architecture),
adapted/base and merged/adapted. Text models only (a LLaVA model's language part behaves the same).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load_models(args):
    from transformers import AutoModelForCausalLM

    from thanora_ds.config import ThanoraConfig
    from thanora_ds.export import build_adapted_model, find_checkpoint, load_checkpoint, stream_merge
    from thanora_ds.inject import inject_thanora
    from thanora_ds.merge import merge_into_base

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()

    if args.checkpoint:
        ckpt = load_checkpoint(find_checkpoint(args.checkpoint, args.tag))
        base_path = args.model or ckpt.base_path
        adapted = build_adapted_model(ckpt, base_path)
        tmp = tempfile.TemporaryDirectory(prefix="latency-merged-")
        stream_merge(ckpt, base_path, tmp.name, progress=False)
        merged = load(tmp.name)
        tmp.cleanup()
        what = f"checkpoint {ckpt.path}, rank {ckpt.thanora.rank}, {len(ckpt.lora)} adapted layers"
    else:
        base_path = args.model
        adapted = load(base_path)
        cfg = ThanoraConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.0, spr_lambda=0.0)
        adapters = inject_thanora(adapted, cfg, 2)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for a in adapters.values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 1e-3)
        adapted.eval()
        merged = merge_into_base(copy.deepcopy(adapted)).eval()
        what = f"synthetic adapters, rank {args.rank}, {len(adapters)} adapted layers"
    return {"base": load(base_path), "adapted": adapted, "merged": merged}, base_path, what


@torch.no_grad()
def time_forward(model, ids) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


@torch.no_grad()
def time_generate(model, ids, new_tokens: int) -> float:
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=0, eos_token_id=None, use_cache=True)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    seconds = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="training output_dir (or checkpoint folder)")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--model", help="base model folder (synthetic mode; default with --checkpoint: the run's)")
    parser.add_argument("--synthetic", action="store_true", help="random adapters on --model, no training run")
    parser.add_argument("--rank", type=int, default=16, help="synthetic adapter rank (all 7 projections)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="forward input length")
    parser.add_argument("--prompt", type=int, default=32, help="generation prompt length")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--gen-batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if bool(args.checkpoint) == bool(args.synthetic):
        parser.error("give --checkpoint OUTPUT_DIR, or --model BASE_DIR --synthetic")
    if args.synthetic and not args.model:
        parser.error("--synthetic needs --model BASE_DIR")
    if args.threads:
        torch.set_num_threads(args.threads)
    models, base_path, what = load_models(args)
    vocab = models["base"].config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    fwd_ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g)
    gen_ids = torch.randint(3, vocab, (args.gen_batch, args.prompt), generator=g)
    names = list(models)
    for name in names:   # warm-up
        time_forward(models[name], fwd_ids[:, :16])
        time_generate(models[name], gen_ids, 2)
    times = {n: {"forward": [], "generate": []} for n in names}
    for r in range(args.rounds):
        order = names[r % 3:] + names[:r % 3]   # rotate who goes first
        for name in order:
            times[name]["forward"].append(time_forward(models[name], fwd_ids))
            times[name]["generate"].append(time_generate(models[name], gen_ids, args.new_tokens))
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    best = {n: {k: min(v) for k, v in t.items()} for n, t in times.items()}
    print(f"\nbase {base_path}; {what}; torch threads {torch.get_num_threads()}; {args.rounds} rounds")
    print(f"forward: batch {args.batch} x {args.seq} tokens; generate: batch {args.gen_batch}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens (greedy, KV cache)\n")
    print("| model | forward ms (min / median) | generate ms (min / median) | generate tokens/s (best) |")
    print("|---|---:|---:|---:|")
    for n in names:
        tps = args.gen_batch * args.new_tokens / best[n]["generate"]
        print(f"| {n} | {1e3 * best[n]['forward']:.1f} / {1e3 * med[n]['forward']:.1f} | "
              f"{1e3 * best[n]['generate']:.1f} / {1e3 * med[n]['generate']:.1f} | {tps:.1f} |")
    print("\nratios (min-based, the robust figure on a shared machine; median-based in brackets):")
    for a, b in (("merged", "base"), ("adapted", "base"), ("merged", "adapted")):
        print(f"{a}/{b}: forward {best[a]['forward'] / best[b]['forward']:.3f} "
              f"({med[a]['forward'] / med[b]['forward']:.3f}), generate "
              f"{best[a]['generate'] / best[b]['generate']:.3f} ({med[a]['generate'] / med[b]['generate']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
