"""launchers/slurm/train.sbatch on a real one-host SLURM cluster (slurmctld + slurmd + munged on 127.0.0.1,
brought up by tests/slurm_cluster.py), and its launch command for 4 nodes x 8 GPUs against the environment
SLURM sets there (a fake scontrol, DRY_RUN=1).

The signal test sends the time-limit warning the deterministic way (scancel --batch --signal=USR1): the real
--signal=B:USR1@N timer fires up to 30 s early or late (slurmctld checks every 30 s, notes/slurm-in-ci.md).
"""
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from run_fixtures import REPO, make_run, read_metrics
from run_fixtures import launch_env as base_env
from slurm_cluster import SlurmCluster, missing_tools

SBATCH = REPO / "launchers" / "slurm" / "train.sbatch"
STEPS = 10
EXACT = dict(thanora__dropout=0.0, train__adam_eps=1e-5, train__max_steps=STEPS)


@pytest.fixture(scope="module")
def cluster():
    missing = missing_tools()
    if missing:
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)}): run scripts/ci_system_deps.sh")
    c = SlurmCluster(cpus=os.cpu_count()).start()
    yield c
    c.stop()


def submit(cluster, tmp: Path, config: Path, *args: str, env: dict | None = None) -> str:
    job_env = dict(base_env(), PYTHON=sys.executable, NPROC_PER_NODE="2", LOG_DIR=str(tmp / "logs"), **(env or {}))
    job_env.pop("MASTER_ADDR")      # the script must derive it from the allocation
    return cluster.sbatch([f"--cpus-per-task={os.cpu_count()}", "--time=10", f"--output={tmp}/slurm-%j.out",
                           str(SBATCH), str(config), *args], env=job_env, cwd=REPO)


def job_output(tmp: Path, job: str) -> str:
    text = (tmp / f"slurm-{job}.out").read_text(errors="replace") if (tmp / f"slurm-{job}.out").exists() else ""
    for f in sorted((tmp / "logs").glob("*")):
        text += f"\n--- {f.name}\n" + f.read_text(errors="replace")
    return text


@pytest.fixture(scope="module")
def straight_job(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sbatch1")
    config = make_run(tmp, **EXACT)
    job = submit(cluster, tmp, config)
    info = cluster.wait(job, timeout=400)
    return tmp, job, info


def test_sbatch_one_node_trains_to_the_end(straight_job):
    tmp, job, info = straight_job
    out = job_output(tmp, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert [m["step"] for m in read_metrics(tmp / "out")] == list(range(1, STEPS + 1))
    assert (tmp / "out" / "final" / "adapter_weights.safetensors").is_file()
    events = (tmp / "logs" / "events.log").read_text()
    assert "master 127.0.0.1:" in events          # NodeAddr of the (only) node, derived by the script
    assert "2 rank(s)" in events and "launcher exited with status 0" in events
    assert len(list((tmp / "logs").glob("node-*.log"))) == 1                  # one launcher per node, own log


def test_usr1_before_the_limit_checkpoints_requeues_and_resumes(cluster, straight_job, tmp_path):
    ref_tmp = straight_job[0]
    config = make_run(tmp_path, **EXACT)
    job = submit(cluster, tmp_path, config)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING") and time.time() < deadline, \
            f"{state}\n{job_output(tmp_path, job)}"
        time.sleep(0.2)
    cluster.cmd("scancel", "--batch", "--signal=USR1", job)     # what --signal=B:USR1@300 sends
    info = cluster.wait(job, timeout=400, until=lambda f: f.get("JobState") in ("COMPLETED", "FAILED",
                                                                                  "CANCELLED", "TIMEOUT")
                        and f.get("Restarts") != "0")
    out = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    events = (tmp_path / "logs" / "events.log").read_text()
    assert "[job %s run 0] received SIGUSR1" % job in events, events
    assert "[job %s run 0] requeueing" % job in events, events
    assert "[job %s run 1] start" % job in events, events
    # run 0 saved a checkpoint after the step in flight (k) and exited 0; run 1 resumed from it: each step once
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == list(range(1, STEPS + 1))
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", out)
    assert len(resumed) == 1, out
    k = int(resumed[0][1])
    assert 2 <= k < STEPS and Path(resumed[0][0]).name == f"step-{k:08d}"
    assert f"stopped at step {k}" in out
    # continuing from the checkpoint gives what the uninterrupted job gave
    ref = [m["loss"] for m in read_metrics(ref_tmp / "out")]
    assert [m["loss"] for m in read_metrics(tmp_path / "out")] == pytest.approx(ref, abs=1e-5)
    a = load_file(str(tmp_path / "out" / "final" / "adapter_weights.safetensors"))
    b = load_file(str(ref_tmp / "out" / "final" / "adapter_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_four_nodes_of_eight_gpus_launch_command(tmp_path):
    """The multi-node command derived from the environment SLURM sets in a 4-node, 8-GPU job (DRY_RUN)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        "#!/bin/bash\n"
        "if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu001\\ngpu002\\ngpu003\\ngpu004\\n'; exit 0; fi\n"
        "if [[ $1 == show && $2 == node ]]; then echo \"NodeName=$4 NodeAddr=10.1.0.$((10#${4#gpu})) State=ALLOCATED\"; exit 0; fi\n"
        "exit 1\n")
    (fake / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(tmp_path), "DRY_RUN": "1",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "thanora", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_JOB_NUM_NODES": "4", "SLURM_NNODES": "4",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96", "LOG_DIR": str(tmp_path / "logs")}
    out = subprocess.run(["bash", str(SBATCH), "cfg.yaml", "train.max_steps=3"], env=env, capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    head, cmd = out.stdout.splitlines()[:2]
    assert head == "MASTER_ADDR=10.1.0.1 MASTER_PORT=24242 NNODES=4 NPROC_PER_NODE=8"
    argv = shlex.split(cmd)
    assert argv[:3] == ["srun", "--nodes=4", "--ntasks-per-node=1"]
    assert argv[argv.index("bash"):argv.index("bash") + 2] == ["bash", "-c"]
    inner = argv[argv.index("-c") + 1]
    assert '--node_rank="$SLURM_NODEID"' in inner          # expanded by each node's own shell
    rest = argv[argv.index("-c") + 2:]
    for flag in ("--nnodes=4", "--nproc_per_node=8", "--master_addr=10.1.0.1", "--master_port=24242",
                 "--shutdown-timeout=600"):
        assert flag in rest, rest
    assert any(a.startswith("--signals-to-handle=") and "SIGUSR1" in a for a in rest)
    assert rest[-4:] == [str(REPO / "launchers" / "train.py"), "--config", "cfg.yaml", "train.max_steps=3"]
    # LAUNCHER=srun: one task per GPU, MPI plugin as asked
    env.update(LAUNCHER="srun", SRUN_MPI="pmix")
    out = subprocess.run(["bash", str(SBATCH), "cfg.yaml"], env=env, capture_output=True, text=True, cwd=tmp_path)
    argv = shlex.split(out.stdout.splitlines()[1])
    assert "--ntasks-per-node=8" in argv and "--mpi=pmix" in argv and argv[-2:] == ["--config", "cfg.yaml"]


def test_sbatch_header_asks_for_the_warning_signal_and_requeue():
    head = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@300" in head
    assert "#SBATCH --requeue" in head and "#SBATCH --open-mode=append" in head
