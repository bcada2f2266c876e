"""Multi-node launches on one machine, each checked against one node with the same total ranks (2), fp32:

* torchrun with c10d rendezvous, two "nodes" (two torchrun processes, --nnodes 2, 1 rank each) on 127.0.0.1;
* the DeepSpeed launcher with a two-host hostfile (--no_ssh: one launch per "node", as on a cluster without
  passwordless ssh; with ssh the launcher starts the same thing on every host itself);
* mpirun -n 2: ranks from OMPI_COMM_WORLD_*, master port chosen by rank 0 and broadcast with mpi4py.

Plus the launcher-environment mapping (MPI / srun variables) and the dist.* NCCL/gloo config keys.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from run_fixtures import REPO, free_port, launch, make_run, read_metrics
from run_fixtures import launch_env as base_env

STEPS = 4
EXACT = dict(thanora__dropout=0.0, train__adam_eps=1e-5, train__max_steps=STEPS)  # see test_distributed.py
TRAIN = str(REPO / "launchers" / "train.py")


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out)]


def assert_same_run(out: Path, ref: Path, atol=1e-5):
    assert [m["step"] for m in read_metrics(out)] == list(range(1, STEPS + 1))
    assert losses(out) == pytest.approx(losses(ref), abs=atol)
    a = load_file(str(out / "final" / "adapter_weights.safetensors"))
    b = load_file(str(ref / "final" / "adapter_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def run_all(cmds: list[list[str]], env: dict, timeout: int = 400) -> None:
    """Start every command at once (one per "node"), wait for all; fail with their output."""
    logs = [open(os.devnull, "w")]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        logs[0].close()
    bad = [(c, p.returncode, o) for c, p, o in zip(cmds, procs, outs) if p.returncode != 0]
    assert not bad, "\n".join(f"{c[:6]} exited {rc}\n{o[-5000:]}" for c, rc, o in bad)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: one torchrun, one node, 2 ranks."""
    tmp = tmp_path_factory.mktemp("one_node")
    launch(make_run(tmp, **EXACT), 2)
    return tmp / "out"


def test_torchrun_c10d_two_nodes_on_loopback_match_one_node(one_node, tmp_path):
    config = make_run(tmp_path, **EXACT)
    port = free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes",
             "--local_addr=127.0.0.1", TRAIN, "--config", str(config)] for _ in range(2)]
    run_all(cmds, base_env())
    assert_same_run(tmp_path / "out", one_node)


def test_deepspeed_launcher_hostfile_two_nodes_match_one_node(one_node, tmp_path):
    config = make_run(tmp_path, **EXACT)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")     # names only: --no_ssh starts nothing remotely
    port = free_port()
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmds = [[sys.executable, deepspeed, f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={i}",
             "--master_addr=127.0.0.1", f"--master_port={port}", TRAIN, "--config", str(config)]
            for i in range(2)]
    run_all(cmds, base_env())
    assert_same_run(tmp_path / "out", one_node)


def mpirun() -> str:
    path = shutil.which("mpirun")
    if path is None:
        pytest.skip("mpirun not installed (apt-get install openmpi-bin libopenmpi-dev: scripts/ci_system_deps.sh)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py not installed (pip install -e .[mpi]: scripts/ci_system_deps.sh)")
    return path


def test_mpirun_two_ranks_match_torchrun(one_node, tmp_path):
    config = make_run(tmp_path, **EXACT)
    env = base_env()
    env.pop("MASTER_ADDR")      # rank 0 chooses address and port, mpi4py broadcasts them
    cmd = [mpirun(), "--allow-run-as-root", "--oversubscribe", "-np", "2", "--bind-to", "none",
           "-x", "OMP_NUM_THREADS", "-x", "GLOO_SOCKET_IFNAME", "-x", "PYTHONUNBUFFERED", "-x", "HF_HUB_OFFLINE",
           "-x", "TOKENIZERS_PARALLELISM", sys.executable, TRAIN, "--config", str(config)]
    env.update(OMPI_MCA_btl="self,tcp", OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo",
               OMPI_MCA_plm_rsh_agent="")
    run_all([cmd], env)
    assert_same_run(tmp_path / "out", one_node)


# --------------------------------------------------------------------------------------------------------
# Launcher environment and dist.* settings (no training)

