"""One run per output directory: rank 0 holds ``OUTPUT/.thanora.lock`` for the run's lifetime.

The lock is an OS file lock (``fcntl.lockf``, POSIX record locks, which NFSv4 and Lustre mounted with
``flock`` also honour across hosts), so it is released by the kernel however the holder dies (kill -9, OOM,
node reboot): a lock nobody holds is stale by definition and is taken over, with a warning naming the
previous holder. The file's text says who holds it (host, pid, SLURM job, start time) for the message a second
run gets. A SLURM requeue of the same job id waits a short while for its previous incarnation to let go.
Where the filesystem has no locks at all (ENOLCK), the text decides: a holder on this host whose pid is gone,
or the same SLURM job, is stale; anything else is taken as live.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("thanora_ds")
LOCK_NAME = ".thanora.lock"


class RunLockedError(RuntimeError):
    """Another live run uses this output directory."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')}{job}, started {holder.get('started')}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError) as err:
        return isinstance(err, PermissionError)
    return True


class OutputLock:
    def __init__(self, output_dir: str | Path, requeue_wait_s: float = 120.0):
        self.path = Path(output_dir) / LOCK_NAME
        self.requeue_wait_s = requeue_wait_s
        self.fd: int | None = None

    def _read(self) -> dict:
        os.lseek(self.fd, 0, os.SEEK_SET)
        text = os.read(self.fd, 1 << 16).decode("utf-8", "replace").strip()
        try:
            return json.loads(text) if text else {}
        except ValueError:
            return {"host": "?", "pid": "?", "started": f"unreadable lock text {text[:60]!r}"}

    def _try_lock(self) -> bool | None:
        """True: locked; False: held by a live process; None: this filesystem has no locks."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                return False
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        me = _me()
        deadline = time.time() + self.requeue_wait_s
        while True:
            state = self._try_lock()
            holder = self._read()
            if state is None:  # no OS locks here: judge by the holder's text
                same_job = me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]
                dead_here = holder.get("host") == me["host"] and not _pid_alive(holder.get("pid"))
                state = not holder or same_job or dead_here
            if state:
                break
            requeue = me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]
            if requeue and time.time() < deadline:  # the previous incarnation of this job is still shutting down
                time.sleep(2.0)
                continue
            os.close(self.fd)
            self.fd = None
            raise RunLockedError(
                f"{self.path.parent} is in use by another run ({_describe(holder)}); two runs must not share an "
                f"output directory. Wait for it, stop it, or set another train.output_dir. (If that run is "
                f"certainly gone and this filesystem has no file locks, delete {self.path}.)")
        if holder:
            log.warning("output directory %s: taking over the lock of a run that is no longer running (%s)",
                        self.path.parent, _describe(holder))
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, (json.dumps(me) + "\n").encode())
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # an empty lock file is a free one
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
