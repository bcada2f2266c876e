#!/usr/bin/env python
"""Method study on the image + text mixture (issue 15): plain LoRA against ThanoRA (its defaults) on the offline
LLaVA demo's stage 2, each at its own best learning rate, paired over 3 seeds.

    bash scripts/demo_llava.sh --stage1-only                      # once: runs/llava_demo/stage1_merged
    nohup nice -n 5 python benchmarks/llava_study.py >> benchmarks/results/llava_study/log.txt 2>&1 &  # resumable
    python benchmarks/llava_study.py --report-only                # rebuild the report
    python benchmarks/llava_study.py --nproc 1                    # one GPU (micro batch 8 on the one rank)

Each job is the stage 2 of configs/llava_demo_stage2.yaml (5 tasks: color, shape, yes/no about easy-VQA images,
sentiment and country_qa text; 80 steps of 8 over NPROC ranks, ZeRO-3; the projector trained at lr / 10) on the
stage-1 model, then its merge and `launchers/eval.py` of the merged model (score and eval loss per task). Seed s
sets data.seed (the text tasks' eval split, the previews, the data order), train.seed and thanora.init_seed; the
image tasks are scored on the same 200 held-out questions each for every seed. HASI's statistics are cached per
seed, so the sweep previews once per seed.

The plan, in priority order (a job's result file makes it done; an interrupted job resumes from its checkpoints):
both methods at lr 1e-3 (the demo's rate) on every seed (an early paired comparison), then the rest of the sweep
on seed 0, then seeds 1-2 at each method's selected rate (the lowest mean eval loss on seed 0). The report
(benchmarks/results/llava_study/report.md) pairs the methods per seed: mean difference with a 95 % t interval.
"""
from __future__ import annotations

import argparse
import json
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
from step_time import launch_command  # noqa: E402
from study import load_results  # noqa: E402
from study_report import fmt, interval  # noqa: E402

CONFIG = REPO / "configs" / "llava_demo_stage2.yaml"
BASE = REPO / "runs" / "llava_demo" / "stage1_merged"
IMAGE_TASKS = ["color", "shape", "yesno"]
TEXT_TASKS = ["sentiment", "country_qa"]
TASKS = IMAGE_TASKS + TEXT_TASKS
METHODS = {   # name: (overrides, description)
    "lora": (["thanora.mode=random", "thanora.allocation=uniform", "thanora.spr_lambda=0"],
             "plain LoRA (mode random, uniform, lambda 0)"),
    "thanora": ([], "ThanoRA, defaults (gamma_rule match_lora)"),
}
LRS = [1e-3, 3e-4, 3e-3]   # the first: every seed early
SEEDS = [0, 1, 2]
GLOBAL_BATCH = 8
SMOKE = False   # --smoke: 2 steps and 8 eval questions per task (checks the wiring, measures nothing)
smoke_overrides = ["train.max_steps=2", "train.warmup_steps=1", "data.preview_samples=4"]


def job_name(job: dict) -> str:
    return f"{job['method']}-lr{job['lr']:g}-seed{job['seed']}"


def train_overrides(job: dict, work: Path, cache: Path, nproc: int) -> list[str]:
    lr, seed = job["lr"], job["seed"]
    return [f"model.path={BASE}", f"train.output_dir={work}", f"train.lr={lr:g}", f"train.projector_lr={lr / 10:g}",
            f"train.seed={seed}", f"data.seed={seed}", f"thanora.init_seed={seed}", f"thanora.statistics_cache={cache}",
            f"train.micro_batch_size={GLOBAL_BATCH // nproc}", "train.save_every=20", "train.keep_last=1",
            "train.report_to=[]", *(smoke_overrides if SMOKE else []), *METHODS[job["method"]][0]]


def finished(work: Path) -> bool:
    status = work / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("state") == "finished"


