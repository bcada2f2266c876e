"""train.num_epochs: every training record is trained on exactly once per epoch across the ranks, also across a
resume, with the schedule and the step count following the epochs."""
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from run_fixtures import launch, make_run, read_metrics
from thanora_ds.trainer import epoch_micro_sizes


def test_epoch_micro_sizes_cover_the_epoch_evenly():
    assert epoch_micro_sizes(18, 2, 2) == [2] * 8 + [1] * 2          # 5 steps of 2 micro-batches, 18 draws
    assert epoch_micro_sizes(16, 4, 2) == [4] * 4
    for draws, mb, ga in [(17, 4, 4), (9, 8, 2), (100, 3, 1), (7, 7, 1)]:
        sizes = epoch_micro_sizes(draws, mb, ga)
        assert sum(sizes) == draws and max(sizes) <= mb and min(sizes) >= 1 and len(sizes) % ga == 0
    with pytest.raises(ValueError, match="fewer than the 4 micro-batches"):
        epoch_micro_sizes(3, 8, 4)


def train_ids(config: Path) -> list[str]:
    """The ids of the training split, built the way the trainer builds it."""
    from transformers import AutoTokenizer

    from thanora_ds.data import DataConfig, build_multitask_data
    cfg = yaml.safe_load(config.read_text())
    tok = AutoTokenizer.from_pretrained(cfg["model"]["path"])
    data = build_multitask_data(DataConfig.from_dict(cfg["data"], config.parent), tokenizer=tok)
    return sorted(ex["id"] for t in data.tasks for ex in data.train[t])


def visits(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "trace").glob("rank-*.jsonl")) for line in f.read_text().splitlines()]


TRACE = {"THANORA_TRACE_SAMPLES": "1"}


def test_two_epochs_on_two_ranks_visit_every_record_once_per_epoch(tmp_path):
    config = make_run(tmp_path, train__max_steps=None, train__num_epochs=2)
    launch(config, 2, "data.mixing=natural", env_extra=TRACE)
    ids = train_ids(config)
    steps = read_metrics(tmp_path / "out")
    per_epoch = len(steps) // 2
    assert [m["step"] for m in steps] == list(range(1, 2 * per_epoch + 1))
    for epoch in range(2):
        seen = Counter(i for v in visits(tmp_path / "out") if epoch * per_epoch < v["step"] <= (epoch + 1) * per_epoch
                       for i in v["ids"])
        assert sorted(seen) == ids and set(seen.values()) == {1}, f"epoch {epoch}: {seen}"
    lrs = [m["lr"] for m in steps]  # the schedule spans both epochs: peak after warmup, near 0 at the last step
    assert max(lrs) == pytest.approx(5e-3) and lrs[-1] < 0.05 * max(lrs) and lrs[len(lrs) // 2] > 0.3 * max(lrs)


def test_one_epoch_across_a_resume_visits_every_record_exactly_once(tmp_path):
    config = make_run(tmp_path, train__max_steps=None, train__num_epochs=1)
    launch(config, 2, "data.mixing=natural", "train.stop_at_step=2", env_extra=TRACE)
    assert len(read_metrics(tmp_path / "out")) == 2
    launch(config, 2, "data.mixing=natural", env_extra=TRACE)
    seen = Counter(i for v in visits(tmp_path / "out") for i in v["ids"])
    assert sorted(seen) == train_ids(config) and set(seen.values()) == {1}
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == status["max_steps"]
