"""The method study's report (benchmarks/study.py): tables with paired 95 % intervals, mechanism plots, and the
system-turn allocation comparison. Rebuilt from the finished job files after every job."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from study import EVAL_RECORDS, LAMBDAS, LRS, METHODS, SEEDS, SWEPT, VARIANTS, SETTINGS, TASKS, best_lr, job_name, mean_loss, mean_score

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % t interval, n); half-width nan for n < 2."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan"), n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, T_975.get(n - 1, 1.96) * sd / math.sqrt(n), n


def fmt(ci: tuple[float, float, int], digits: int = 3, sign: bool = False) -> str:
    m, h, n = ci
    body = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return body + (f" ± {h:.{digits}f}" if not math.isnan(h) else "") + (f" (n={n})" if sign else "")


def per_task_run(runs: dict, lr: float, seed: int) -> dict | None:
    """One LoRA per task, combined into one result (each evaluated on its own task)."""
    parts = [runs.get(job_name({"method": "lora", "lr": lr, "seed": seed, "task": t})) for t in TASKS]
    if not all(parts):
        return None
    return {"tasks": {t: p["tasks"][t] for t, p in zip(TASKS, parts)}, "seconds": sum(p["seconds"] for p in parts)}


def method_runs(runs: dict) -> dict[str, dict[int, dict]]:
    """{row: {seed: result}} at each method's selected learning rate."""
    rows = {}
    for m in METHODS:
        lr = best_lr(m, runs)
        if lr is not None:
            rows[m] = {s: r for s in SEEDS if (r := runs.get(job_name({"method": m, "lr": lr, "seed": s})))}
    lr = best_lr("thanora", runs)
    for v in VARIANTS if lr is not None else []:
        rows[v] = {s: r for s in SEEDS if (r := runs.get(job_name({"method": v, "lr": lr, "seed": s})))}
    lr = best_lr("lora", runs)
    if lr is not None:
        rows["per_task_lora"] = {s: r for s in SEEDS if (r := per_task_run(runs, lr, s))}
    return {k: v for k, v in rows.items() if v}


