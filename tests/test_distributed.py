"""launchers/train.py under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), checked against a single process.

ZeRO-3 runs with stage3_param_persistence_threshold=0 so that every parameter, adapters included, is really
sharded. One 2-rank run of 2k steps (module fixture) serves as the reference for several tests.
"""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from run_fixtures import REPO, free_port, launch, launch_env, make_run, read_metrics

K = 3          # steps before the interruption
STEPS = 2 * K
# Adam maps the sign of ANY gradient entry, even one that is pure rounding noise (true value ~0), to a
# +-lr update in its first steps; two correct summation orders (a ring reduce-scatter vs one sum) then
# differ by 2 lr in such entries. adam_eps=1e-5 keeps noise-level entries still and leaves real ones alone,
# so the comparison checks the distributed maths, not Adam's noise amplification (measured: eps 1e-8 ->
# 1e-2 max weight difference in entries with ~0 gradient, eps 1e-5 -> 2e-6).
EXACT = dict(thanora__dropout=0.0, train__adam_eps=1e-5, train__max_steps=STEPS)


def final_weights(out: Path) -> dict:
    return load_file(str(out / "final" / "adapter_weights.safetensors"))


def assert_same_weights(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """2 ranks, ZeRO-3, activation checkpointing, SPR, dropout 0 (so a single process can replay it exactly)."""
    tmp = tmp_path_factory.mktemp("straight")
    config = make_run(tmp, **EXACT)
    launch(config, 2)
    return tmp, config


def reference_run(tmp: Path, steps: int, world: int = 2) -> tuple[list[float], dict, list[float]]:
    """The same training in one plain PyTorch process, no DeepSpeed: it replays what each of the ``world``
    ranks would see (its sampler shard) and averages their gradients, as data parallelism does."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thanora_ds.config import from_dict
    from thanora_ds.config import ThanoraConfig
    from thanora_ds.data import DataConfig, build_multitask_data, collate_batch, preview_batches
    from thanora_ds.hasi import common_prefix_length
    from thanora_ds.initializer import run_hasi
    from thanora_ds.inject import inject_thanora, spr_loss
    from thanora_ds.trainer import cosine_schedule, token_losses

    raw = yaml.safe_load((tmp / "config.yaml").read_text())
    tr = raw["train"]
    tok = AutoTokenizer.from_pretrained(raw["model"]["path"])
    data = build_multitask_data(DataConfig.from_dict(raw["data"], tmp), tokenizer=tok)
    model = AutoModelForCausalLM.from_pretrained(raw["model"]["path"], dtype=torch.float32)
    th = from_dict(ThanoraConfig, raw["thanora"])
    adapters = inject_thanora(model, th, len(data.tasks))
    prefix = common_prefix_length([ex["input_ids"] for t in data.tasks for ex in data.preview[t]])
    run_hasi(model, adapters, th, data.tasks, lambda t: preview_batches(data, data.tasks[t], 3), prefix)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tr["lr"], eps=tr["adam_eps"], weight_decay=0.0)
    sched = cosine_schedule(opt, tr["warmup_steps"], tr["max_steps"], 0.0)
    samplers = [data.make_sampler(r, world) for r in range(world)]
    draws = [iter(s) for s in samplers]

    def draw(r):
        try:
            return next(draws[r])
        except StopIteration:
            draws[r] = iter(samplers[r])
            return next(draws[r])
    gas, mbs = tr["gradient_accumulation_steps"], tr["micro_batch_size"]
    model.train()
    out_losses, norms = [], []
    for _ in range(steps):
        step_loss = 0.0
        for _ in range(gas):
            for r in range(world):
                batch = collate_batch([data.train_example(*draw(r)) for _ in range(mbs)], data.pad_token_id)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                per_token = token_losses(logits, batch["labels"])
                task_loss = per_token.sum() / (batch["labels"][:, 1:] != -100).sum()
                spr = spr_loss(adapters.values())
                loss = task_loss if spr is None else task_loss + th.spr_lambda * spr
                (loss / (gas * world)).backward()
                step_loss += loss.item() / (gas * world)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, tr["max_grad_norm"])))
        opt.step()
        sched.step()
        opt.zero_grad()
        out_losses.append(step_loss)
    weights = {}
    for name, a in adapters.items():
        weights[f"{name}.lora_A"] = a.lora_A.detach().clone()
        weights[f"{name}.lora_B"] = a.lora_B.detach().clone()
    return out_losses, weights, norms


def test_zero3_two_ranks_match_single_process_without_deepspeed(straight):
    tmp, _ = straight
    ref_losses, ref_weights, ref_norms = reference_run(tmp, STEPS)
    metrics = read_metrics(tmp / "out")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m, ref, norm in zip(metrics, ref_losses, ref_norms):
        assert m["loss"] == pytest.approx(ref, abs=1e-5)
        assert m["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert metrics[-1]["spr"] > 0   # SPR really was on
    # built the ZeRO-3 way: each of the 2 ranks held about half of the model right after from_pretrained
    timings = json.loads((tmp / "out" / "timings.json").read_text())
    assert timings["parameters_on_rank0_after_load"] <= timings["parameters"] / 2 + 64
    assert_same_weights(final_weights(tmp / "out"), ref_weights)
    # per-task losses are logged for every task, in metrics.jsonl and TensorBoard
    assert {k for k in metrics[-1] if k.startswith("loss/")} == {"loss/color", "loss/count", "loss/story"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp / "out" / "tensorboard")).Reload()
    assert {"train/loss", "train/spr", "train/grad_norm", "loss/story"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == STEPS


def test_hasi_is_world_size_invariant(tmp_path):
    """HASI alone (lr 0: the one step leaves the blocks as initialized) on 1 and on 2 ranks."""
    results = []
    for nproc in (1, 2):
        config = make_run(tmp_path / f"w{nproc}", train__lr=0.0, train__max_steps=1, thanora__mode="orthogonal")
        launch(config, nproc)
        out = tmp_path / f"w{nproc}" / "out"
        results.append((json.loads((out / "allocation.json").read_text()), final_weights(out)))
    (alloc1, w1), (alloc2, w2) = results
    assert alloc1["ranks"] == alloc2["ranks"]
    assert alloc1["token_counts"] == alloc2["token_counts"]
    for e1, e2 in zip(alloc1["entropy"], alloc2["entropy"]):
        assert e1 == pytest.approx(e2, abs=1e-5)
    assert_same_weights(w1, w2)
    assert any(len(set(r)) > 1 for r in alloc1["ranks"])  # a real, non-uniform split was compared
    assert (tmp_path / "w2" / "out" / "allocation.png").is_file()


def test_exact_resume(straight, tmp_path):
    tmp, _ = straight
    config = make_run(tmp_path, **EXACT)
    launch(config, 2, f"train.stop_at_step={K}")
    assert len(read_metrics(tmp_path / "out")) == K
    assert not (tmp_path / "out" / "final").exists()
    launch(config, 2)
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == list(range(1, STEPS + 1))
    assert losses(tmp_path / "out") == pytest.approx(losses(tmp / "out"), abs=1e-6)
    assert_same_weights(final_weights(tmp_path / "out"), final_weights(tmp / "out"), atol=1e-6)


def test_exact_resume_with_dropout_and_corda(tmp_path):
    """Dropout RNG and sampler position are restored per rank; corda's residual base is rebuilt on resume."""
    runs = {}
    for name in ("straight", "resumed"):
        config = make_run(tmp_path / name, thanora__dropout=0.2, thanora__mode="corda", train__max_steps=4)
        if name == "resumed":
            launch(config, 2, "train.stop_at_step=2")
        launch(config, 2)
        runs[name] = tmp_path / name / "out"
    assert losses(runs["resumed"]) == pytest.approx(losses(runs["straight"]), abs=1e-6)
    assert_same_weights(final_weights(runs["resumed"]), final_weights(runs["straight"]), atol=1e-6)


def test_kill_during_checkpoint_write_resumes_from_previous(straight, tmp_path):
    tmp, _ = straight
    config = make_run(tmp_path, **EXACT, train__save_every=2)
    crashed = launch(config, 2, env_extra={"THANORA_FAULT": "after_engine_save:4"}, check=False)
    assert crashed.returncode != 0
    ckpts = tmp_path / "out" / "checkpoints"
    assert (ckpts / ".tmp-step-00000004").is_dir()              # the interrupted write is there ...
    assert (ckpts / "latest").read_text() == "step-00000002"     # ... but latest still names step 2
    launch(config, 2)
    steps = [m["step"] for m in read_metrics(tmp_path / "out")]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]                     # steps 3-4 were redone after the crash
    assert not (ckpts / ".tmp-step-00000004").exists()
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000004", "step-00000006"]  # keep_last=2
    assert losses(tmp_path / "out")[-4:] == pytest.approx(losses(tmp / "out")[-4:], abs=1e-6)
    assert_same_weights(final_weights(tmp_path / "out"), final_weights(tmp / "out"), atol=1e-6)