def run_job(job: dict, work: Path, cache: Path, nproc: int, result_path: Path, env: dict) -> None:
    """Train, merge, evaluate; raises CalledProcessError on a failed step (its log names it)."""
    t0 = time.time()
    log = open(work / "log.txt", "a")

    def step(cmd: list[str]) -> None:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)

    if not finished(work):
        step(launch_command([str(REPO / "launchers" / "train.py"), "--config", str(CONFIG),
                             *train_overrides(job, work, cache, nproc)], nproc))
        if not finished(work):   # stopped early (a signal, the parent gone) exits 0: resume it, never score it
            raise SystemExit(f"{work}: training stopped before its last step; rerun to resume it")
    t_train = time.time() - t0
    merged, eval_dir = work / "merged", work / "eval"
    if not (eval_dir / "eval.json").is_file():
        if not (merged / "config.json").is_file():
            step([sys.executable, str(REPO / "launchers" / "merge.py"), str(work), "--out", str(merged), "--quiet"])
        step([sys.executable, str(REPO / "launchers" / "eval.py"), "--model", str(merged), "--out", str(eval_dir),
              "--batch-size", "32", *(["--limit", "8"] if SMOKE else [])])
    report = json.loads((eval_dir / "eval.json").read_text())
    timings = json.loads((work / "timings.json").read_text())
    result = {"job": job, "name": job_name(job), "commit": git_commit(), "nproc": nproc,
              "tasks": {t: {k: report["tasks"][t][k] for k in ("score", "loss", "n")} for t in TASKS},
              "train_seconds": t_train, "seconds": time.time() - t0, "hasi_seconds": timings.get("hasi_seconds", 0.0)}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(result_path)
    # the merged model (~0.6 GB) and the checkpoints can be rebuilt; final/ keeps the adapter, eval/ the predictions
    shutil.rmtree(merged, ignore_errors=True)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------
# The plan and the report

def mean_of(r: dict, key: str, tasks: list[str] = TASKS) -> float:
    return sum(r["tasks"][t][key] for t in tasks) / len(tasks)


def best_lr(method: str, runs: dict) -> float | None:
    """The learning rate of LRS with the lowest mean eval loss on seed 0 (None until all of them have run)."""
    found = [(mean_of(runs[n], "loss"), lr) for lr in LRS if (n := job_name({"method": method, "lr": lr, "seed": 0})) in runs]
    return min(found)[1] if len(found) == len(LRS) else None


def plan(runs: dict) -> list[dict]:
    jobs = [{"method": m, "lr": LRS[0], "seed": s} for s in SEEDS for m in METHODS]
    jobs += [{"method": m, "lr": lr, "seed": 0} for lr in LRS[1:] for m in METHODS]
    for m in METHODS:
        if (lr := best_lr(m, runs)) is not None:
            jobs += [{"method": m, "lr": lr, "seed": s} for s in SEEDS[1:]]
    return list({job_name(j): j for j in jobs}.values())