def write_report(results: Path, runs: dict) -> None:
    if not runs:
        return
    lines = ["# Method study: best-tuned plain LoRA vs best-tuned ThanoRA (benchmarks/study.py)", "",
             f"Rebuilt {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {len(runs)} finished jobs; commits "
             f"{', '.join(sorted({r['commit'] for r in runs.values()}))}.",
             f"SmolLM2-135M-Instruct fp32, 1 process (1 CPU thread), rank {SETTINGS['rank']}, alpha "
             f"{SETTINGS['alpha']:g}, all 7 projections, micro batch {SETTINGS['micro_batch_size']}, one epoch "
             f"(50 steps), cosine, {SETTINGS['preview_samples']} previews and {EVAL_RECORDS} eval examples "
             "per task (greedy generation, each task's scorer; eval loss = mean cross-entropy of the reference answer).",
             ""]
    # 1. the sweep
    lines += ["## 1. Learning-rate sweep (seed 0); selection rule: lowest mean eval loss", "",
              "| method | lr | mean eval loss | mean score | " + " | ".join(f"{t} score/loss" for t in TASKS)
              + " | job s |", "|---|---:|---:|---:|" + "---:|" * (len(TASKS) + 1)]
    for m in METHODS:
        chosen = best_lr(m, runs)
        for lr in sorted(LRS[m]):
            r = runs.get(job_name({"method": m, "lr": lr, "seed": 0}))
            if r is None:
                lines.append(f"| {m} | {lr:g} | (to run) |||" + "|" * len(TASKS))
                continue
            mark = " **(best)**" if lr == chosen else ""
            lines.append(f"| {m} | {lr:g}{mark} | {mean_loss(r):.4f} | {mean_score(r):.3f} | "
                         + " | ".join(f"{r['tasks'][t]['score']:.2f} / {r['tasks'][t]['loss']:.3f}" for t in TASKS)
                         + f" | {r['seconds']:.0f} |")
    # 2a. the common first rate, every seed
    common = {m: {s: r for s in SEEDS if (r := runs.get(job_name({"method": m, "lr": LRS[m][0], "seed": s})))}
              for m in SWEPT}
    if all(common.values()):
        lines += ["", f"## 2a. Both at lr {LRS['lora'][0]:g}, every seed finished so far (paired per seed)", "",
                  "| method | seeds | " + " | ".join(f"{t} score / loss" for t in TASKS) + " | mean score | mean loss |",
                  "|---|---|" + "---:|" * (len(TASKS) + 2)]
        for m, by_seed in common.items():
            lines.append(f"| {m} | {', '.join(map(str, by_seed))} | " + " | ".join(
                fmt(interval([r["tasks"][t]["score"] for r in by_seed.values()]), 2) + " / "
                + fmt(interval([r["tasks"][t]["loss"] for r in by_seed.values()]), 3) for t in TASKS)
                + f" | {fmt(interval([mean_score(r) for r in by_seed.values()]))}"
                f" | {fmt(interval([mean_loss(r) for r in by_seed.values()]), 4)} |")
        paired = [s for s in common["thanora"] if s in common["lora"]]
        if paired:
            ds = interval([mean_score(common["thanora"][s]) - mean_score(common["lora"][s]) for s in paired])
            dl = interval([mean_loss(common["thanora"][s]) - mean_loss(common["lora"][s]) for s in paired])
            per = ", ".join(f"seed {s}: {mean_loss(common['thanora'][s]) - mean_loss(common['lora'][s]):+.4f}"
                            for s in paired)
            lines += ["", f"ThanoRA − LoRA, paired: mean score {fmt(ds, 3, True)}, mean eval loss {fmt(dl, 4, True)} "
                      f"({per})."]
    # 2. best against best
    rows = method_runs(runs)
    lines += ["", "## 2. Each method at its selected learning rate, over seeds (mean ± 95 % t interval)", "",
              "| method | lr | " + " | ".join(f"{t} score" for t in TASKS) + " | mean score | mean eval loss | "
              "Δ score vs LoRA (paired) | Δ loss vs LoRA (paired) | wall s per seed |",
              "|---|---:|" + "---:|" * (len(TASKS) + 5)]
    base = rows.get("lora", {})
    for name, by_seed in rows.items():
        lr = best_lr({"per_task_lora": "lora", **{v: "thanora" for v in VARIANTS}}.get(name, name), runs)
        cells = [fmt(interval([r["tasks"][t]["score"] for r in by_seed.values()]), 2) for t in TASKS]
        common = [s for s in by_seed if s in base]
        d_score = interval([mean_score(by_seed[s]) - mean_score(base[s]) for s in common]) if common and name != "lora" else None
        d_loss = interval([mean_loss(by_seed[s]) - mean_loss(base[s]) for s in common]) if common and name != "lora" else None
        lines.append(f"| {name} | {lr:g} | " + " | ".join(cells)
                     + f" | {fmt(interval([mean_score(r) for r in by_seed.values()]))}"
                     + f" | {fmt(interval([mean_loss(r) for r in by_seed.values()]), 4)}"
                     + f" | {fmt(d_score, 3, True) if d_score else '-'} | {fmt(d_loss, 4, True) if d_loss else '-'}"
                     + f" | {sum(r['seconds'] for r in by_seed.values()) / len(by_seed):.0f} |")
    lines += ["", "Per-task eval loss at the selected learning rates:", "",
              "| method | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
    for name, by_seed in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(interval([r["tasks"][t]["loss"] for r in by_seed.values()]), 4)
                                               for t in TASKS) + " |")
    # 3. lambda and mechanism
    lam_rows = lambda_runs(runs)
    if lam_rows:
        lines += ["", "## 3. SPR strength (ThanoRA at its selected lr, seed 0) and the mechanism at the end", "",
                  "| lambda | mean eval loss | mean score | final SPR | eff. rank of s·B·A | update overlap | "
                  "row overlap (A) | col overlap (B) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for lam, r in lam_rows:
            end = r.get("mechanism_final") or (r["curve"][-1] if r["curve"] else {})
            lines.append(f"| {lam:g} | {mean_loss(r):.4f} | {mean_score(r):.3f} | {r['train']['spr'][-1]:.4g} | "
                         f"{end.get('mech/effective_rank', float('nan')):.2f} | {end.get('mech/update_overlap', 0):.4f} | "
                         f"{end.get('mech/row_overlap', 0):.4f} | {end.get('mech/col_overlap', 0):.4f} |")
        plot_mechanism(results, lam_rows, runs)
        lines += ["", "Plots: `mechanism_effective_rank.png`, `mechanism_overlap.png` (over training, per lambda; "
                  "plain LoRA's split into the same index blocks for reference)."]
    alloc = results / "allocation_system_turn.md"
    if alloc.is_file():
        lines += ["", alloc.read_text()]
    (results / "report.md").write_text("\n".join(lines) + "\n")
    (results / "results.json").write_text(json.dumps({"rows": {k: {str(s): {"tasks": r["tasks"]} for s, r in v.items()}
                                                              for k, v in rows.items()},
                                                      "best_lr": {m: best_lr(m, runs) for m in METHODS}}, indent=1))


def lambda_runs(runs: dict) -> list[tuple[float, dict]]:
    lr = best_lr("thanora", runs)
    if lr is None:
        return []
    out = []
    for lam in sorted(LAMBDAS + [1e-3]):
        job = {"method": "thanora", "lr": lr, "seed": 0}
        if lam != 1e-3:
            job["spr_lambda"] = lam
        if (r := runs.get(job_name(job))) is not None:
            out.append((lam, r))
    return out


def plot_mechanism(results: Path, lam_rows: list, runs: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"ThanoRA λ={lam:g}", r) for lam, r in lam_rows]
    lora_lr = best_lr("lora", runs)
    if lora_lr is not None and (r := runs.get(job_name({"method": "lora", "lr": lora_lr, "seed": 0}))):
        series.append(("plain LoRA", r))
    panels = {"mechanism_effective_rank.png": [("mech/effective_rank", "effective rank of s·B·A (mean over layers)")],
              "mechanism_overlap.png": [("mech/row_overlap", "row-space overlap of task blocks of A"),
                                        ("mech/col_overlap", "column-space overlap of task blocks of B"),
                                        ("mech/update_overlap", "|cos| between task updates s·B_t·A_t")]}
    for file, keys in panels.items():
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
        for ax, (key, title) in zip(axes[0], keys):
            for label, r in series:
                points = [(c["step"], c[key]) for c in r["curve"] if key in c]
                if points:
                    ax.plot(*zip(*points), marker="o", ms=3, label=label)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results / file, dpi=100)
        plt.close(fig)


