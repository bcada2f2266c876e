"""Nothing a user made is lost, through real launches: the output-directory lock, orphaned ranks, damaged
checkpoints and non-finite weights. Each recovery is checked against an uninterrupted run (losses and final
adapter weights to 1e-6)."""
import contextlib
import json
import os
import re
import shutil
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

STEPS = 6
EXACT = dict(thanora__dropout=0.0, train__adam_eps=1e-5, train__max_steps=STEPS, train__save_every=1)


def final_weights(out: Path) -> dict:
    return load_file(str(out / "final" / "adapter_weights.safetensors"))


def assert_same_run(out: Path, reference: Path, last: int = STEPS):
    """The last ``last`` logged losses and the final adapters equal the reference run's."""
    ours, theirs = read_metrics(out), read_metrics(reference)
    assert [m["step"] for m in ours][-last:] == list(range(STEPS - last + 1, STEPS + 1))
    assert [m["loss"] for m in ours][-last:] == pytest.approx([m["loss"] for m in theirs][-last:], abs=1e-6)
    a, b = final_weights(out), final_weights(reference)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted references: 2 ranks (torchrun) and one plain process."""
    refs = {}
    for nproc in (2, 0):
        tmp = tmp_path_factory.mktemp(f"straight{nproc}")
        launch(make_run(tmp, **EXACT), nproc)
        refs[nproc] = tmp / "out"
    return refs


def start(config: Path, *overrides: str, fault: str = "") -> subprocess.Popen:
    """torchrun with 2 ranks, THANORA_FAULT set."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "launchers" / "train.py"), "--config", str(config), *overrides]
    env = dict(launch_env(), THANORA_FAULT=fault)
    # a file, not a pipe: nobody reads a pipe while the run goes on, and ranks blocked on a full one would hang
    log = config.parent / f"launch-{time.time_ns()}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")[-4000:]


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    ckpt = out / "checkpoints" / f"step-{step:08d}" / "manifest.json"
    deadline = time.time() + timeout
    while not ckpt.is_file():
        assert proc.poll() is None, output(proc)
        assert time.time() < deadline, f"timeout waiting for step {step}:\n{output(proc)}"
        time.sleep(0.2)
    time.sleep(1.0)  # the save is renamed into place; let the ranks reach the pause


def test_second_run_refused_orphans_stop_and_a_stale_lock_is_taken_over(straight, tmp_path):
    config = make_run(tmp_path, **EXACT)
    out = tmp_path / "out"
    first = start(config, fault="pause_after:3")
    ranks = []
    try:
        wait_for_step(first, out, 3)
        ranks = psutil.Process(first.pid).children()
        assert len(ranks) == 2
        lock = json.loads((out / ".thanora.lock").read_text())
        # 1. a second run on the same output directory is refused, naming the first
        second = launch(config, 2, check=False)
        assert second.returncode != 0 and "RunLockedError" in second.stderr
        assert f"host {lock['host']} pid {lock['pid']}" in second.stderr and lock["pid"] in [r.pid for r in ranks]
        # 2. the launcher dies (kill -9): its ranks notice, checkpoint and stop instead of training on
        os.kill(first.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs(ranks, timeout=180)
        assert not alive, f"orphaned ranks kept running after their launcher died:\n{output(first)}"
        assert not (out / ".thanora.lock").read_text().strip()  # released, not left stale
        status = json.loads((out / "status.json").read_text())
        assert status["state"] == "stopped" and "launcher" in status["reason"] and status["step"] == 3, (status, output(first))
    finally:
        for p in [first.pid] + [r.pid for r in ranks if r.is_running()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    # 3. resumed, then everything killed with -9 (launcher and ranks): the lock is stale
    again = start(config, fault="pause_after:4")
    wait_for_step(again, out, 4)
    everyone = [psutil.Process(again.pid), *psutil.Process(again.pid).children(recursive=True)]
    for p in everyone:  # torchrun starts each rank in its own session: kill them one by one
        p.kill()
    psutil.wait_procs(everyone, timeout=30)
    assert json.loads((out / ".thanora.lock").read_text())["pid"]  # the dead holder's name is still written there
    # 4. a rerun takes the stale lock over and ends exactly where an uninterrupted run ends
    final = launch(config, 2)
    assert "taking over the lock of a run that is no longer running" in final.stderr, final.stderr[:3000]
    assert_same_run(out, straight[2])  # steps 1-3, 4 and 5-6 from three launches, each step once


def test_a_stop_asked_of_one_rank_stops_all_and_is_recorded_with_its_reason(tmp_path):
    """SIGUSR1 to rank 1 alone (a node's signal, one rank's launcher watch): every rank stops after the step, and
    status.json gives that rank's reason, not rank 0's empty one."""
    config = make_run(tmp_path, **EXACT)
    out = tmp_path / "out"
    run = start(config, fault="pause_after:2")
    try:
        wait_for_step(run, out, 2)
        ranks = psutil.Process(run.pid).children()
        rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGUSR1)
        run.wait(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGKILL)
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["step"], status["reason"]) == ("stopped", 2, "received SIGUSR1"), (status, output(run))


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
    """One plain process stopped after step 4 (checkpoints 3 and 4), copied by each damage case."""
    tmp = tmp_path_factory.mktemp("stopped")
    config = make_run(tmp, **EXACT)
    launch(config, 0, "train.stop_at_step=4")
    return config


