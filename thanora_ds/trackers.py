"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow; rank 0 only.

Each goes through its own library, configured the way its users expect: W&B reads ``WANDB_PROJECT``,
``WANDB_MODE=offline`` and its other variables (``train.run_name`` names the run); MLflow logs to
``MLFLOW_TRACKING_URI`` when set, else to a local SQLite store ``OUTPUT/mlflow.db`` (MLflow 3 retired the plain
file store; ``mlflow ui --backend-store-uri sqlite:///OUTPUT/mlflow.db`` shows it), under the experiment
``MLFLOW_EXPERIMENT_NAME`` (default ``thanora_ds``). Metric names are the ones of metrics.jsonl
(``loss``, ``lr``, ``loss/<task>``, ``eval/loss/<task>``, ...); the run config goes in as the run's config
(W&B) or parameters (MLflow, flattened dotted keys).
"""
from __future__ import annotations

import os
from pathlib import Path

REPORT_TO = ("tensorboard", "wandb", "mlflow")


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = str(value)[:500]  # MLflow caps parameter values
    return out


class Trackers:
    def __init__(self, names: list[str], out: Path, run_name: str, config: dict):
        self.backends = []
        for name in names:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out / "tensorboard"))
                self.backends.append((lambda r, s, w=writer: [w.add_scalar(k if "/" in k else f"train/{k}", v, s)
                                                               for k, v in r.items()], writer.close))
            elif name == "wandb":
                import wandb

                run = wandb.init(project=os.environ.get("WANDB_PROJECT", "thanora_ds"), name=run_name,
                                 dir=str(out), config=config, resume="allow",
                                 id=os.environ.get("WANDB_RUN_ID") or _stable_id(out))
                self.backends.append((lambda r, s, run=run: run.log(r, step=s), run.finish))
            elif name == "mlflow":
                import mlflow

                if not os.environ.get("MLFLOW_TRACKING_URI"):
                    mlflow.set_tracking_uri(local_mlflow_uri(out))
                mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "thanora_ds"))
                run = _mlflow_run(mlflow, out, run_name)
                if not run.data.params:  # a resumed run has them already
                    mlflow.log_params(flatten(config), run_id=run.info.run_id)
                self.backends.append((lambda r, s, rid=run.info.run_id: mlflow.log_metrics(r, step=s, run_id=rid),
                                      lambda rid=run.info.run_id: mlflow.end_run()))

    def log(self, record: dict, step: int) -> None:
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for log, _ in self.backends:
            log(values, step)

    def close(self) -> None:
        for _, close in self.backends:
            close()
        self.backends = []


def local_mlflow_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def _stable_id(out: Path) -> str:
    """One W&B run per output directory, so that a resumed (requeued) run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]


def _mlflow_run(mlflow, out: Path, run_name: str):
    """The MLflow run of this output directory (resumed runs log into it), started active."""
    marker = out / "mlflow_run_id"
    if marker.is_file():
        run = mlflow.start_run(run_id=marker.read_text().strip())
    else:
        run = mlflow.start_run(run_name=run_name)
        marker.write_text(run.info.run_id)
    return mlflow.get_run(run.info.run_id)
