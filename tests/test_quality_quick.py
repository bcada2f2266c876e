"""Smoke test of the quality benchmark harness (benchmarks/quality.py) with a tiny LLaMA, not SmolLM2:
job planning, every configuration's run config through the real config loader, one real job end to end
(train with HASI + evaluate + table/plot/allocation copy), resume-by-skip, and the aggregation maths."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _quality():
    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from tiny_assets import make_llama_tokenizer
    from tiny_models import llama_config
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_model")
    tok = make_llama_tokenizer(d)
    cfg = llama_config(len(tok))
    cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_job_plan_and_run_configs_load(tiny_model, tmp_path):
    from thanora_ds.train_config import load_train_config

    q = _quality()
    full = q.MODES["full"]
    jobs = q.jobs_for(full, full["configs"], full["seeds"])
    names = [q.job_name(j["config"], j["seed"], j["task"]) for j in jobs]
    assert len(names) == len(set(names)) == 3 * (8 + len(q.TASKS))
    # the main comparison comes first, for every seed
    assert names[9:13] == [f"per_task_lora-{t}-seed0" for t in q.TASKS]
    assert names[:9] == [f"{c}-seed{s}" for s in (0, 1, 2) for c in ("base", "lora", "thanora")]
    for job in jobs:
        if job["config"] == "base":
            continue
        cfg_dict = q.run_config(full, job, str(tiny_model), str(tmp_path / "out"))
        path = tmp_path / "c.json"
        path.write_text(json.dumps(cfg_dict))
        cfg = load_train_config(path)   # unknown keys / bad values would raise here
        assert cfg.train.seed == cfg.thanora.init_seed == cfg.data.seed == job["seed"]
        if job["task"]:
            assert [s.path for s in cfg.data.sources] == [str(q.TASK_SOURCES[job["task"]][0])]
            assert cfg.train.max_steps == q.per_task_steps(full)
        else:
            assert len(cfg.data.sources) == 4 and cfg.train.max_steps == full["max_steps"]
        th = cfg.thanora
        if job["config"] in ("lora", "per_task_lora"):
            assert (th.mode, th.allocation, th.spr_lambda) == ("random", "uniform", 0.0)


def test_extra_configurations_and_long_mode(tiny_model, tmp_path):
    """N_t variants change data.preview_samples only for training (evaluation keeps the mode's split);
    --long trains 4x as many steps as --full on the same data and eval examples."""
    from thanora_ds.train_config import load_train_config

    q = _quality()
    full, long = q.MODES["full"], q.MODES["long"]
    for config, n_t in (("previews4", 4), ("previews64", 64), ("thanora", full["preview_samples"])):
        path = tmp_path / f"{config}.json"
        path.write_text(json.dumps(q.run_config(full, {"config": config, "seed": 1, "task": None}, str(tiny_model),
                                                str(tmp_path / "out"))))
        assert load_train_config(path).data.preview_samples == n_t
    assert q.data_section(full, 1, q.TASKS)["preview_samples"] == full["preview_samples"]
    path.write_text(json.dumps(q.run_config(full, {"config": "lora_lr1e-3", "seed": 0, "task": None}, str(tiny_model),
                                            str(tmp_path / "out"))))
    cfg = load_train_config(path)
    assert (cfg.train.lr, cfg.thanora.mode, cfg.thanora.spr_lambda) == (1e-3, "random", 0.0)
    assert long["max_steps"] == 4 * full["max_steps"] and long["eval_limit"] == full["eval_limit"]
    assert [j["config"] for j in q.jobs_for(long, long["configs"], [0])] == ["lora", "thanora", "no_spr"]


def test_one_job_end_to_end_and_resume(tiny_model, tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", "--configs", "thanora",
           "--model", str(tiny_model), "--max-length", "1024", "--results", str(results), "--work", str(work)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads((results / "runs" / "thanora-seed0.json").read_text())
    assert set(r["tasks"]) == {"gsm8k", "sentiment", "country_qa", "arithmetic"}
    assert all(0.0 <= v["score"] <= 1.0 and v["loss"] > 0 for v in r["tasks"].values())
    for f in ("table.md", "results.json", "quality.png", "allocation_thanora.png"):
        assert (results / f).is_file(), f
    assert not (work / "thanora-seed0" / "checkpoints").exists()   # deleted after evaluation
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode == 0 and "1 already done, 0 to run" in again.stdout


def test_aggregate_mean_std_and_paired_delta(tmp_path):
    q = _quality()
    settings = q.MODES["full"]
    (tmp_path / "runs").mkdir()

    def write(config, seed, scores, task=None):
        name = q.job_name(config, seed, task)
        tasks = {t: {"score": s, "loss": 1.0, "n": 4, "scorer": "x"} for t, s in scores.items()}
        (tmp_path / "runs" / f"{name}.json").write_text(json.dumps({"name": name, "tasks": tasks, "seconds": 10,
                                                                    "commit": "c"}))
    for seed, (a, b) in enumerate([(0.2, 0.3), (0.4, 0.6)]):
        write("lora", seed, {t: a for t in q.TASKS})
        write("thanora", seed, {t: b for t in q.TASKS})
        write("lora_lr1e-3", seed, {t: a + 0.1 for t in q.TASKS})
        for t in q.TASKS:
            write("per_task_lora", seed, {t: 1.0}, task=t)
    agg = q.aggregate(tmp_path, ["lora", "thanora", "per_task_lora", "lora_lr1e-3"], [0, 1, 2], settings)
    m, s, n = agg["thanora"]["stats"]["mean"]
    assert (round(m, 6), n) == (0.45, 2) and abs(s - 0.2121320) < 1e-6
    d = agg["thanora"]["delta_vs_lora"]
    assert abs(d[0] - 0.15) < 1e-9 and abs(d[1] - 0.0707107) < 1e-6 and d[2] == 2
    assert agg["per_task_lora"]["stats"]["mean"][:2] == (1.0, 0.0)
    text = q.markdown(agg, settings, {"mode": "full", "command": "x", "commit": "c", "job_seconds": 60, "n_done": 6,
                                      "n_jobs": 6, "when": "now", "seeds": [0, 1, 2]})
    assert "0.450 ± 0.212" in text and "+0.150 ± 0.071" in text
    assert "| lora_lr1e-3 | lora | +0.100 ± 0.000 | +0.000 ± 0.000 | 2 |" in text   # paired comparisons table
    assert "| lora_lr1e-3 | thanora | -0.050 ± 0.071 |" in text


def _llava_study():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("llava_study", REPO / "benchmarks" / "llava_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_llava_study_plans_the_sweep_then_the_selected_rates_and_pairs_seeds(tmp_path):
    """benchmarks/llava_study.py's plan, selection rule, run config (through the real loader) and paired report,
    on made-up results (its jobs themselves are the LLaVA demo's stage 2: benchmarks, not tests)."""
    from thanora_ds.train_config import load_train_config

    ls = _llava_study()
    # the stage-1 model (scripts/demo_llava.sh --stage1-only) is not in a fresh checkout: a stand-in folder
    ls.BASE = tmp_path / "stage1_merged"
    ls.BASE.mkdir()
    (ls.BASE / "config.json").write_text(json.dumps({"model_type": "llava"}))
    first = ls.plan({})
    assert [ls.job_name(j) for j in first[:6]] == [f"{m}-lr0.001-seed{s}" for s in (0, 1, 2) for m in ("lora", "thanora")]
    assert len(first) == 10 and all(j["seed"] == 0 for j in first[6:])   # then the rest of the sweep on seed 0
    cfg = load_train_config(ls.CONFIG, ls.train_overrides(first[0], tmp_path / "w", tmp_path / "c", nproc=1))
    assert (cfg.thanora.mode, cfg.thanora.spr_lambda, cfg.train.micro_batch_size, cfg.data.seed) == ("random", 0.0, 8, 0)
    cfg = load_train_config(ls.CONFIG, ls.train_overrides({"method": "thanora", "lr": 3e-4, "seed": 2},
                                                          tmp_path / "w", tmp_path / "c", nproc=2))
    assert (cfg.thanora.gamma_rule, cfg.train.lr, cfg.train.projector_lr, cfg.train.seed) == ("match_lora", 3e-4, 3e-5, 2)

    def result(method, lr, seed, loss, score):
        tasks = {t: {"score": score, "loss": loss, "n": 10} for t in ls.TASKS}
        return {"job": {"method": method, "lr": lr, "seed": seed}, "tasks": tasks, "commit": "x", "nproc": 2,
                "seconds": 1.0, "name": ls.job_name({"method": method, "lr": lr, "seed": seed})}

    losses = {("lora", 1e-3): 0.9, ("lora", 3e-4): 1.0, ("lora", 3e-3): 0.8,
              ("thanora", 1e-3): 0.7, ("thanora", 3e-4): 0.95, ("thanora", 3e-3): 0.85}
    runs = {r["name"]: r for (m, lr), loss in losses.items() for r in [result(m, lr, 0, loss, 0.5)]}
    runs |= {r["name"]: r for s in (1, 2) for r in [result("lora", 3e-3, s, 0.8 + s / 100, 0.5),
                                                    result("thanora", 1e-3, s, 0.7 + s / 50, 0.6)]}
    assert ls.best_lr("lora", runs) == 3e-3 and ls.best_lr("thanora", runs) == 1e-3
    names = [ls.job_name(j) for j in ls.plan(runs)]
    # thanora's selected rate is the first one, already run on every seed; lora's adds its seeds 1-2 at 3e-3
    assert names == [ls.job_name(j) for j in first] + ["lora-lr0.003-seed1", "lora-lr0.003-seed2"]
    (tmp_path / "runs").mkdir()
    ls.write_report(tmp_path, runs)
    report = (tmp_path / "report.md").read_text()
    section3 = report.split("## 3.")[1]
    # paired at the selected rates: per seed thanora - lora = -0.1, -0.09, -0.08 in loss; 0, +0.1, +0.1 in score
    assert "mean eval loss: -0.0900" in section3 and "per seed -0.1000, -0.0900, -0.0800" in section3
    assert "image score: +0.067" in section3 and "(per seed +0.000, +0.100, +0.100)" in section3
