"""train.report_to: TensorBoard, W&B (offline mode) and MLflow (local SQLite store) each receive the per-step loss,
per-task loss, lr and eval metrics; read back with each tool's own reader and compared with metrics.jsonl."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from run_fixtures import launch, make_run, read_metrics

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def wandb_history(out: Path) -> dict[int, dict]:
    """History rows of the offline W&B run, read with W&B's own transaction-log reader (`wandb leet inspect`)."""
    run_dir = next((out / "wandb").glob("offline-run-*"))
    wandb_cli = Path(sys.executable).parent / "wandb"
    text = subprocess.run([str(wandb_cli), "leet", "inspect", str(run_dir), "--json"], capture_output=True, text=True,
                          check=True, timeout=120).stdout
    rows: dict[int, dict] = {}
    for line in text.splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("type") == "history":
            item = record["history"]["item"]
            rows.setdefault(int(item["_step"]), {}).update(item)
    return rows


def test_wandb_mlflow_and_tensorboard_receive_the_metrics(tmp_path):
    config = make_run(tmp_path, train__max_steps=3, train__eval_every=2, train__report_to=["tensorboard", "wandb", "mlflow"],
                      train__run_name="tracked")
    launch(config, 0, env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": ""})
    out = tmp_path / "out"
    train = {m["step"]: m for m in read_metrics(out)}
    evals = {m["step"]: m for m in map(json.loads, (out / "eval.jsonl").read_text().splitlines())}
    # step 0: the mechanism metrics as HASI left the blocks (no eval loss yet)
    assert sorted(train) == [1, 2, 3] and sorted(evals) == [0, 2, 3] and "eval/loss/count" not in evals[0]
    keys = ["loss", "lr", "loss/count", "loss/story"]
    eval_keys = ["eval/loss/count", "eval/loss/color"]

    # MLflow, local store OUTPUT/mlflow.db
    from mlflow.tracking import MlflowClient
    from thanora_ds.trackers import local_mlflow_uri
    client = MlflowClient(tracking_uri=local_mlflow_uri(out))
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).data.params["thanora.rank"] == "8"
    for key in keys:
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert history == pytest.approx({s: train[s][key] for s in train if key in train[s]}), key
    for key in eval_keys:
        assert {m.step: m.value for m in client.get_metric_history(run_id, key)} == \
            pytest.approx({s: evals[s][key] for s in evals if key in evals[s]}), key

    # Weights & Biases, offline run under OUTPUT/wandb
    rows = wandb_history(out)
    for step, record in train.items():
        for key in keys:
            if key in record:
                assert rows[step][key] == pytest.approx(record[key]), (step, key)
    for step, record in evals.items():
        for key in eval_keys + ["mech/row_overlap"]:
            if key in record:
                assert rows[step][key] == pytest.approx(record[key]), (step, key)

    # TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([train[s]["loss"] for s in (1, 2, 3)])
    assert [e.step for e in events.Scalars("eval/loss/count")] == [2, 3]
    assert [e.step for e in events.Scalars("mech/row_overlap")] == [0, 2, 3]
