"""A LLaVA-665K-shaped file trains as it is: no `task` field (a task rule names the tasks), nested image paths,
text-only records, a leading `gpt` turn (dropped, as LLaVA's preprocessing does, and counted per task), a truncated
image (skipped with a count under skip_invalid), integer ids."""
import json
import logging

import pytest
import yaml
from PIL import Image

from run_fixtures import launch, make_run, read_metrics
from thanora_ds.data import DataConfig, DataValidationError, load_records

FOLDERS = {"coco": "coco/train2017", "gqa": "gqa/images", "ocr_vqa": "ocr_vqa/images", "textvqa": "textvqa/train_images",
           "vg": "vg/VG_100K"}


def write_665k(folder, n_per_source=6):
    images = folder / "images"
    records = []
    for s, (source, sub) in enumerate(FOLDERS.items()):
        (images / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_source):
            name = f"{sub}/{i:06d}.jpg"
            Image.new("RGB", (40 + 4 * i, 30), (40 * s, 20 * i, 90)).save(images / name)
            records.append({"id": f"{source}_{i}" if i % 2 else 1000 * s + i, "image": name, "conversations": [
                {"from": "human", "value": "<image>\nWhat colour dominates?" if i % 3 else "Describe it.\n<image>"},
                {"from": "gpt", "value": ["red", "green", "blue"][(s + i) % 3]}]})
    for i in range(n_per_source):  # ShareGPT: text only
        records.append({"id": f"sharegpt_{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                                 {"from": "gpt", "value": str(i)}]})
    records[1]["conversations"].insert(0, {"from": "gpt", "value": "A stray answer first."})
    cut = images / FOLDERS["vg"] / "000003.jpg"
    cut.write_bytes(cut.read_bytes()[:200])
    (folder / "llava_v1_5_mix665k.json").write_text(json.dumps(records))
    return folder / "llava_v1_5_mix665k.json", images


def source(path, **kw):
    return dict({"path": str(path), "format": "llava", "task_from": "image_folder", "text_task": "sharegpt",
                 "task_map": {"textvqa": "ocr", "ocr_vqa": "ocr"}}, **kw)


def test_task_rule_names_the_tasks_and_drops_leading_gpt_turns(tmp_path, caplog):
    path, images = write_665k(tmp_path)
    cfg = DataConfig.from_dict({"sources": [source(path)], "image_folder": str(images), "skip_invalid": True},
                               tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = load_records(cfg)
    assert {t: len(r) for t, r in loaded.by_task.items()} == {"coco": 6, "gqa": 6, "ocr": 12, "sharegpt": 6, "vg": 5}
    assert loaded.skipped == {"vg": 1}                                   # the truncated image, counted per task
    first = next(r for r in loaded.by_task["coco"] if r.id == "coco_1")
    assert [m["role"] for m in first.messages] == ["user", "assistant"]  # the leading gpt turn is gone
    assert "leading gpt turns dropped, as LLaVA's preprocessing does: 1; per task: coco=1" in caplog.text
    # with the rule a file of records without `task` is fine; without it each record is named as a problem
    with pytest.raises(DataValidationError, match="field 'task': missing task"):
        load_records(DataConfig.from_dict({"sources": [{"path": str(path)}], "image_folder": str(images)}, tmp_path))


def test_only_gpt_turns_is_an_error(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"id": 1, "conversations": [{"from": "gpt", "value": "x"}]}]))
    with pytest.raises(DataValidationError, match="no human turn: nothing trainable is left"):
        load_records(DataConfig.from_dict({"sources": [source(tmp_path / "d.json")]}, tmp_path))


def test_field_rule_and_bad_rule(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": 1, "source": "qa", "prompt": "p", "response": "r"}) + "\n")
    cfg = DataConfig.from_dict({"sources": [{"path": str(tmp_path / "d.jsonl"), "task_from": "field:source"}]}, tmp_path)
    assert list(load_records(cfg).by_task) == ["qa"]
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.task_from: 'folder' is neither"):
        DataConfig.from_dict({"sources": [{"path": "x.json", "task_from": "folder"}]}, tmp_path)


def test_a_665k_shaped_file_trains_as_it_is(tmp_path):
    config = make_run(tmp_path, llava=True, train__max_steps=2)
    path, images = write_665k(tmp_path / "mix")
    cfg = yaml.safe_load(config.read_text())
    cfg["data"].update(sources=[source(path)], image_folder=str(images), skip_invalid=True, preview_samples=2,
                       eval_samples=1)
    config.write_text(yaml.safe_dump(cfg))
    proc = launch(config, 0)
    assert "per task: vg=1" in proc.stderr and "leading gpt turns dropped" in proc.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2]
    allocation = json.loads((tmp_path / "out" / "allocation.json").read_text())
    assert allocation["tasks"] == ["coco", "gqa", "ocr", "sharegpt", "vg"]