@pytest.mark.parametrize("variant", ["bf16", "zero2"])
def test_bf16_and_zero2_train_with_decreasing_loss(tmp_path, variant):
    extra = {"model__dtype": "bf16"} if variant == "bf16" else {}
    config = make_run(tmp_path, train__max_steps=8, train__lr=2e-2, **extra)
    args = ["deepspeed.config=ds_configs/zero2.json", "deepspeed.overrides={}"] if variant == "zero2" else []
    launch(config, 2, *args)
    values = losses(tmp_path / "out")
    assert len(values) == 8 and all(math.isfinite(v) for v in values)
    assert sum(values[-2:]) / 2 < sum(values[:2]) / 2 - 0.1


def test_sigterm_checkpoints_exits_zero_and_next_launch_resumes(tmp_path):
    config = make_run(tmp_path, train__max_steps=40)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "launchers" / "train.py"), "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    for w in workers:           # as SLURM does on preemption: every task gets the signal
        w.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-4000:]
    stopped_at = len(read_metrics(tmp_path / "out"))
    assert 2 <= stopped_at < 40
    ckpt = tmp_path / "out" / "checkpoints" / f"step-{stopped_at:08d}"
    assert (ckpt / "thanora_meta.json").is_file()
    launch(config, 2)
    steps = [m["step"] for m in read_metrics(tmp_path / "out")]
    assert steps == list(range(1, 41))
    assert (tmp_path / "out" / "final" / "adapter_weights.safetensors").is_file()


