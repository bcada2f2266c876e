"""Fine-tune a LLaMA / LLaVA model on many tasks at once with ThanoRA under DeepSpeed.

    deepspeed --num_gpus 8 launchers/train.py --config CONFIG.yaml [section.key=value ...]
    torchrun --nproc_per_node 8 launchers/train.py --config CONFIG.yaml ...
    mpirun -n 8 python launchers/train.py --config CONFIG.yaml ...     (or srun under SLURM)
    python launchers/train.py --config CONFIG.yaml ...                 (one process)
    python launchers/train.py --config CONFIG.yaml --check             (validate config, data, checkpoint; no model)

Exit codes: 0 finished or checkpointed on SIGTERM/SIGUSR1 (resume with the same command), 2 bad config, data
or checkpoint, or the output directory in use by another run (nothing expensive was started), 3 non-finite loss,
gradient or weights (nothing saved after the last good checkpoint). OUTPUT/status.json says how a run ended.
"""
import argparse
import logging
import os
import sys

from thanora_ds.cli import quiet_library_warnings



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML or JSON run config")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, the data (record by record) and the resume checkpoint, then exit "
                             "without loading the model (0: all good, 2: a named problem)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=10 thanora.rank=8")
    args = parser.parse_args(argv)
    quiet_library_warnings()
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID") or "0"
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")

    from thanora_ds.checkpoint import CheckpointError
    from thanora_ds.config import ConfigError
    from thanora_ds.data import DataValidationError
    from thanora_ds.run_lock import RunLockedError
    from thanora_ds.train_config import load_train_config
    from thanora_ds.trainer import NonFiniteError, train

    from thanora_ds.distributed import shutdown

    try:
        cfg = load_train_config(args.config, args.overrides)
        train(cfg, check_only=args.check)
    except (ConfigError, DataValidationError, CheckpointError, RunLockedError) as err:
        logging.getLogger("thanora_ds").error("%s: %s", type(err).__name__, err)
        return 2
    except NonFiniteError as err:
        logging.getLogger("thanora_ds").error("%s", err)
        return 3
    finally:
        shutdown()  # the exit code is the one above, not an abort in a live process group's destructor
    return 0


if __name__ == "__main__":
    sys.exit(main())