def write_report(results: Path, runs: dict) -> None:
    def row(label: str, rs: list[dict]) -> str:
        cells = [fmt(interval([r["tasks"][t]["score"] for r in rs])) + " / "
                 + fmt(interval([r["tasks"][t]["loss"] for r in rs])) for t in TASKS]
        return (f"| {label} | {len(rs)} | " + " | ".join(cells) + " | "
                + " | ".join(fmt(interval([mean_of(r, k, ts) for r in rs]), 4 if k == "loss" else 3)
                             for k, ts in (("score", IMAGE_TASKS), ("score", TEXT_TASKS), ("loss", TASKS))) + " |")

    def paired(rows: dict[str, dict[int, dict]]) -> list[str]:
        seeds = sorted(set(rows.get("lora", {})) & set(rows.get("thanora", {})))
        if not seeds:
            return []
        out = []
        for label, key, tasks, digits in (("image score", "score", IMAGE_TASKS, 3), ("text score", "score", TEXT_TASKS, 3),
                                          ("mean eval loss", "loss", TASKS, 4)):
            diffs = [mean_of(rows["thanora"][s], key, tasks) - mean_of(rows["lora"][s], key, tasks) for s in seeds]
            out.append(f"- {label}: {fmt(interval(diffs), digits, sign=True)} "
                       f"(per seed {', '.join(f'{d:+.{digits}f}' for d in diffs)})")
        return ["", f"ThanoRA − LoRA, paired over seeds {seeds}:", *out]

    header = ("| method | seeds | " + " | ".join(f"{t} score / loss" for t in TASKS)
              + " | image mean | text mean | mean eval loss |\n|---|---:|" + "---:|" * (len(TASKS) + 3))
    lines = ["# Method study on the image + text mixture (benchmarks/llava_study.py)", "",
             f"Rebuilt {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {len(runs)} finished jobs; commits "
             f"{', '.join(sorted({r['commit'] for r in runs.values()}))}.",
             "Stage 2 of configs/llava_demo_stage2.yaml on the stage-1 model (SmolLM2-135M + DINOv2-style ViT-S/14, "
             "fp32), 80 steps of 8, rank 16 on all 7 projections, projector at lr / 10; image tasks 200 held-out "
             "questions each, text tasks 75. Mean ± 95 % t interval over seeds.", "",
             "## 1. Learning-rate sweep (seed 0); selection rule: lowest mean eval loss", "", header]
    for m in METHODS:
        for lr in sorted(LRS):
            r = runs.get(job_name({"method": m, "lr": lr, "seed": 0}))
            mark = " **(best)**" if lr == best_lr(m, runs) else ""
            lines.append(row(f"{m} lr {lr:g}{mark}", [r]) if r else f"| {m} lr {lr:g} | (to run) |" + "|" * (len(TASKS) + 3))
    for title, lrs in ((f"## 2. Both at lr {LRS[0]:g}, every seed finished so far", {m: LRS[0] for m in METHODS}),
                       ("## 3. Each method at its selected learning rate", {m: best_lr(m, runs) for m in METHODS})):
        if any(lr is None for lr in lrs.values()):
            lines += ["", title, "", "(the sweep is not complete)"]
            continue
        rows = {m: {s: r for s in SEEDS if (r := runs.get(job_name({"method": m, "lr": lrs[m], "seed": s})))}
                for m in METHODS}
        lines += ["", title, "", header] + [row(f"{m} lr {lrs[m]:g}", list(rows[m].values())) for m in METHODS if rows[m]]
        lines += paired(rows)
    seconds = [r["seconds"] for r in runs.values()]
    lines += ["", f"Wall time per job: {min(seconds):.0f}-{max(seconds):.0f} s (NPROC "
              f"{sorted({r['nproc'] for r in runs.values()})}); per job files: `runs/<name>.json`."]
    (results / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "llava_study"))
    p.add_argument("--work", default=str(REPO / "runs" / "llava_study"))
    p.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC", "2")), help="ranks per job (GPUs or CPU ranks)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--max-jobs", type=int, default=0, help="stop after this many jobs (0: the whole plan)")
    p.add_argument("--smoke", action="store_true", help="2 steps, 8 eval questions per task: the wiring only "
                   "(use other --results/--work folders)")
    args = p.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    if GLOBAL_BATCH % args.nproc:
        p.error(f"--nproc {args.nproc}: must divide the global batch of {GLOBAL_BATCH}")
    results, work_root = Path(args.results).resolve(), Path(args.work).resolve()
    (results / "runs").mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(results, load_results(results))
        return 0
    if not (BASE / "config.json").is_file():
        p.error(f"{BASE}: no stage-1 model; run bash scripts/demo_llava.sh --stage1-only")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if not shutil.which("nvidia-smi"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    failed_file, done = results / "failed.txt", 0
    while not args.max_jobs or done < args.max_jobs:
        runs = load_results(results)
        failed = set(failed_file.read_text().split()) if failed_file.is_file() else set()
        job = next((j for j in plan(runs) if job_name(j) not in runs and job_name(j) not in failed), None)
        if job is None:
            break
        name, t0 = job_name(job), time.time()
        work = work_root / name
        work.mkdir(parents=True, exist_ok=True)
        print(f"[llava-study] {time.strftime('%H:%M:%S')} {name} ...", flush=True)
        try:
            run_job(job, work, work_root / "hasi_cache" / f"seed{job['seed']}", args.nproc,
                    results / "runs" / f"{name}.json", env)
        except subprocess.CalledProcessError as err:
            with open(failed_file, "a") as f:
                f.write(name + "\n")
            print(f"[llava-study] {name} FAILED (exit {err.returncode}: {' '.join(map(str, err.cmd))[:300]}); "
                  f"see {work / 'log.txt'}", flush=True)
            continue
        r = json.loads((results / "runs" / f"{name}.json").read_text())
        print(f"[llava-study] {name} done in {time.time() - t0:.0f}s: image {mean_of(r, 'score', IMAGE_TASKS):.3f} "
              f"text {mean_of(r, 'score', TEXT_TASKS):.3f} loss {mean_of(r, 'loss'):.4f}", flush=True)
        write_report(results, load_results(results))
        done += 1
    if load_results(results):
        write_report(results, load_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