def test_checkpoint_from_another_run_is_refused_before_model_load(tmp_path):
    config = make_run(tmp_path, train__max_steps=2)
    launch(config, 0)  # one plain process, no launcher at all
    proc = launch(config, 0, "thanora.rank=12", "train.max_steps=4", check=False)
    assert proc.returncode == 2
    assert "comes from another run" in proc.stderr and "thanora" in proc.stderr
    assert "Loading weights" not in proc.stderr  # refused before the model was loaded
    # (another world size is not another run: tests/test_resume_reshape.py resumes it through the universal form)


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    config = make_run(tmp_path, train__max_steps=6, train__lr=1e6, train__max_grad_norm=0.0, train__warmup_steps=0)
    proc = launch(config, 0, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite" in proc.stderr and "before the optimizer step" in proc.stderr
    steps = read_metrics(tmp_path / "out")
    assert len(steps) < 6 and all(math.isfinite(m["loss"]) for m in steps)


def test_llava_two_ranks_with_text_only_and_image_batches(tmp_path):
    """One rank's micro-batch may have images while the other's is text-only (3 text tasks + 1 image task):
    ZeRO-3's collectives must still match (HASI previews and training), and the projector trains."""
    config = make_run(tmp_path, llava=True, train__max_steps=4, train__micro_batch_size=1,
                      train__gradient_accumulation_steps=2)
    launch(config, 2)
    values = losses(tmp_path / "out")
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    weights = final_weights(tmp_path / "out")
    assert any("multi_modal_projector" in k for k in weights)
