#!/usr/bin/env python
"""Does ``thanora.gamma_rule: match_lora`` give ThanoRA's blocks plain LoRA's initial input scale on a real model?

    python benchmarks/gamma_check.py [--model models/smollm2-135m-instruct] [--out benchmarks/results/study/gamma_check.json]

On SmolLM2-135M-Instruct and the method study's mixture (benchmarks/study.py, seed 0) it runs HASI with
``gamma_rule: match_lora`` and then measures, on each task's own preview tokens and through the model's own
forward, E ||A_t x||^2 / r_t (the mean squared output of one row of task t's block) for
  matched   the written blocks (match_lora)
  unit      the same rows normalized to unit length (gamma_rule constant, gamma 1: METHOD.md's literal init)
  lora      Kaiming-uniform(a=sqrt(5)) rows, as plain LoRA draws them (inject.py), on the same inputs
and prints, per module type and overall, the ratios matched / lora and unit / lora (1 = plain LoRA's scale).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> int:
    import torch

    from study import TASKS, data_section
    from thanora_ds.config import ThanoraConfig
    from thanora_ds.data import DataConfig, build_multitask_data, preview_batches
    from thanora_ds.hasi import common_prefix_length
    from thanora_ds.initializer import run_hasi
    from thanora_ds.inject import inject_thanora
    from thanora_ds.modeling import load_processor
    from thanora_ds.train_config import ModelConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "study" / "gamma_check.json"))
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    tokenizer, _ = load_processor(ModelConfig(path=args.model))
    tasks = list(TASKS)
    data = build_multitask_data(DataConfig.from_dict(data_section(0, tasks)), tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    cfg = ThanoraConfig(rank=16, alpha=32.0, dropout=0.0, gamma_rule="match_lora")
    adapters = inject_thanora(model, cfg, len(tasks))
    prefix = common_prefix_length([ex["input_ids"] for t in data.tasks for ex in data.preview[t]])
    run_hasi(model, adapters, cfg, data.tasks, lambda t: preview_batches(data, data.tasks[t], 16), prefix)

    generator = torch.Generator().manual_seed(0)
    rows = {}   # layer -> (matched rows per task, unit rows per task, Kaiming rows)
    for name, a in adapters.items():
        blocks = torch.split(a.lora_A.detach().double()[:sum(a.task_sizes)], a.task_sizes)
        kaiming = torch.empty(256, a.in_features, dtype=torch.float64)
        torch.nn.init.kaiming_uniform_(kaiming, a=math.sqrt(5), generator=generator)
        rows[name] = (blocks, [b / b.norm(dim=1, keepdim=True) for b in blocks], kaiming)
    sums = {name: [[0.0, 0.0, 0.0, 0] for _ in tasks] for name in adapters}
    seen = {}
    hooks = [a.register_forward_pre_hook(lambda m, a_, n=n: seen.__setitem__(n, a_[0])) for n, a in adapters.items()]
    with torch.no_grad():
        for t, task in enumerate(data.tasks):
            for batch in preview_batches(data, task, 16):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                mask = batch["attention_mask"].bool()
                mask &= torch.arange(mask.shape[1])[None] >= torch.maximum(
                    torch.full_like(batch["content_start"], prefix), batch["content_start"])[:, None]
                for name in adapters:
                    x = seen[name][mask].double()
                    matched, unit, kaiming = rows[name]
                    acc = sums[name][t]
                    acc[0] += float((x @ matched[t].T).pow(2).mean(1).sum()) if matched[t].numel() else 0.0
                    acc[1] += float((x @ unit[t].T).pow(2).mean(1).sum()) if unit[t].numel() else 0.0
                    acc[2] += float((x @ kaiming.T).pow(2).mean(1).sum())
                    acc[3] += x.shape[0]
    for h in hooks:
        h.remove()
    ratios = {"matched": {}, "unit": {}}
    for name in adapters:
        kind = name.split(".")[-1]
        for acc in sums[name]:
            if acc[3] and acc[0] > 0:
                ratios["matched"].setdefault(kind, []).append(acc[0] / acc[2])
                ratios["unit"].setdefault(kind, []).append(acc[1] / acc[2])
    summary = {rule: {kind: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
                      for kind, v in by_kind.items()} for rule, by_kind in ratios.items()}
    for rule in summary:
        every = [x for v in ratios[rule].values() for x in v]
        summary[rule]["all"] = {"median": statistics.median(every), "min": min(every), "max": max(every), "n": len(every)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "tasks": data.tasks, "prefix": prefix,
                                          "ratios_vs_kaiming_lora": summary}, indent=1))
    print("E||a x||^2 per row, ratio to plain LoRA's Kaiming rows on the same tokens (median [min, max]):")
    for rule in summary:
        print(f"  {rule:8s} " + "  ".join(f"{kind} {s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"
                                          for kind, s in summary[rule].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
