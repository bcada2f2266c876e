#!/usr/bin/env python
"""Method study (issue 15): best-tuned plain LoRA against best-tuned ThanoRA, fairly, on a real model.

    nohup nice -n 5 python benchmarks/study.py > benchmarks/results/study/log.txt 2>&1 &   # resumable
    python benchmarks/study.py --report-only                                              # rebuild the report
    python benchmarks/study.py --allocation-only                                          # system turn in/out

Model: SmolLM2-135M-Instruct (scripts/prepare_smollm2.py), fp32, one process, all 7 projections, rank 16.
Tasks (4 short ones, each of another kind, 300 records each; split per seed into 100 eval, 32 preview and 100
train records): arithmetic (numeric), country_qa (exact match), sentiment (multiple choice, own system
prompt), uppercase (exact match, own system prompt; benchmarks/data/build_uppercase.py).
Training: one epoch of the mixture (train.num_epochs 1: every train record once, 50 steps of 8), cosine with
5 % warmup.

The plan (``plan``; each job is one child process; its result file makes it done, so the same command resumes
an interrupted study job by job), in priority order:
1. Plain LoRA and ThanoRA (SWEPT) at the first rate of their LRS on every seed (an early paired comparison at
   one common rate), then the rest of the learning-rate sweep on seed 0; the selection rule: the learning rate
   with the lowest mean eval loss on seed 0.
2. Seeds 1 and 2 of both at their selected learning rates (the main comparison, paired per seed).
3. ThanoRA with SPR off (lambda 0) and strong (0.1) on seed 0: the mechanism curves.
4. References: ThanoRA with unit rows (the earlier default gamma 1; its own small sweep), ThanoRA with task
   routing (VARIANTS, at ThanoRA's rate), one plain LoRA per task (each trained alone for one epoch of its task,
   evaluated on it), every seed; then the rest of the lambda sweep.
The report (benchmarks/results/study/report.md, results.json, plots) pairs methods per seed: mean difference
with a 95 % t interval over seeds (n - 1 degrees of freedom). Seed s sets data.seed (which records are eval /
preview / train and the data order), train.seed and thanora.init_seed.
ThanoRA's runs on seed 0 evaluate the eval loss and log the mechanism metrics (thanora_ds.mechanism) at step 0,
half-way and at the end (``curves``); every run writes the mechanism at the end; HASI statistics are cached per seed (thanora.statistics_cache), so the variants of a seed
preview once.
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
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import git_commit  # noqa: E402

MODEL = REPO / "models" / "smollm2-135m-instruct"
TASKS = {   # name: (file, format, scorer, max_new_tokens)
    "arithmetic": (REPO / "benchmarks/data/arithmetic.jsonl", "prompt_response", "numeric", 8),
    "country_qa": (REPO / "data/demo/country_qa.jsonl", "prompt_response", "exact_match", 12),
    "sentiment": (REPO / "data/demo/sentiment.jsonl", "chat", "multiple_choice", 4),
    "uppercase": (REPO / "benchmarks/data/uppercase.jsonl", "chat", "exact_match", 16),
}
PLAIN = {"mode": "random", "allocation": "uniform", "spr_lambda": 0.0}
METHODS = {   # name: (thanora overrides, description)
    "lora": (PLAIN, "plain LoRA (mode random, uniform, lambda 0)"),
    "thanora": ({"gamma_rule": "match_lora"}, "ThanoRA, gamma_rule match_lora"),
    "thanora_unit": ({"gamma_rule": "constant", "gamma": 1.0}, "ThanoRA, unit rows (gamma 1, METHOD.md's literal)"),
}
# options measured at ThanoRA's selected learning rate only (no sweep of their own), seed by seed
VARIANTS = {"thanora_routed": ({"gamma_rule": "match_lora", "task_routing": True},
                               "ThanoRA + task routing in training (each sample: its block + shared; all merged)")}
LRS = {"lora": [1e-3, 3e-4, 3e-3], "thanora": [1e-3, 3e-4, 3e-3], "thanora_unit": [3e-4, 1e-4]}   # first: run first
SWEPT = ["lora", "thanora"]   # the main comparison; thanora_unit (the earlier default) is a reference row
LAMBDAS = [0.0, 1e-1, 1e-2, 1.0, 10.0, 100.0]     # besides the default 1e-3 of the sweep; the first two run first
SEEDS = [0, 1, 2]
EVAL_RECORDS = 100
TRAIN_RECORDS = 100   # per task, besides its previews: one epoch is 4 x 100 / 8 = 50 steps (2 CPU cores)
SETTINGS = dict(micro_batch_size=8, max_length=128, preview_samples=32, rank=16, alpha=32.0,
                warmup_ratio=0.05, evals_during_training=2)


def job_name(job: dict) -> str:
    parts = [job["method"], f"lr{job['lr']:g}"]
    if job.get("spr_lambda") is not None:
        parts.append(f"lambda{job['spr_lambda']:g}")
    if job.get("task"):
        parts.append(job["task"])
    return "-".join(parts) + f"-seed{job['seed']}"


def split_files(seed: int, task: str) -> dict[str, Path]:
    """This seed's eval and train files of ``task``: EVAL_RECORDS records for eval, then previews + TRAIN_RECORDS
    for the train source (the data layer carves the previews out of it). The data layer caps a seeded split's
    eval share at a quarter of the task, so the study splits itself."""
    import random

    folder = REPO / "runs" / "study" / "data" / f"seed{seed}"
    out = {split: folder / f"{task}-{split}.jsonl" for split in ("train", "eval")}
    if not all(p.is_file() for p in out.values()):
        lines = TASKS[task][0].read_text(encoding="utf-8").splitlines()
        order = list(range(len(lines)))
        random.Random(f"{seed}-{task}").shuffle(order)
        folder.mkdir(parents=True, exist_ok=True)
        train = order[EVAL_RECORDS:EVAL_RECORDS + SETTINGS["preview_samples"] + TRAIN_RECORDS]
        for split, chosen in (("eval", order[:EVAL_RECORDS]), ("train", train)):
            tmp = out[split].with_suffix(".tmp")
            tmp.write_text("".join(lines[i] + "\n" for i in sorted(chosen)), encoding="utf-8")
            tmp.replace(out[split])
    return out


def data_section(seed: int, tasks: list[str]) -> dict:
    files = {t: split_files(seed, t) for t in tasks}
    return {"sources": [{"path": str(files[t][split]), "format": TASKS[t][1], "split": split}
                        for t in tasks for split in ("train", "eval")],
            "tasks": {t: {"scorer": TASKS[t][2], "max_new_tokens": TASKS[t][3]} for t in tasks},
            "max_length": SETTINGS["max_length"], "preview_samples": SETTINGS["preview_samples"],
            "mixing": "temperature", "temperature": 1.0, "seed": seed}


def steps_per_epoch(tasks: list[str]) -> int:
    train = TRAIN_RECORDS
    return math.ceil(train * len(tasks) / SETTINGS["micro_batch_size"])


def curves(job: dict) -> bool:
    """Which runs evaluate during training (eval loss + mechanism curves, ~1 min each on 2 cores): ThanoRA's on
    seed 0; the others write the mechanism at the end only (final/mechanism.json)."""
    return job["seed"] == 0 and job["method"] != "lora" and not job.get("task")


def run_config(job: dict, work: Path, cache: Path) -> dict:
    tasks = [job["task"]] if job.get("task") else list(TASKS)
    steps = steps_per_epoch(tasks)
    thanora = dict({**METHODS, **VARIANTS}[job["method"]][0], rank=SETTINGS["rank"], alpha=SETTINGS["alpha"], init_seed=job["seed"],
                   statistics_cache=str(cache))
    if job.get("spr_lambda") is not None:
        thanora["spr_lambda"] = job["spr_lambda"]
    return {
        "model": {"path": str(MODEL), "dtype": "fp32", "attn_implementation": "sdpa", "activation_checkpointing": False},
        "data": data_section(job["seed"], tasks),
        "thanora": thanora,
        "train": {"output_dir": str(work), "micro_batch_size": SETTINGS["micro_batch_size"], "num_epochs": 1,
                  "lr": job["lr"], "warmup_steps": max(1, round(SETTINGS["warmup_ratio"] * steps)), "seed": job["seed"],
                  "save_every": 0, "keep_last": 1, "log_every": 1, "preview_batch_size": 16, "report_to": [],
                  "eval_every": max(1, steps // SETTINGS["evals_during_training"]) if curves(job) else 0,
                  "resume": "auto"},
        "deepspeed": {"config": "ds_configs/zero2.json"},
    }


# ------------------------------------------------------------------------------------------------------------
# One job, in a child process: train (with evaluations of the eval loss and the mechanism metrics), then score

def run_job(spec_path: str) -> int:
    import logging

    import torch

    spec = json.loads(Path(spec_path).read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from thanora_ds.data import DataConfig, build_multitask_data
    from thanora_ds.evaluate import evaluate
    from thanora_ds.export import build_adapted_model, find_checkpoint, load_checkpoint
    from thanora_ds.modeling import load_processor
    from thanora_ds.train_config import ModelConfig, load_train_config
    from thanora_ds.trainer import train

    work, job = Path(spec["work_dir"]), spec["job"]
    t0 = time.time()
    (work / "run_config.json").write_text(json.dumps(spec["run_config"], indent=1))
    train(load_train_config(work / "run_config.json"))
    status = json.loads((work / "status.json").read_text())
    if status["state"] != "finished":   # stopped early (a signal, the parent gone): resume it, never score it
        print(f"training {status['state']} at step {status['step']} ({status['reason']}); not evaluated", flush=True)
        return 1
    result = {"job": job, "name": spec["name"], "commit": spec["commit"], "train_seconds": time.time() - t0,
              "timings": json.loads((work / "timings.json").read_text())}
    curve = work / "eval.jsonl"
    result["curve"] = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()] if curve.is_file() else []
    final = json.loads((work / "final" / "mechanism.json").read_text()) if (work / "final" / "mechanism.json").is_file() else None
    if final:
        from thanora_ds.mechanism import summarize
        result["mechanism_final"] = summarize(final["layers"], final["tasks"])
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result["train"] = {k: [m[k] for m in metrics] for k in ("task_loss", "spr", "grad_norm")}
    alloc = json.loads((work / "allocation.json").read_text())
    result["allocation"] = {"tasks": alloc["tasks"], "token_counts": alloc["token_counts"],
                            "prefix_length": alloc["prefix_length"],
                            "mean_rank": [sum(r[t] for r in alloc["ranks"]) / len(alloc["ranks"])
                                          for t in range(len(alloc["tasks"]))]}
    t1 = time.time()
    tokenizer, _ = load_processor(ModelConfig(path=str(MODEL)))
    tasks = [job["task"]] if job.get("task") else list(TASKS)
    data = build_multitask_data(DataConfig.from_dict(data_section(job["seed"], tasks)), tokenizer=tokenizer)
    model = build_adapted_model(load_checkpoint(find_checkpoint(str(work))), str(MODEL), torch.float32)
    result["tasks"] = {}
    with open(work / "predictions.jsonl", "w") as f:
        for task in tasks:
            report = evaluate(model, data, tokenizer, batch_size=25, max_new_tokens=TASKS[task][3], tasks=[task],
                              with_loss=True)
            r = report["tasks"][task]
            result["tasks"][task] = {"score": r["score"], "loss": r["loss"], "n": r["n"]}
            for p in report["predictions"]:
                f.write(json.dumps(p) + "\n")
    result["eval_seconds"] = time.time() - t1
    result["seconds"] = time.time() - t0
    shutil.rmtree(work / "checkpoints", ignore_errors=True)   # ~0.5 GB; final/ keeps the adapter
    out = Path(spec["result_path"])
    out.with_suffix(".tmp").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".tmp").replace(out)
    return 0


# ------------------------------------------------------------------------------------------------------------
# The plan

def load_results(results: Path) -> dict[str, dict]:
    return {json.loads(f.read_text())["name"]: json.loads(f.read_text()) for f in sorted((results / "runs").glob("*.json"))}


def mean_loss(r: dict) -> float:
    return sum(v["loss"] for v in r["tasks"].values()) / len(r["tasks"])


def mean_score(r: dict) -> float:
    return sum(v["score"] for v in r["tasks"].values()) / len(r["tasks"])


def best_lr(method: str, runs: dict) -> float | None:
    """The selection rule: the learning rate of LRS[method] with the lowest mean eval loss on seed 0 (None until
    all of them have run)."""
    found = [(mean_loss(runs[n]), lr) for lr in LRS[method]
             if (n := job_name({"method": method, "lr": lr, "seed": 0})) in runs]
    return min(found)[1] if len(found) == len(LRS[method]) else None


def plan(runs: dict) -> list[dict]:
    """Every job known so far, in priority order (jobs after the sweep appear once it has chosen): the main
    comparison first (sweep, then the other seeds at the chosen rates), then SPR off/strong (mechanism), then the
    reference rows and the rest of the lambda sweep."""
    sweep = [{"method": m, "lr": LRS[m][i], "seed": 0} for i in range(3) for m in SWEPT if i < len(LRS[m])]
    # the first rate of each sweep on every seed before the rest of the sweep: a paired comparison over all seeds
    # at one common rate exists early (2 CPU cores take 10-20 min per job)
    first = [{"method": m, "lr": LRS[m][0], "seed": s} for s in SEEDS for m in SWEPT]
    sweep = first + sweep
    best = {m: best_lr(m, runs) for m in METHODS}
    if best["lora"] is None or best["thanora"] is None:
        return list({job_name(j): j for j in sweep}.values())
    main = [{"method": m, "lr": best[m], "seed": s} for s in SEEDS[1:] for m in SWEPT]
    spr = [{"method": "thanora", "lr": best["thanora"], "seed": 0, "spr_lambda": lam} for lam in LAMBDAS]
    references = []
    for seed in SEEDS:
        if best["thanora_unit"] is not None:
            references.append({"method": "thanora_unit", "lr": best["thanora_unit"], "seed": seed})
        references += [{"method": v, "lr": best["thanora"], "seed": seed} for v in VARIANTS]
        references += [{"method": "lora", "lr": best["lora"], "seed": seed, "task": t} for t in TASKS]
    unit_sweep = [{"method": "thanora_unit", "lr": lr, "seed": 0} for lr in LRS["thanora_unit"]]
    jobs = sweep + main + spr[:2] + unit_sweep + references + spr[2:]
    return list({job_name(j): j for j in jobs}.values())   # in order, each once


def next_job(results: Path) -> dict | None:
    runs = load_results(results)
    failed = set((results / "failed.txt").read_text().split()) if (results / "failed.txt").is_file() else set()
    return next((j for j in plan(runs) if job_name(j) not in runs and job_name(j) not in failed), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "study"))
    p.add_argument("--work", default=str(REPO / "runs" / "study"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--allocation-only", action="store_true",
                   help="HASI only, with and without the system turn in the statistics: how the allocation moves")
    p.add_argument("--mixtures", nargs="+", default=["study", "demo"], choices=["study", "demo"],
                   help="with --allocation-only: which mixtures")
    p.add_argument("--max-jobs", type=int, default=0, help="stop after this many jobs (0: the whole plan)")
    p.add_argument("--_job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._job:
        return run_job(args._job)
    results, work_root = Path(args.results).resolve(), Path(args.work).resolve()
    (results / "runs").mkdir(parents=True, exist_ok=True)
    from study_report import allocation_study, write_report

    if args.report_only:
        write_report(results, load_results(results))
        return 0
    if not (MODEL / "config.json").is_file():
        p.error(f"{MODEL}: not prepared; run python scripts/prepare_smollm2.py")
    if args.allocation_only:
        return allocation_study(results, work_root, run_config, args.mixtures)
    from thanora_ds.distributed import free_port

    commit, done = git_commit(), 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 8))))
    while (job := next_job(results)) is not None and (not args.max_jobs or done < args.max_jobs):
        name = job_name(job)
        work = work_root / name
        if work.exists():   # an interrupted attempt: its checkpoints resume (train.resume auto), its eval reruns
            print(f"[study] resuming {name} in {work}", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        spec = {"job": job, "name": name, "work_dir": str(work), "commit": commit,
                "result_path": str(results / "runs" / f"{name}.json"),
                "run_config": run_config(job, work, work_root / "hasi_cache" / f"seed{job['seed']}")}
        (work / "job.json").write_text(json.dumps(spec, indent=1))
        t0 = time.time()
        print(f"[study] {time.strftime('%H:%M:%S')} {name} ...", flush=True)
        with open(work / "log.txt", "a") as log:
            rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_job", str(work / "job.json")],
                                cwd=str(REPO), env=dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
                                stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            with open(results / "failed.txt", "a") as f:
                f.write(name + "\n")
            print(f"[study] {name} FAILED (exit {rc}); see {work / 'log.txt'}", flush=True)
            continue
        r = json.loads((results / "runs" / f"{name}.json").read_text())
        print(f"[study] {name} done in {time.time() - t0:.0f}s: loss {mean_loss(r):.4f} score {mean_score(r):.3f} "
              + ", ".join(f"{t} {v['score']:.2f}/{v['loss']:.3f}" for t, v in r["tasks"].items()), flush=True)
        write_report(results, load_results(results))
        done += 1
    write_report(results, load_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