def adopt(env: dict) -> dict:
    """adopt_launcher_environment() in a fresh interpreter with exactly ``env``'s launcher variables."""
    code = ("import json, os; from thanora_ds.distributed import adopt_launcher_environment as a; "
            "n = a(); print(json.dumps(dict(launcher=n, **{k: os.environ[k] for k in "
            "('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')})))")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OMPI_", "PMI", "SLURM_", "MASTER_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], env=dict(clean, **env), cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_launcher_environment_mapping(tmp_path):
    # Open MPI on one host, master given by the user
    got = adopt({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                 "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"})
    assert got == dict(launcher="ompi", RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="10.0.0.5",
                       MASTER_PORT="1234")
    # an srun task of a 2-node step: master = first node's NodeAddr (scontrol), port from the job id
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/bash\n[[ $2 == hostnames ]] && printf 'n7\\nn8\\n' && exit 0\n"
                                   "echo NodeName=$4 NodeAddr=10.9.0.7\n")
    (fake / "scontrol").chmod(0o755)
    slurm = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_ID": "77",
             "SLURM_JOB_NODELIST": "n[7-8]"}
    assert adopt(slurm) == dict(launcher="slurm", RANK="5", WORLD_SIZE="8", LOCAL_RANK="1",
                                MASTER_ADDR="10.9.0.7", MASTER_PORT="20077")
    # the batch script's own shell (SLURM_PROCID=0, SLURM_NTASKS=allocation, no step): a single process,
    # not rank 0 of 8 waiting for 7 ranks that never come
    batch = {k: v for k, v in slurm.items() if k not in ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES")}
    batch["SLURM_PROCID"] = "0"
    single = adopt(batch)
    port = int(single.pop("MASTER_PORT"))  # a free port, so that single-process runs can share a machine
    assert single == dict(launcher="single", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    assert 0 < port < 65536
    # torchrun / deepspeed launcher variables win over MPI ones
    got = adopt({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "9",
                 "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert got["launcher"] == "torch" and got["RANK"] == "1"


def test_multinode_mpi_without_master_or_mpi4py_is_an_error():
    code = ("import sys, os; sys.modules['mpi4py'] = None; from thanora_ds.distributed import "
            "adopt_launcher_environment as a; a()")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "MASTER_"))}
    env.update(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="16", OMPI_COMM_WORLD_LOCAL_SIZE="8")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "MASTER_ADDR" in out.stderr and "mpi4py" in out.stderr


def test_dist_config_keys_set_nccl_and_gloo_environment(monkeypatch):
    from thanora_ds.config import ConfigError, from_dict
    from thanora_ds.distributed import apply_dist_settings
    from thanora_ds.train_config import DistConfig

    default = DistConfig()
    assert default.environment() == {}          # nothing set: the environment / library defaults stay
    cfg = from_dict(DistConfig, {"socket_ifname": "eth1", "nccl_debug": "info", "nccl_debug_subsys": "INIT,NET",
                                 "torch_distributed_debug": "detail", "nccl_ib_disable": True,
                                 "env": {"NCCL_NET_GDR_LEVEL": "PHB", "TORCH_NCCL_ASYNC_ERROR_HANDLING": 1}},
                    "dist")
    assert cfg.environment() == {"NCCL_SOCKET_IFNAME": "eth1", "GLOO_SOCKET_IFNAME": "eth1", "NCCL_DEBUG": "INFO",
                                 "NCCL_DEBUG_SUBSYS": "INIT,NET", "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
                                 "NCCL_IB_DISABLE": "1", "NCCL_NET_GDR_LEVEL": "PHB",
                                 "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    # NCCL's exclusion syntax is not gloo's: gloo is left alone
    assert "GLOO_SOCKET_IFNAME" not in DistConfig(socket_ifname="^docker0,lo").environment()
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    changed = apply_dist_settings(DistConfig(nccl_debug="TRACE", socket_ifname="lo"))
    assert changed == {"NCCL_DEBUG": "TRACE", "NCCL_SOCKET_IFNAME": "lo"} and os.environ["NCCL_DEBUG"] == "TRACE"
    for bad in ({"backend": "mpi"}, {"nccl_debug": "LOUD"}, {"timeout_minutes": 0},
                {"torch_distributed_debug": "yes"}, {"env": {"NOT A NAME": 1}}):
        with pytest.raises(ConfigError, match=f"dist.{next(iter(bad))}"):
            from_dict(DistConfig, bad, "dist")
