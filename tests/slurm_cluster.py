"""A real one-host SLURM cluster for tests: munged + slurmctld + slurmd on 127.0.0.1, every file under one short
scratch directory (unix socket paths must stay under 108 bytes), nothing written to /etc or /run.

Measured facts behind the settings: /work/shared/notes/slurm-in-ci.md (root without systemd or cgroups,
proctrack/pgid, cred_expire=5 and a short scheduler interval so that a requeued job restarts in seconds).

    with SlurmCluster() as cluster:           # or cluster = SlurmCluster().start(); ...; cluster.stop()
        job = cluster.sbatch(["--wrap", "true"])
        cluster.wait(job, "COMPLETED")
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


def missing_tools() -> list[str]:
    found = []
    for tool in DAEMONS:
        if shutil.which(tool) is None and not any(Path(d, tool).exists() for d in ("/usr/sbin", "/sbin")):
            found.append(tool)
    return found


def _which(tool: str) -> str:
    return shutil.which(tool) or next(str(Path(d, tool)) for d in ("/usr/sbin", "/sbin") if Path(d, tool).exists())


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, cpus: int | None = None):
        self.cpus = cpus or os.cpu_count() or 1
        self.dir = Path(tempfile.mkdtemp(prefix="slm", dir="/tmp"))   # short: socket paths < 108 bytes
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in list(self.env):      # a cluster inside a SLURM job must not inherit that job's variables
            if k.startswith("SLURM_") and k != "SLURM_CONF":
                del self.env[k]

    # -- bring-up -----------------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(exist_ok=True)
        mem = 1024
        try:
            avail = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024
            mem = max(512, avail - 2048)
        except (OSError, AttributeError):
            pass
        self.conf.write_text(f"""\
ClusterName=thanora
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort=0
SlurmdPort=0
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _free_ports(self) -> None:
        text = self.conf.read_text()
        for key in ("SlurmctldPort", "SlurmdPort"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                text = text.replace(f"{key}=0", f"{key}={s.getsockname()[1]}")
        self.conf.write_text(text)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_conf()
        self._free_ports()
        d = self.dir
        run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True, env=self.env)
        run(_which("mungekey"), "--create", f"--keyfile={d}/munge.key", "--force")
        os.chmod(d / "munge.key", 0o600)
        run(_which("munged"), "--force", f"--key-file={d}/munge.key", f"--socket={d}/munge.sock",
            f"--pid-file={d}/munged.pid", f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge.seed")
        for name in ("slurmctld", "slurmd"):
            self.procs[name] = subprocess.Popen([_which(name), "-D", "-f", str(self.conf)], env=self.env,
                                                stdout=open(d / "log" / f"{name}.out", "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env).stdout
            if state.strip() == "idle":
                return self
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited {p.returncode}: {self.logs()}")
            if time.time() > deadline:
                raise SlurmError(f"node not idle after {timeout}s (sinfo: {state!r}): {self.logs()}")
            time.sleep(0.3)

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- jobs -----------------------------------------------------------------------------------------------
    def cmd(self, *args: str, check: bool = True, env: dict | None = None, cwd=None) -> str:
        proc = subprocess.run(list(args), capture_output=True, text=True, env=dict(self.env, **(env or {})), cwd=cwd)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> str:
        out = self.cmd("sbatch", "--parsable", *args, env=env, cwd=cwd)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """JobState, Restarts, ExitCode, ... of a job (no accounting here: scontrol, kept MinJobAge=600 s)."""
        text = self.cmd("scontrol", "show", "job", "-o", job_id, check=False)
        fields = {}
        for token in text.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait(self, job_id: str, timeout: float = 300, until=None) -> dict:
        """Poll until the job reaches a final state (or ``until(fields)`` is true); returns its fields."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if (until(info) if until else info.get("JobState") in FINAL_STATES):
                return info
            if time.time() > deadline:
                raise SlurmError(f"job {job_id} still {info.get('JobState')} after {timeout}s\n{self.logs()}")
            time.sleep(0.5)

    # -- teardown -------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel leftover jobs first (their processes would outlive slurmd), then stop the daemons by PID."""
        if self.procs:
            jobs = self.cmd("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.cmd("scancel", *jobs, check=False)
                deadline = time.time() + 30
                while self.cmd("squeue", "-h", "-o", "%i", check=False).split() and time.time() < deadline:
                    time.sleep(0.5)
            self.cmd("scontrol", "shutdown", check=False)
            for p in self.procs.values():
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.procs.clear()
        subprocess.run([_which("munged"), "--stop", f"--socket={self.dir}/munge.sock"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