@pytest.mark.parametrize("damage", ["truncated", "zero_byte", "garbage", "missing"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(straight, stopped_at_4, tmp_path, damage):
    config = tmp_path / "config.yaml"
    config.write_text(stopped_at_4.read_text().replace(str(stopped_at_4.parent / "out"), str(tmp_path / "out")))
    shutil.copytree(stopped_at_4.parent / "out", tmp_path / "out")
    step4 = tmp_path / "out" / "checkpoints" / "step-00000004"
    victim = next(step4.glob("*optim_states.pt")) if damage != "garbage" else step4 / "rank-00000.pt"
    size = victim.stat().st_size
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: size // 2])
    elif damage == "zero_byte":
        victim.write_bytes(b"")
    elif damage == "garbage":
        victim.write_bytes(os.urandom(size))
    else:
        victim.unlink()
    resumed = launch(config, 0)
    assert "step-00000004 is damaged, trying the previous one" in resumed.stderr and victim.name in resumed.stderr
    assert "resumed from" in resumed.stderr and "step-00000003 at step 3" in resumed.stderr
    assert (tmp_path / "out" / "checkpoints" / "corrupt-step-00000004" / "WHY.txt").is_file()  # set aside, kept
    assert_same_run(tmp_path / "out", straight[0], last=3)


@pytest.mark.parametrize("fault", ["nan_injected", "lr_overflow"])
def test_non_finite_weights_stop_with_exit_3_and_keep_the_last_good_checkpoint(tmp_path, fault):
    config = make_run(tmp_path, **EXACT)
    if fault == "nan_injected":  # 2 ranks: a NaN on rank 0's shard alone stops both
        proc = launch(config, 2, env_extra={"THANORA_FAULT": "nan_adapter:3"}, check=False)
        good = "step-00000002"
    else:
        proc = launch(config, 0, "train.lr=1e38", "train.warmup_steps=0", "train.max_grad_norm=0", check=False)
        good = None
    if fault == "nan_injected":  # the ranks exit 3; torchrun reports it and exits 1
        assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*3", proc.stderr), proc.stderr[-3000:]
        assert "non-finite weights after the optimizer step of step 3" in proc.stderr
    else:
        assert proc.returncode == 3 and "overflowed" in proc.stderr, proc.stderr[-3000:]
    ckpts = tmp_path / "out" / "checkpoints"
    assert ((ckpts / "latest").read_text() if good else None) == good
    assert not (ckpts / "step-00000003").exists()
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == (2 if good else 0)
