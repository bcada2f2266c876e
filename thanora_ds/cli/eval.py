"""Per-task evaluation on the eval splits: greedy generation with the chat template, each task scored by the
scorer its data config names (exact_match, multiple_choice, numeric), plus per-task loss.

    python launchers/eval.py --model MERGED_DIR --out EVAL_DIR              (a merged model)
    python launchers/eval.py --checkpoint OUTPUT_DIR [--tag TAG] --out DIR  (a live training checkpoint, unmerged)
    python launchers/eval.py --checkpoint OUTPUT_DIR --zero-shot --out DIR  (its base model: the reference)
    python launchers/eval.py --model ANY_HF_DIR --data DATA.yaml --out DIR  (any model, any data config)

The data (and so the eval split) is, first found: --data (a data-section YAML such as data/demo/demo_data.yaml),
--config (a run config), the checkpoint's run config, or the thanora_run.json launchers/merge.py writes next to a
merged model. Writes EVAL_DIR/eval.json, eval.md (a Markdown table) and predictions.jsonl; prints the table and
the generation speed (tokens/s). One process; uses the GPU when there is one (--device).
Exit codes: 0 done, 2 bad arguments, checkpoint or data.
"""
import argparse
import json
import logging
import sys
from pathlib import Path



def data_config(args, run_config: dict | None):
    from thanora_ds.config import read_config_file
    from thanora_ds.data import DataConfig

    if args.data:
        return DataConfig.from_dict(read_config_file(args.data), base_dir=Path(args.data).resolve().parent)
    if args.config:
        raw = read_config_file(args.config)
        return DataConfig.from_dict(raw.get("data") or {}, base_dir=Path(args.config).resolve().parent)
    if run_config and run_config.get("data"):
        return DataConfig.from_dict(run_config["data"], base_dir=".")   # paths were made absolute at training
    raise ValueError("no data config: pass --data DATA.yaml or --config RUN.yaml")


def describe(args):
    """(run config or None, model folder, tokenizer/processor folder, checkpoint folder or None): cheap, read
    before anything is loaded so that a bad argument or data config is reported first."""
    from thanora_ds.checkpoint import Checkpoints
    from thanora_ds.export import RUN_INFO, find_checkpoint

    if args.checkpoint:
        path = find_checkpoint(args.checkpoint, args.tag)
        run_config = Checkpoints.read_meta(path).get("config") or {}
        model_cfg = run_config.get("model", {})
        return run_config, args.base or model_cfg.get("path", ""), model_cfg.get("processor_path"), path
    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {args.model}: not a Hugging Face model folder (no config.json)")
    info = path / RUN_INFO
    run_config = json.loads(info.read_text()).get("config") if info.is_file() else None
    return run_config, str(path), args.processor, None


def load_model(args, model_path: str, checkpoint):
    """(model, description)."""
    import torch
    from thanora_ds.export import build_adapted_model, load_checkpoint
    from thanora_ds.models import family_of_path

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if checkpoint is not None and not args.zero_shot:
        ckpt = load_checkpoint(checkpoint)
        model = build_adapted_model(ckpt, model_path, dtype)
        return model.to(args.device), f"checkpoint {ckpt.path} (step {ckpt.meta.get('step')}, unmerged adapters)"
    cls = family_of_path(model_path).auto_model_class()
    model = cls.from_pretrained(model_path, dtype=dtype, attn_implementation=args.attn_implementation).eval()
    what = f"base model {model_path} (zero-shot; run {checkpoint})" if checkpoint is not None else f"model {model_path}"
    return model.to(args.device), what


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face model folder (merged model, base model, ...)")
    src.add_argument("--checkpoint", help="a training output_dir (or checkpoint folder): evaluate it unmerged")
    parser.add_argument("--tag", default=None, help="with --checkpoint: latest (default), step-00000040 or 40")
    parser.add_argument("--zero-shot", action="store_true", help="with --checkpoint: evaluate its base model instead")
    parser.add_argument("--base", default=None, help="with --checkpoint: base model folder (default: run's model.path)")
    parser.add_argument("--processor", default=None, help="with --model: tokenizer/processor folder (default: model)")
    parser.add_argument("--data", default=None, help="data config YAML (the data: section of a run)")
    parser.add_argument("--config", default=None, help="run config YAML whose data: section to use")
    parser.add_argument("--out", required=True, help="folder for eval.json, eval.md, predictions.jsonl")
    parser.add_argument("--tasks", nargs="*", default=None, help="only these tasks")
    parser.add_argument("--limit", type=int, default=0, help="at most this many examples per task (0: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="generation cap for tasks whose data config sets no data.tasks.<task>.max_new_tokens")
    parser.add_argument("--no-loss", action="store_true", help="skip the per-task loss")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("thanora_ds")
    if args.zero_shot and not args.checkpoint:
        parser.error("--zero-shot goes with --checkpoint (with --model, just pass the base model folder)")

    import torch

    from thanora_ds.checkpoint import CheckpointError
    from thanora_ds.config import ConfigError
    from thanora_ds.data import DataValidationError, build_multitask_data
    from thanora_ds.evaluate import evaluate, markdown_table, write_report
    from thanora_ds.modeling import load_processor
    from thanora_ds.train_config import ModelConfig

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        run_config, model_path, processor_path, checkpoint = describe(args)
        from thanora_ds.models import family_of_path

        family_of_path(model_path, "--model" if args.model else "the checkpoint's model.path")   # refuses early
        cfg = data_config(args, run_config)
        tokenizer, processor = load_processor(ModelConfig(path=model_path, processor_path=processor_path))
        data = build_multitask_data(cfg, tokenizer=None if processor else tokenizer, processor=processor)
        unknown = sorted(set(args.tasks or []) - set(data.tasks))
        if unknown:
            raise ValueError(f"--tasks: {unknown} not in the data's tasks {data.tasks}")
        model, what = load_model(args, model_path, checkpoint)
        report = evaluate(model, data, tokenizer, args.batch_size, args.max_new_tokens, args.tasks, args.limit,
                          with_loss=not args.no_loss)
    except (CheckpointError, ConfigError, DataValidationError, ValueError, OSError) as err:
        log.error("%s: %s", type(err).__name__, err)
        return 2
    report["model"] = what
    write_report(report, args.out, title=what)
    print(markdown_table(report, what))
    g = report["generation"]
    if g["tokens_per_s"] is not None:
        print(f"generation: {g['tokens_per_s']:.1f} tokens/s ({g['tokens']} tokens, {g['seconds']:.1f} s, "
              f"batch {args.batch_size}, {args.device})")
    print(f"wrote {Path(args.out) / 'eval.json'}, eval.md, predictions.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
