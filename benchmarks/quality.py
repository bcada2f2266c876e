#!/usr/bin/env python
"""Quality benchmark: does ThanoRA beat plain LoRA (and per-task LoRAs) on a real model and real tasks?

    python benchmarks/quality.py --quick                      # smoke run, < 10 min on 2 CPU cores
    nohup nice -n 10 python benchmarks/quality.py --full > benchmarks/results/full/log.txt 2>&1 &
    python benchmarks/quality.py --full --report-only         # rebuild table + plot from finished runs
    python benchmarks/quality.py --long                       # lora / thanora / no_spr with 4x the steps

Model: SmolLM2-135M-Instruct (LLaMA architecture), prepared offline by scripts/prepare_smollm2.py.
Tasks (4, heterogeneous): gsm8k (numeric, long worked answers), sentiment (multiple choice), country_qa
(exact match, short facts) from data/demo, and arithmetic (numeric; reasoning-gym basic_arithmetic, built
by benchmarks/data/build_arithmetic.py) in place of the image task vqa (SmolLM2 is text-only).

Every configuration is trained with the same data, steps, batch, learning rate and seeds, then evaluated on
the same held-out eval split (greedy generation with the chat template; thanora_ds.evaluate):
    base           the base model, zero-shot
    lora           plain LoRA of the same total rank (thanora mode=random, allocation=uniform, spr_lambda=0,
                   proven equal to PEFT LoRA in tests/test_core_model.py)
    per_task_lora  one plain LoRA (same rank) per task, trained on that task alone for the same number of
                   steps and evaluated on its own task (the reference the paper claims to beat)
    thanora        ThanoRA with the code's defaults (thanora_ds.config.ThanoraConfig)
    no_spr         thanora.spr_lambda=0                 uniform   thanora.allocation=uniform
    random         thanora.mode=random                  corda     thanora.mode=corda
    covariance     thanora.spectrum=covariance (spectrum of C_t alone)
Extra configurations (--configs): tau1, tau10, shared0, lambda1e-2, previews4, previews64 (N_t), and
lora_lr1e-3 / thanora_lr1e-3 (is ThanoRA's gain only a larger effective step?).
Seed s sets data.seed (splits, preview and data order), train.seed (dropout) and thanora.init_seed (random
inits) to s, the same for every configuration, so configurations are compared pairwise per seed.

Each (configuration, seed[, task]) is one job run in a child process; its result is written to
RESULTS/runs/<job>.json and a job whose file exists is skipped, so an interrupted run resumes with the
same command. Training outputs go to WORK (default runs/quality/<mode>; ZeRO checkpoints are deleted after
evaluation, metrics.jsonl / allocation.* / final adapters are kept). After every job RESULTS/table.md,
results.json and quality.png are rewritten from the finished jobs, and allocation_thanora.png is copied.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_MODEL = REPO / "models" / "smollm2-135m-instruct"
TASK_SOURCES = {   # task: (data file, format, scorer)
    "gsm8k": (REPO / "data/demo/gsm8k.jsonl", "prompt_response", "numeric"),
    "sentiment": (REPO / "data/demo/sentiment.jsonl", "chat", "multiple_choice"),
    "country_qa": (REPO / "data/demo/country_qa.jsonl", "prompt_response", "exact_match"),
    "arithmetic": (REPO / "benchmarks/data/arithmetic.jsonl", "prompt_response", "numeric"),
}
TASKS = list(TASK_SOURCES)
PLAIN_LORA = {"mode": "random", "allocation": "uniform", "spr_lambda": 0.0}
CONFIGS = {   # name: (thanora overrides, description)
    "base": (None, "base model, zero-shot"),
    "lora": (PLAIN_LORA, "plain LoRA, same total rank"),
    "per_task_lora": (PLAIN_LORA, "one LoRA per task (each on its own task)"),
    "thanora": ({}, "ThanoRA, defaults of the time (unit rows, gamma 1)"),
    "no_spr": ({"spr_lambda": 0.0}, "ThanoRA, no SPR (lambda=0)"),
    "uniform": ({"allocation": "uniform"}, "ThanoRA, uniform allocation"),
    "random": ({"mode": "random"}, "ThanoRA, mode random"),
    "corda": ({"mode": "corda"}, "ThanoRA, mode corda"),
    "covariance": ({"spectrum": "covariance"}, "ThanoRA, spectrum of C_t alone"),
    # not in the default set (run with --configs ...): settle tau, shared rank, lambda
    "tau1": ({"tau": 1.0}, "ThanoRA, tau=1"),
    "tau10": ({"tau": 10.0}, "ThanoRA, tau=10"),
    "shared0": ({"shared_rank": 0}, "ThanoRA, no shared block"),
    "lambda1e-2": ({"spr_lambda": 1e-2}, "ThanoRA, lambda=1e-2"),
    "previews4": ({}, "ThanoRA, N_t = 4 previews per task"),
    "previews64": ({}, "ThanoRA, N_t = 64 previews per task"),
    # is ThanoRA's gain a larger effective step? (HASI's A rows are unit-norm top input directions)
    "lora_lr1e-3": (PLAIN_LORA, "plain LoRA, lr 1e-3 (5x)"),
    "thanora_lr1e-3": ({}, "ThanoRA, lr 1e-3 (5x)"),
}
# configurations that also change data.* or train.* keys (training only: evaluation keeps the mode's split)
OVERRIDES = {"previews4": {"data": {"preview_samples": 4}}, "previews64": {"data": {"preview_samples": 64}},
             "lora_lr1e-3": {"train": {"lr": 1e-3}}, "thanora_lr1e-3": {"train": {"lr": 1e-3}}}
DEFAULT_CONFIGS = ["base", "lora", "per_task_lora", "thanora", "no_spr", "uniform", "random", "corda", "covariance"]

MODES = {
    # quick: smoke test of the pipeline (base, lora, thanora, one per-task LoRA; one seed; q/v; 3 steps)
    "quick": dict(seeds=[0], configs=["base", "lora", "thanora", "per_task_lora"], max_steps=3, micro_batch_size=4,
                  warmup_steps=1, max_length=256, preview_samples=4, eval_samples=4, eval_limit={t: 4 for t in TASKS},
                  max_new_tokens={"gsm8k": 16, "sentiment": 4, "country_qa": 8, "arithmetic": 8},
                  targets=["q_proj", "v_proj"], per_task_tasks=["sentiment"]),
    # full: sized for 3 seeds of every configuration in ~75 min on 2 CPU cores shared with other jobs
    "full": dict(seeds=[0, 1, 2], configs=DEFAULT_CONFIGS, max_steps=20, micro_batch_size=4, warmup_steps=2,
                 max_length=256, preview_samples=16, eval_samples=32,
                 eval_limit={"gsm8k": 12, "sentiment": 32, "country_qa": 32, "arithmetic": 32},
                 max_new_tokens={"gsm8k": 80, "sentiment": 4, "country_qa": 12, "arithmetic": 8},
                 targets=["q_proj", "v_proj"], per_task_tasks=TASKS),
}
# long: does the 20-step picture hold with 4x the training? Same data, lr and eval examples as full; the
# arithmetic cap is 16 new tokens so that a model that writes "a + b = c" before the answer is not cut off.
MODES["long"] = dict(MODES["full"], configs=["lora", "thanora", "no_spr"], max_steps=80, warmup_steps=8,
                     max_new_tokens=dict(MODES["full"]["max_new_tokens"], arithmetic=16))
# Jobs run group by group, each group seed by seed: an interrupted run has the main comparison for all seeds first.
PRIORITY = [["base", "lora", "thanora"], ["per_task_lora", "no_spr", "random", "uniform", "covariance", "corda"]]
COMMON_TRAIN = dict(lr=2e-4, gradient_accumulation_steps=1, save_every=0, keep_last=1, log_every=1,
                    preview_batch_size=8, report_to=[], resume="auto")


# ------------------------------------------------------------------------------------------------------------
# Jobs

def job_name(config: str, seed: int, task: str | None = None) -> str:
    return f"{config}-{task}-seed{seed}" if task else f"{config}-seed{seed}"


def jobs_for(settings: dict, configs: list[str], seeds: list[int]) -> list[dict]:
    """Group by group (PRIORITY, then any other configuration), each group seed by seed."""
    groups = [[c for c in g if c in configs] for g in PRIORITY]
    groups.append([c for c in configs if not any(c in g for g in PRIORITY)])
    jobs = []
    for group in groups:
        for seed in seeds:
            for config in group:
                if config == "per_task_lora":
                    jobs += [{"config": config, "seed": seed, "task": t} for t in settings["per_task_tasks"]]
                else:
                    jobs.append({"config": config, "seed": seed, "task": None})
    return jobs


def per_task_steps(settings: dict) -> int:
    """A per-task LoRA sees as many examples of its task as a multi-task run does (mixing is uniform: the four
    tasks have equal train splits), so the per-task references together cost one multi-task run."""
    return max(1, settings["max_steps"] // len(TASKS))


def data_section(settings: dict, seed: int, tasks: list[str], config: str | None = None) -> dict:
    section = {
        "sources": [{"path": str(TASK_SOURCES[t][0]), "format": TASK_SOURCES[t][1]} for t in tasks],
        "tasks": {t: {"scorer": TASK_SOURCES[t][2]} for t in tasks},
        "max_length": settings["max_length"], "preview_samples": settings["preview_samples"], "eval_samples": settings["eval_samples"],
        "mixing": "temperature", "temperature": 2.0, "seed": seed,
    }
    return section | OVERRIDES.get(config, {}).get("data", {})


def run_config(settings: dict, job: dict, model: str, output_dir: str) -> dict:
    """The launchers/train.py run config of one training job."""
    seed, task = job["seed"], job["task"]
    steps = per_task_steps(settings) if task else settings["max_steps"]
    warmup = max(1, round(settings["warmup_steps"] * steps / settings["max_steps"]))
    # the grid's committed results were made with the unit-row init (the default until the study): kept, so that the
    # grid resumes and reproduces them; benchmarks/study.py compares the calibrated init
    thanora = {"gamma_rule": "constant", **(CONFIGS[job["config"]][0] or {}), "init_seed": seed}
    if settings["targets"]:
        thanora["targets"] = settings["targets"]
    return {
        "model": {"path": str(model), "dtype": "fp32", "attn_implementation": "sdpa",
                  "activation_checkpointing": False},
        "data": data_section(settings, seed, [task] if task else TASKS, job["config"]),
        "thanora": thanora,
        "train": dict(COMMON_TRAIN, output_dir=output_dir, micro_batch_size=settings["micro_batch_size"],
                      max_steps=steps, warmup_steps=warmup, seed=seed) | OVERRIDES.get(job["config"], {}).get("train", {}),
        "deepspeed": {"config": "ds_configs/zero3.json"},
    }


def git_commit() -> str:
    """HEAD (+dirty) of the repository, or the COMMIT file of a snapshot (git archive) the benchmark runs from."""
    if (REPO / "COMMIT").is_file():
        return (REPO / "COMMIT").read_text().strip() + " (snapshot)"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "thanora_ds", "launchers", "benchmarks/quality.py"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------------------
# One job (child process): train, then evaluate

def run_job(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    from thanora_ds.data import DataConfig, build_multitask_data
    from thanora_ds.evaluate import evaluate
    from thanora_ds.modeling import load_processor
    from thanora_ds.train_config import ModelConfig

    job, settings = spec["job"], spec["settings"]
    result = {"job": job, "name": spec["name"], "mode": spec["mode"], "commit": spec["commit"],
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t0 = time.time()
    work = Path(spec["work_dir"])
    if job["config"] != "base":
        from thanora_ds.train_config import load_train_config
        from thanora_ds.trainer import train

        cfg_path = work / "run_config.json"
        cfg_path.write_text(json.dumps(spec["run_config"], indent=1))
        cfg = load_train_config(cfg_path)
        train(cfg)   # releases ZeRO-3's hold on model loading when it returns, so the eval model is a plain one
        result["train_seconds"] = time.time() - t0
        timings = work / "timings.json"
        if timings.is_file():
            result["timings"] = json.loads(timings.read_text())
        metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
        result["final_train_loss"] = sum(m["task_loss"] for m in metrics[-5:]) / max(1, len(metrics[-5:]))
        alloc = work / "allocation.json"
        if alloc.is_file():
            a = json.loads(alloc.read_text())
            ranks = a.get("ranks") or []
            if ranks:
                result["mean_rank_per_task"] = dict(zip(a["tasks"], [sum(r[t] for r in ranks) / len(ranks)
                                                                     for t in range(len(a["tasks"]))]))
    # evaluation, always on the full mixture's eval split of this seed (splits are keyed by task name)
    t1 = time.time()
    torch.set_num_threads(int(os.environ.get("QUALITY_EVAL_THREADS", "1")))
    tokenizer, _ = load_processor(ModelConfig(path=spec["model"]))
    data = build_multitask_data(DataConfig.from_dict(data_section(settings, job["seed"], TASKS)), tokenizer=tokenizer)
    if job["config"] == "base":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
    else:
        from thanora_ds.export import build_adapted_model, find_checkpoint, load_checkpoint

        model = build_adapted_model(load_checkpoint(find_checkpoint(str(work))), spec["model"], torch.float32)
    tasks = [job["task"]] if job["task"] else TASKS
    result["tasks"], predictions = {}, []
    for task in tasks:
        report = evaluate(model, data, tokenizer, batch_size=16, max_new_tokens=settings["max_new_tokens"][task],
                          tasks=[task], limit=settings["eval_limit"][task], with_loss=True)
        r = report["tasks"][task]
        result["tasks"][task] = {"score": r["score"], "loss": r["loss"], "n": r["n"], "scorer": r["scorer"],
                                 "generated_tokens": r.get("generated_tokens")}
        predictions += report["predictions"]
    result["eval_seconds"] = time.time() - t1
    result["seconds"] = time.time() - t0
    with open(work / "predictions.jsonl", "w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    ckpts = work / "checkpoints"
    if ckpts.is_dir() and not spec.get("keep_checkpoints"):
        shutil.rmtree(ckpts, ignore_errors=True)   # ~0.5 GB each (ZeRO-3 saves the frozen base too)
    out = Path(spec["result_path"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(f"RESULT {spec['name']}: " + ", ".join(f"{t} {v['score']:.3f}" for t, v in result["tasks"].items())
          + f" ({result['seconds']:.0f}s)", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------------
# Aggregation: table, plot

def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def aggregate(results_dir: Path, configs: list[str], seeds: list[int], settings: dict) -> dict:
    """{config: {"seeds": {seed: {task: score, "mean": ..}}, "stats": {task: (mean, std, n)}}} over complete seeds."""
    runs = {}
    for f in sorted((results_dir / "runs").glob("*.json")):
        r = json.loads(f.read_text())
        runs[r["name"]] = r
    out = {}
    for config in configs:
        per_seed, loss_seed, secs = {}, {}, []
        for seed in seeds:
            if config == "per_task_lora":
                parts = [runs.get(job_name(config, seed, t)) for t in settings["per_task_tasks"]]
                if not all(parts):
                    continue
                scores = {t: p["tasks"][t]["score"] for t, p in zip(settings["per_task_tasks"], parts)}
                losses = {t: p["tasks"][t]["loss"] for t, p in zip(settings["per_task_tasks"], parts)}
                secs.append(sum(p["seconds"] for p in parts))
            else:
                r = runs.get(job_name(config, seed))
                if r is None:
                    continue
                scores = {t: v["score"] for t, v in r["tasks"].items()}
                losses = {t: v["loss"] for t, v in r["tasks"].items()}
                secs.append(r["seconds"])
            scores["mean"] = sum(scores.values()) / len(scores)
            if all(v is not None for v in losses.values()):
                losses["mean"] = sum(losses.values()) / len(losses)
            per_seed[seed], loss_seed[seed] = scores, losses
        if not per_seed:
            continue
        keys = list(next(iter(per_seed.values())))
        stats = {k: _mean_std([s[k] for s in per_seed.values()]) + (len(per_seed),) for k in keys}
        lstats = {k: _mean_std([s[k] for s in loss_seed.values() if s.get(k) is not None])
                  for k in next(iter(loss_seed.values()))}
        out[config] = {"seeds": per_seed, "stats": stats, "loss": lstats, "loss_seeds": loss_seed,
                       "seconds": sum(secs)}
    # paired differences of the mean score / mean loss against plain LoRA and against ThanoRA, over common seeds
    for ref in ("lora", "thanora"):
        for config, v in out.items():
            if config != ref and (d := paired(out, config, ref)):
                v[f"delta_vs_{ref}"], v[f"loss_delta_vs_{ref}"] = d
    return out


# comparisons that need their own reference: the same method at another learning rate
PAIRS = [("thanora_lr1e-3", "lora_lr1e-3"), ("lora_lr1e-3", "lora"), ("thanora_lr1e-3", "thanora"),
         ("lora_lr1e-3", "thanora")]


def paired(agg: dict, a: str, b: str):
    """(score, loss) differences a - b of the task-mean, paired over the seeds both have: (mean, std, n) each;
    None when they share no seed."""
    if a not in agg or b not in agg:
        return None
    common = [s for s in agg[a]["seeds"] if s in agg[b]["seeds"]]
    if not common:
        return None
    score = _mean_std([agg[a]["seeds"][s]["mean"] - agg[b]["seeds"][s]["mean"] for s in common]) + (len(common),)
    loss = None
    if all("mean" in agg[c]["loss"] for c in (a, b)):
        loss = _mean_std([agg[a]["loss_seeds"][s]["mean"] - agg[b]["loss_seeds"][s]["mean"] for s in common]) \
            + (len(common),)
    return score, loss


def markdown(agg: dict, settings: dict, info: dict) -> str:
    tasks = [t for t in TASKS]
    lines = [f"# Quality benchmark ({info['mode']})", "",
             f"Model: SmolLM2-135M-Instruct (fp32). Command: `{info['command']}`. Commit: `{info['commit']}`.",
             f"Wall time of the finished jobs: {info['job_seconds'] / 60:.1f} min "
             f"({info['n_done']} of {info['n_jobs']} jobs); {info['when']}.", "",
             f"Training: {settings['max_steps']} steps x micro batch {settings['micro_batch_size']} (1 process; per-task LoRAs "
             f"{per_task_steps(settings)} steps each, i.e. the same examples of their task), max_length "
             f"{settings['max_length']}, "
             f"lr {COMMON_TRAIN['lr']:g} cosine, warmup {settings['warmup_steps']}, rank 16 (all configurations), N_t = "
             f"{settings['preview_samples']} previews per task (where a configuration does not say otherwise), targets "
             f"{', '.join(settings['targets']) if settings['targets'] else 'all 7 projections'}.",
             "Eval: greedy, per task: " + ", ".join(
                 f"{t} {settings['eval_limit'][t]} examples / {settings['max_new_tokens'][t]} new tokens "
                 f"({TASK_SOURCES[t][2]})" for t in tasks) + ".", "",
             "Scores: mean ± std over seeds (n = number of seeds); Δ: paired differences over the seeds both have.", "",
             "| configuration | " + " | ".join(tasks) + " | mean | Δ mean vs LoRA | Δ mean vs ThanoRA | n | job time (s) |",
             "|---|" + "---:|" * (len(tasks) + 5)]
    for config, v in agg.items():
        st = v["stats"]
        cells = [f"{st[t][0]:.3f} ± {st[t][1]:.3f}" if t in st else "-" for t in tasks]
        mean = f"**{st['mean'][0]:.3f} ± {st['mean'][1]:.3f}**"
        delta = " | ".join(f"{d[0]:+.3f} ± {d[1]:.3f} (n={d[2]})" if d else "" for d in
                           (v.get("delta_vs_lora"), v.get("delta_vs_thanora")))
        lines.append(f"| {config} ({CONFIGS[config][1]}) | " + " | ".join(cells) + f" | {mean} | {delta} | "
                     f"{st['mean'][2]} | {v['seconds']:.0f} |")
    lines += ["", "Per-task eval loss (mean next-token cross-entropy on the reference response tokens of the same eval "
              "examples; lower is better; mean ± std over seeds; Δ vs LoRA paired over seeds):", "",
              "| configuration | " + " | ".join(tasks) + " | mean | Δ mean vs LoRA | Δ mean vs ThanoRA |",
              "|---|" + "---:|" * (len(tasks) + 3)]
    for config, v in agg.items():
        lo = v["loss"]
        lines.append(f"| {config} | " + " | ".join(f"{lo[t][0]:.3f} ± {lo[t][1]:.3f}" if t in lo else "-" for t in tasks)
                     + (f" | **{lo['mean'][0]:.3f} ± {lo['mean'][1]:.3f}**" if "mean" in lo else " | -")
                     + "".join(f" | {d[0]:+.3f} ± {d[1]:.3f} (n={d[2]})" if d else " | "
                               for d in (v.get("loss_delta_vs_lora"), v.get("loss_delta_vs_thanora"))) + " |")
    pairs = [(a, b, d) for a, b in PAIRS if (d := paired(agg, a, b))]
    if pairs:
        lines += ["", "Paired comparisons (task-mean, a − b over the seeds both have):", "",
                  "| a | b | Δ score | Δ eval loss | n |", "|---|---|---:|---:|---:|"]
        for a, b, (ds, dl) in pairs:
            lines.append(f"| {a} | {b} | {ds[0]:+.3f} ± {ds[1]:.3f} | "
                         + (f"{dl[0]:+.3f} ± {dl[1]:.3f}" if dl else "-") + f" | {ds[2]} |")
    lines += ["", "Per seed (mean score over tasks):", "", "| configuration | " +
              " | ".join(f"seed {s}" for s in info["seeds"]) + " |", "|---|" + "---:|" * len(info["seeds"])]
    for config, v in agg.items():
        lines.append(f"| {config} | " + " | ".join(f"{v['seeds'][s]['mean']:.3f}" if s in v["seeds"] else "-"
                                                   for s in info["seeds"]) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, path: Path, title: str) -> None:
    """Two panels: generation scores and eval losses per task (+ mean), mean ± std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = TASKS + ["mean"]
    configs = list(agg)
    width = 0.8 / max(1, len(configs))
    fig, axes = plt.subplots(2, 1, figsize=(12, 8.5))
    cmap = plt.get_cmap("tab20")   # up to 20 distinct configurations
    for ax, key, label in ((axes[0], "stats", "score (higher is better)"),
                           (axes[1], "loss", "eval loss (lower is better)")):
        for i, config in enumerate(configs):
            st = agg[config][key]
            xs = [g + (i - (len(configs) - 1) / 2) * width for g in range(len(groups))]
            ms = [st[k][0] if k in st else float("nan") for k in groups]
            ss = [st[k][1] if k in st else 0.0 for k in groups]
            ax.bar(xs, ms, width, yerr=ss, capsize=2, color=cmap(i % 20),
                   label=f"{config} (n={agg[config]['stats']['mean'][2]})")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups)
        ax.set_ylabel(f"{label}\nmean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].set_title(title)
    axes[0].legend(fontsize=8, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results_dir: Path, work_root: Path, mode: str, settings: dict, configs: list[str], seeds: list[int],
           n_jobs: int, command: str) -> None:
    agg = aggregate(results_dir, configs, seeds, settings)
    if not agg:
        return
    runs = [json.loads(f.read_text()) for f in (results_dir / "runs").glob("*.json")]
    info = {"mode": mode, "command": command, "commit": sorted({r["commit"] for r in runs}),
            "job_seconds": sum(r["seconds"] for r in runs), "n_done": len(runs), "n_jobs": n_jobs,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seeds": seeds}
    info["commit"] = ", ".join(info["commit"])
    (results_dir / "table.md").write_text(markdown(agg, settings, info))
    (results_dir / "results.json").write_text(json.dumps(
        {"info": info, "settings": settings,
         "configs": {c: {"stats": v["stats"], "loss": v["loss"], "seeds": v["seeds"], "loss_seeds": v["loss_seeds"],
                         "delta_vs_lora": v.get("delta_vs_lora"), "loss_delta_vs_lora": v.get("loss_delta_vs_lora"),
                         "delta_vs_thanora": v.get("delta_vs_thanora"),
                         "loss_delta_vs_thanora": v.get("loss_delta_vs_thanora"),
                         "seconds": v["seconds"]} for c, v in agg.items()}},
        indent=1) + "\n")
    plot(agg, results_dir / "quality.png", f"ThanoRA quality benchmark ({mode}): SmolLM2-135M-Instruct, 4 tasks")
    for seed in seeds:  # the rank-allocation plot of the ThanoRA run (first seed that has one)
        src = work_root / job_name("thanora", seed) / "allocation.png"
        if src.is_file():
            shutil.copyfile(src, results_dir / "allocation_thanora.png")
            shutil.copyfile(src.with_suffix(".json"), results_dir / "allocation_thanora.json")
            break


# ------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smoke run (< 10 min): one seed, q/v only, 4 steps")
    g.add_argument("--full", action="store_true", help="the benchmark (default)")
    g.add_argument("--long", action="store_true", help="lora / thanora / no_spr with 4x the training steps of --full")
    p.add_argument("--configs", nargs="*", default=None, help=f"subset/extra of {list(CONFIGS)}")
    p.add_argument("--seeds", nargs="*", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="override the mode's training steps")
    p.add_argument("--max-length", type=int, default=None, help="override the mode's data.max_length")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="prepared SmolLM2 folder (scripts/prepare_smollm2.py)")
    p.add_argument("--results", default=None, help="default benchmarks/results/<mode>")
    p.add_argument("--work", default=None, help="training outputs (default runs/quality/<mode>)")
    p.add_argument("--report-only", action="store_true", help="only rebuild table/plot from finished jobs")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--workers", type=int, default=1,
                   help="jobs run at once (each with cpu_count / N threads); 2 uses a shared 2-core machine better, "
                        "since evaluation runs on one thread")
    p.add_argument("--_job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._job:
        return run_job(args._job)

    mode = "quick" if args.quick else "long" if args.long else "full"
    settings = json.loads(json.dumps(MODES[mode]))
    if args.max_steps:
        settings["max_steps"] = args.max_steps
    if args.max_length:
        settings["max_length"] = args.max_length
    configs = args.configs or settings["configs"]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    seeds = args.seeds if args.seeds is not None else settings["seeds"]
    results = Path(args.results or REPO / "benchmarks" / "results" / mode).resolve()
    work_root = Path(args.work or REPO / "runs" / "quality" / mode).resolve()
    (results / "runs").mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    jobs = jobs_for(settings, configs, seeds)
    if args.report_only:
        command = (f"python benchmarks/quality.py --{mode} [--workers 2] (table rebuilt with --report-only; the "
                   f"invocations are in {results.name}/log*.txt)")
        report(results, work_root, mode, settings, configs, seeds, len(jobs), command)
        print((results / "table.md").read_text() if (results / "table.md").is_file() else "no finished job")
        return 0
    if not Path(args.model, "config.json").is_file():
        p.error(f"{args.model}: not a prepared model folder; run python scripts/prepare_smollm2.py")
    if not TASK_SOURCES["arithmetic"][0].is_file():
        p.error(f"{TASK_SOURCES['arithmetic'][0]} missing; run python benchmarks/data/build_arithmetic.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 8))), TOKENIZERS_PARALLELISM="false")
    commit = git_commit()
    t_start = time.time()
    todo = [j for j in jobs if not (results / "runs" / f"{job_name(j['config'], j['seed'], j['task'])}.json").is_file()]
    print(f"[quality] mode {mode}: {len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run; "
          f"results {results}, work {work_root}, commit {commit}", flush=True)
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from thanora_ds.distributed import free_port

    lock = threading.Lock()
    failures = []
    threads = max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None

    def run_one(i: int, job: dict) -> None:
        name = job_name(job["config"], job["seed"], job["task"])
        work = work_root / name
        work.mkdir(parents=True, exist_ok=True)
        spec = {"job": job, "name": name, "mode": mode, "settings": settings, "model": str(Path(args.model).resolve()),
                "work_dir": str(work), "result_path": str(results / "runs" / f"{name}.json"), "commit": commit,
                "keep_checkpoints": args.keep_checkpoints,
                "run_config": run_config(settings, job, str(Path(args.model).resolve()), str(work))
                if job["config"] != "base" else None}
        spec_path = work / "job.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        job_env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if threads:
            job_env["OMP_NUM_THREADS"] = str(threads)
        t0 = time.time()
        print(f"[quality] {time.strftime('%H:%M:%S')} job {i + 1}/{len(todo)} {name} ...", flush=True)
        with open(work / "log.txt", "a") as log:
            rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_job", str(spec_path)],
                                cwd=str(REPO), env=job_env, stdout=log, stderr=subprocess.STDOUT).returncode
        took = time.time() - t0
        if rc != 0:
            failures.append(name)
            print(f"[quality] {name} FAILED (exit {rc}, {took:.0f}s); see {work / 'log.txt'}", flush=True)
            return
        r = json.loads((results / "runs" / f"{name}.json").read_text())
        print(f"[quality] {time.strftime('%H:%M:%S')} {name} done in {took:.0f}s: "
              + ", ".join(f"{t} {v['score']:.3f}" for t, v in r["tasks"].items())
              + (f" (train {r['train_seconds']:.0f}s, eval {r['eval_seconds']:.0f}s)" if "train_seconds" in r else ""),
              flush=True)
        with lock:
            report(results, work_root, mode, settings, configs, seeds, len(jobs), command)

    # jobs start in plan order; with --workers N, N run at once (each with cpu_count / N threads)
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        list(pool.map(lambda a: run_one(*a), enumerate(todo)))
    report(results, work_root, mode, settings, configs, seeds, len(jobs), command)
    print(f"[quality] finished {len(todo) - len(failures)}/{len(todo)} jobs in {(time.time() - t_start) / 60:.1f} min; "
          f"table {results / 'table.md'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
