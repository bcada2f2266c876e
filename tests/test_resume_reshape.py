"""Resume at another world size or micro-batch through DeepSpeed's universal checkpoint: 2 ranks -> 1 and 1 -> 2,
against an uninterrupted run with the same global batch (losses and adapters within 1e-5).

Every record has the same number of tokens, so a step's loss (the mean of the ranks' per-token means) is the same
whichever way the global batch is split over ranks and micro-batches; the sampler draws the same global sequence.
The adapters themselves are not compared entry by entry: another split of the batch sums the gradients in another
order, and Adam turns that rounding noise in near-zero gradients (the A blocks' first steps, while B is ~0) into
+-lr updates of single entries, as tests/test_distributed.py documents; the losses of the steps after the resume,
which depend on the restored weights and Adam moments, agree to 1e-5."""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from run_fixtures import launch, make_run, read_metrics

EXACT = dict(thanora__dropout=0.0, train__adam_eps=1e-5, train__max_steps=6, train__save_every=1,
             train__micro_batch_size=2, train__gradient_accumulation_steps=1)
TWO_RANKS = ["train.micro_batch_size=2"]
ONE_RANK = ["train.micro_batch_size=4"]   # the same global batch of 4 on one rank


def equal_length_data(config: Path) -> None:
    """Replace the run's data by two tasks whose records all encode to the same number of tokens."""
    from transformers import AutoTokenizer

    from thanora_ds.data.encode import Encoder
    from thanora_ds.data.records import Record
    cfg = yaml.safe_load(config.read_text())
    tok = AutoTokenizer.from_pretrained(cfg["model"]["path"])
    encoder = Encoder(tok, None, 64)
    letters = "abcdefghijklmnopqrstuvwxyz"
    by_length: dict[int, list[tuple[str, str, str]]] = {}
    for i in range(2000):
        task = ("spell", "echo")[i % 2]
        prompt = f"{task}: " + " ".join(letters[(i * k + 3) % 26] for k in (1, 7, 11))
        answer = letters[(i * 5) % 26] if task == "spell" else letters[(i * 3 + 1) % 26]
        rec = Record(str(i), task, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        enc = encoder.encode(rec)
        n_labels = sum(1 for l in enc.labels if l != -100)
        by_length.setdefault((len(enc.input_ids), n_labels), []).append((task, prompt, answer))
    records = max(by_length.values(), key=len)
    counts = Counter(t for t, _, _ in records)
    assert min(counts.values()) >= 24, counts
    path = config.parent / "data" / "equal.jsonl"
    kept = [r for t in ("spell", "echo") for r in [x for x in records if x[0] == t][:24]]
    path.write_text("".join(json.dumps({"id": f"{t}-{i}", "task": t, "prompt": p, "response": a}) + "\n"
                            for i, (t, p, a) in enumerate(kept)))
    cfg["data"]["sources"] = [{"path": str(path), "format": "prompt_response"}]
    config.write_text(yaml.safe_dump(cfg))


def run(tmp: Path) -> Path:
    config = make_run(tmp, **EXACT)
    equal_length_data(config)
    return config


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out)}  # the resumed run's steps overwrite nothing


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    launch(run(tmp), 2, *TWO_RANKS)
    return tmp / "out"


@pytest.mark.parametrize("first,then", [((2, TWO_RANKS), (0, ONE_RANK)), ((0, ONE_RANK), (2, TWO_RANKS))],
                         ids=["2_to_1", "1_to_2"])
def test_resume_at_another_world_size_matches_an_uninterrupted_run(straight, tmp_path, first, then):
    config = run(tmp_path)
    launch(config, first[0], *first[1], "train.stop_at_step=3")
    resumed = launch(config, then[0], *then[1])
    assert "resuming through DeepSpeed's universal checkpoint" in resumed.stderr
    assert "converted step-00000003 to DeepSpeed's universal checkpoint" in resumed.stderr
    assert not (tmp_path / "out" / "checkpoints" / "universal" / "step-00000003").exists()  # pruned with step 3
    ours, ref = losses(tmp_path / "out"), losses(straight)
    assert sorted(ours) == list(range(1, 7))
    assert [ours[s] for s in range(1, 7)] == pytest.approx([ref[s] for s in range(1, 7)], abs=1e-5)
    final = load_file(str(tmp_path / "out" / "final" / "adapter_weights.safetensors"))
    assert final.keys() == load_file(str(straight / "final" / "adapter_weights.safetensors")).keys()
    assert all(bool(torch.isfinite(v).all()) for v in final.values())
    meta = json.loads((tmp_path / "out" / "checkpoints" / "step-00000006" / "thanora_meta.json").read_text())
    assert meta["layout"]["world_size"] == (then[0] or 1)