def allocation_study(results: Path, work_root: Path, run_config, mixtures=("study", "demo")) -> int:
    """HASI (one training step) with and without each record's system turn in the statistics, on the study
    mixture and the bundled demo mixture (configs/demo_smollm2.yaml; its gsm8k previews make HASI ~4x longer);
    writes allocation_system_turn.md."""
    repo = Path(__file__).resolve().parent.parent
    lines = ["## System turn in or out of HASI's statistics (METHOD.md 2.2): how the allocation moves", "",
             "| mixture | tasks | prefix | content tokens per task (in → out) | mean rank per task (in → out) | "
             "layers whose split changed |", "|---|---|---:|---|---|---:|"]
    for mixture in mixtures:
        allocs = {}
        for exclude in (False, True):
            out = work_root / f"allocation-{mixture}-exclude{int(exclude)}"
            if not (out / "allocation.json").is_file():
                if mixture == "demo":
                    cmd = [sys.executable, str(repo / "launchers" / "train.py"), "--config",
                           str(repo / "configs" / "demo_smollm2.yaml")]
                    overrides = [f"train.output_dir={out}", "train.report_to=[]", "train.eval_every=0"]
                else:
                    cfg = run_config({"method": "thanora", "lr": 1e-3, "seed": 0}, out, work_root / "hasi_cache" / "alloc")
                    cfg["train"].update(eval_every=0)
                    cfg["thanora"]["statistics_cache"] = ""
                    path = work_root / f"allocation-{mixture}.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(cfg))
                    cmd, overrides = [sys.executable, str(repo / "launchers" / "train.py"), "--config", str(path)], []
                overrides += ["train.max_steps=1", "train.num_epochs=null", "train.save_every=0",
                              f"thanora.exclude_system_turn={str(exclude).lower()}", "train.resume=auto"]
                print("[study] " + " ".join(cmd + overrides), flush=True)
                subprocess.run(cmd + overrides, check=True, cwd=repo)
            allocs[exclude] = json.loads((out / "allocation.json").read_text())
        a, b = allocs[False], allocs[True]
        changed = sum(ra != rb for ra, rb in zip(a["ranks"], b["ranks"]))
        mean = (lambda al: [sum(r[t] for r in al["ranks"]) / len(al["ranks"]) for t in range(len(al["tasks"]))])
        lines.append(f"| {mixture} | {', '.join(a['tasks'])} | {a['prefix_length']} | "
                     + ", ".join(f"{x} → {y}" for x, y in zip(a["token_counts"], b["token_counts"])) + " | "
                     + ", ".join(f"{x:.2f} → {y:.2f}" for x, y in zip(mean(a), mean(b)))
                     + f" | {changed} of {len(a['ranks'])} |")
    (results / "allocation_system_turn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
