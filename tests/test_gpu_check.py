"""scripts/gpu_check.sh is wired: its dry run (CPU, ~25 s) passes every step and writes the JSON and Markdown."""
import json
import os
import subprocess
import sys

from run_fixtures import REPO

STEPS = ["install", "model", "tests", "train", "flash", "hasi", "peers"]


def run(out, **env):
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(out)], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable, **env}, capture_output=True, text=True,
                          timeout=300, check=False)


def test_gpu_check_dry_run_wires_every_step(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert [s["step"] for s in report["steps"]] == STEPS
    assert all(s["exit"] == "0" for s in report["steps"]), report["steps"]
    assert "DRY RUN" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_reports_a_broken_step(tmp_path):
    """A Python that cannot run anything fails every Python step, and the script's exit code says so."""
    proc = run(tmp_path, PYTHON="false")
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout
