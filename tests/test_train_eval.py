"""train.eval_every: per-task eval loss (and scores) during a 2-rank ZeRO-3 run, sharded over the ranks, equal to
launchers/eval.py on the same checkpoint in one process."""
import json

import pytest

from run_fixtures import launch, make_run
from test_merge_eval import run_script


def test_eval_during_training_equals_the_eval_launcher_on_the_same_checkpoint(tmp_path):
    config = make_run(tmp_path, train__max_steps=4, train__save_every=2, train__eval_every=2,
                      train__eval_generate=True, train__eval_max_new_tokens=4)
    launch(config, 2)
    out = tmp_path / "out"
    logged = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 2, 4]
    # mechanism metrics (thanora_ds.mechanism): HASI's task blocks start orthogonal, with B = 0 no update yet
    start, logged = logged[0], logged[1:]
    assert start["mech/row_overlap"] < 1e-6 and start["mech/effective_rank"] == 0.0
    assert not any(k.startswith("eval/") for k in start)
    assert logged[-1]["mech/effective_rank"] > 1 and 0 <= logged[-1]["mech/update_overlap"] <= 1
    assert sum(logged[-1][f"mech/task_share/{t}"] for t in ("color", "count", "story")) == pytest.approx(1.0)
    mechanism = json.loads((out / "final" / "mechanism.json").read_text())
    assert len(mechanism["layers"]) == 14 and mechanism["tasks"] == ["color", "count", "story"]
    assert json.loads((out / "eval" / "step-00000004.json").read_text())["step"] == 4
    run_script("eval.py", "--checkpoint", str(out), "--tag", "4", "--max-new-tokens", "4", "--out", str(tmp_path / "e"))
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    tasks = sorted(report["tasks"])
    assert tasks == ["color", "count", "story"]
    last = logged[-1]
    for task in tasks:
        assert last[f"eval/loss/{task}"] == pytest.approx(report["tasks"][task]["loss"], abs=1e-5), task
        assert last[f"eval/score/{task}"] == report["tasks"][task]["score"], task
    # the very same greedy answers, example by example (the scores of a tiny random model are all 0)
    during = json.loads((out / "eval" / "step-00000004.json").read_text())["tasks"]
    after = [json.loads(line) for line in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert sorted((t, p["id"], p["prediction"]) for t in tasks for p in during[t]["predictions"]) == \
        sorted((p["task"], p["id"], p["prediction"]) for p in after)
    assert any(p["prediction"] for p in after)
    # the step-2 evaluation saw other weights: the loss moved
    assert any(logged[0][f"eval/loss/{t}"] != last[f"eval/loss/{t}"] for t in tasks)
