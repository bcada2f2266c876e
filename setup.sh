#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with thanora_ds and its test tools.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU wheel (TORCH_SPEC) so that pip
# never pulls a multi-GB CUDA build; with a GPU, pip's default (CUDA) torch is kept or installed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
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
"$VENV/bin/python" -c "import torch, deepspeed, transformers, thanora_ds; print('thanora_ds ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
