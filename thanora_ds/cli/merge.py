"""Merge a ThanoRA training run into its base model, or export it as a PEFT LoRA adapter. CPU, one process.

    python launchers/merge.py OUTPUT_DIR --out MERGED_DIR [--tag TAG] [--base BASE_DIR] [--dtype bf16]
    python launchers/merge.py OUTPUT_DIR --out ADAPTER_DIR --adapter-only

--out must be a new (or empty) folder; --overwrite replaces, in an existing one, only the files merge writes.
It may never be, contain or lie inside the base model or the checkpoints. The output appears only once complete.

OUTPUT_DIR is the run's train.output_dir (or its checkpoints/ folder, or one checkpoint folder); TAG picks a
checkpoint (latest by default; step-00000040 or 40). The checkpoint may come from any number of ranks: DeepSpeed's
ZeRO partitions are reassembled here without GPUs or a distributed launch. The base model is the run's
model.path unless --base names another copy of it; a base that is not the trained one is refused.

The merged folder is a plain Hugging Face model (safetensors shards, config, generation config, tokenizer or
processor), streamed tensor by tensor: RAM holds one output shard (--max-shard-size) and the adapters.

Exit codes: 0 done, 2 bad checkpoint / base model / arguments.
"""
import argparse
import logging
import sys
import time
from pathlib import Path



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="training output_dir, its checkpoints/ folder, or a checkpoint folder")
    parser.add_argument("--out", required=True, help="folder to write (created; must be new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing --out, replacing only the files merge writes")
    parser.add_argument("--allow-other-weights", action="store_true",
                        help="accept a base whose weights digest differs from the trained one (e.g. re-saved in bf16)")
    parser.add_argument("--tag", default=None, help="checkpoint: latest (default), step-00000040 or 40")
    parser.add_argument("--base", default=None, help="base model folder (default: the run's model.path)")
    parser.add_argument("--adapter-only", action="store_true", help="write a PEFT LoRA adapter instead")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="cast the merged weights (default: the base model files' dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("thanora_ds")

    from thanora_ds.checkpoint import CheckpointError, Checkpoints
    from thanora_ds.config import ConfigError
    from thanora_ds.export import export_adapter, find_checkpoint, load_checkpoint, output_folder, stream_merge

    t0 = time.time()
    try:
        path = find_checkpoint(args.output_dir, args.tag)
        meta = Checkpoints.read_meta(path)
        base = args.base or (meta.get("config") or {}).get("model", {}).get("path", "")
        log.info("checkpoint %s (step %s, written by %s rank(s)), base %s", path, meta.get("step"),
                 meta.get("world_size"), base)
        if not base or not Path(base).is_dir():
            raise CheckpointError(f"base model {base!r} not found (the run's model.path); pass --base")
        protected = [base, path] + ([path.parent] if path.parent.name == "checkpoints" else [])
        with output_folder(args.out, protected, args.overwrite) as partial:
            ckpt = load_checkpoint(path)
            if args.adapter_only:
                stats = export_adapter(ckpt, base, partial, args.allow_other_weights)
            else:
                stats = stream_merge(ckpt, base, partial, args.max_shard_size, args.dtype, progress=not args.quiet,
                                     allow_other_weights=args.allow_other_weights)
    except (CheckpointError, ConfigError, ValueError, OSError) as err:
        log.error("%s: %s", type(err).__name__, err)
        return 2
    kind = "PEFT adapter" if args.adapter_only else "merged model"
    print(f"wrote {kind} to {args.out} in {time.time() - t0:.1f}s: {stats}")
    print(f"peak memory (max RSS): {stats['peak_rss_mb']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
