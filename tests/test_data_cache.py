"""The data cache (thanora_ds/data/cache.py) and the image token count from the processor's configuration.

A second start with the same data reads no record, opens and decodes no image, renders and tokenizes nothing
(counted here by wrapping the tokenizer, the chat template, PIL's decoder and the image check) and takes well under
a second; it reports the same skips and notices. A change of a data file, of the encoding settings, of the
tokenizer or of an image rebuilds; damaged entries are rebuilt with a warning; two ranks build once.
"""
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest
import torch
from PIL import Image, ImageFile

import thanora_ds.data.encode as encode
import thanora_ds.data.multitask as multitask
import thanora_ds.data.records as records
from run_fixtures import REPO, free_port, launch_env
from thanora_ds.data import DataConfig, build_multitask_data
from thanora_ds.data.cache import MANIFEST, RECORDS, TOKENS, prune
from thanora_ds.data.image_tokens import fixed_image_token_count
from thanora_ds.typed_config import ConfigError
from tiny_assets import IMAGE_TOKENS_PER_IMAGE, LLAVA_HF_CHAT_TEMPLATE, make_llama_tokenizer, make_llava_processor


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return make_llava_processor(tmp_path_factory.mktemp("proc"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_llama_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def counts(monkeypatch, proc, tok):
    """Counters of the expensive calls: tokenizer calls, chat template renders, image decodes, image checks, files
    read."""
    n = Counter()

    def wrap(owner, name, key):
        original = getattr(owner, name)

        def counted(*a, **k):
            n[key] += 1
            return original(*a, **k)

        monkeypatch.setattr(owner, name, counted)

    for cls in {type(proc.tokenizer), type(tok)}:
        wrap(cls, "__call__", "tokenize")
        wrap(cls, "apply_chat_template", "render")
    wrap(type(proc), "__call__", "tokenize")
    wrap(type(proc), "apply_chat_template", "render")
    wrap(encode, "load_image", "decode")                       # one image decoded (and converted to RGB)
    wrap(ImageFile.ImageFile, "load", "pil_load")              # any decoding by PIL at all
    wrap(records, "image_problem", "image_check")
    wrap(multitask, "load_records", "read")
    return n


def write_llava(folder, n_images=12, n_text=6):
    """An LLaVA JSON file: images of several sizes, text-only records, a leading gpt turn, a truncated image."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n_images):
        Image.new("RGB", (40 + 3 * i, 30 + i), (20 * i, 90, 200 - 10 * i)).save(folder / "img" / f"{i}.jpg")
        recs.append({"id": i, "image": f"img/{i}.jpg", "task": "look" if i % 2 else "see", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?" if i % 3 else "Describe.\n<image>"},
            {"from": "gpt", "value": ["red", "green", "blue"][i % 3]}]})
    for i in range(n_text):
        recs.append({"id": f"t{i}", "task": "chat", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                                     {"from": "gpt", "value": str(i)}]})
    recs[1]["conversations"].insert(0, {"from": "gpt", "value": "A stray answer first."})
    cut = folder / "img" / f"{min(5, n_images - 1)}.jpg"  # an odd index: task look
    cut.write_bytes(cut.read_bytes()[:150])
    path = folder / "mix.json"
    path.write_text(json.dumps(recs))
    return path


def config(folder, path, **kw):
    return DataConfig.from_dict(dict({"sources": [{"path": str(path), "format": "llava"}], "image_folder": str(folder),
                                      "skip_invalid": True, "preview_samples": 2, "eval_samples": 1,
                                      "cache_dir": str(folder / "cache")}, **kw), folder)


def every_example(data):
    return {(t, split, i): {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in ex.items()}
            for t in data.tasks for split in ("train", "preview", "eval")
            for i, ex in enumerate(getattr(data, split)[t])}


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_second_start_reads_decodes_and_tokenizes_nothing(tmp_path, proc, counts, caplog):
    path = write_llava(tmp_path)
    cfg = config(tmp_path, path)
    with caplog.at_level(logging.WARNING, logger="thanora_ds.data"):
        first = build_multitask_data(cfg, processor=proc)
    built, first_warnings = dict(counts), warnings_of(caplog)
    assert first.cache.status == "built"
    # 11 valid image records and 6 text records encoded; one image decoded: the check of the configured count
    assert built["read"] == 1 and built["image_check"] == 12 and built["tokenize"] > 17 and built["decode"] == 1, built
    assert first.skipped == {"look": 1}                                   # the truncated image
    assert any("leading gpt turns dropped" in w for w in first_warnings)

    counts.clear()
    caplog.clear()
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="thanora_ds.data"):
        second = build_multitask_data(config(tmp_path, path), processor=proc)
    seconds = time.perf_counter() - t0
    assert second.cache.status == "hit"
    assert sum(counts.values()) == 0, dict(counts)                         # no read, no check, no decode, no token
    assert seconds < 2.0, seconds
    assert warnings_of(caplog) == first_warnings                          # skips and notices reported identically
    assert second.skipped == first.skipped and second.truncated == first.truncated and second.tasks == first.tasks
    counts.clear()
    examples = every_example(second)
    assert examples == every_example(first)                               # pixel values included
    with_image = sum("pixel_values" in ex for ex in examples.values())
    assert with_image > 10 and counts["decode"] == 2 * with_image         # an image is decoded when its example is read


def test_changes_invalidate_and_other_settings_reuse(tmp_path, tok, counts):
    path = tmp_path / "d.jsonl"
    rows = [{"id": i, "task": "qa" if i % 2 else "math", "prompt": f"q {i}", "response": f"a {i}"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(sources=[str(path)], cache_dir=str(tmp_path / "cache"), preview_samples=2, eval_samples=2)

    def status(**kw):
        return build_multitask_data(DataConfig.from_dict(dict(base, **kw), tmp_path), tokenizer=tok).cache.status

    assert status() == "built"
    assert status() == "hit"
    assert status(seed=3, preview_samples=4, mixing="temperature") == "hit"   # splits and mixing are not cached
    assert status(max_length=300) == "built"                                   # encoding settings are
    with open(path, "a") as f:                                                 # the data file
        f.write(json.dumps({"id": 99, "task": "qa", "prompt": "q", "response": "a"}) + "\n")
    assert status() == "built"
    assert status() == "hit"
    template = tok.chat_template
    try:                                                                       # the tokenizer (in memory)
        tok.chat_template = template.replace("You are a helpful assistant.", "You are a careful assistant.")
        assert status() == "built"
    finally:
        tok.chat_template = template
    assert status() == "hit"
    assert status(cache=False) == "off"


def test_damaged_entries_are_rebuilt_with_a_warning(tmp_path, proc, caplog):
    path = write_llava(tmp_path, n_images=4, n_text=2)
    first = build_multitask_data(config(tmp_path, path), processor=proc)
    entry = tmp_path / "cache" / os.path.basename(first.cache.path)
    reference = every_example(first)

    def damage_and_rebuild(how, expect):
        how()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="thanora_ds.data"):
            again = build_multitask_data(config(tmp_path, path), processor=proc)
        assert again.cache.status == "built", how
        assert any(expect in w for w in warnings_of(caplog)), warnings_of(caplog)
        assert every_example(again) == reference
        assert build_multitask_data(config(tmp_path, path), processor=proc).cache.status == "hit"

    tokens = entry / TOKENS
    damage_and_rebuild(lambda: tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2]), "truncated")
    data = bytearray(tokens.read_bytes())
    data[-5] ^= 0xFF
    damage_and_rebuild(lambda: tokens.write_bytes(bytes(data)), "checksum differs")
    damage_and_rebuild(lambda: (entry / RECORDS).write_text("{"), "damaged")
    damage_and_rebuild(lambda: (entry / MANIFEST).unlink(), "no manifest")
    damage_and_rebuild(lambda: (entry / MANIFEST).write_text("not json"), "damaged")

    def consistent_but_wrong():  # a table that passes the checksum (manifest updated) but lacks its columns
        import xxhash

        (entry / RECORDS).write_text("{}")
        manifest = json.loads((entry / MANIFEST).read_text())
        manifest["files"][RECORDS] = {"size": 2, "xxh3_128": xxhash.xxh3_128(b"{}").hexdigest()}
        (entry / MANIFEST).write_text(json.dumps(manifest))
    damage_and_rebuild(consistent_but_wrong, "damaged")


def test_a_changed_or_fixed_image_rebuilds(tmp_path, proc, caplog):
    path = write_llava(tmp_path, n_images=6, n_text=2)
    assert build_multitask_data(config(tmp_path, path), processor=proc).skipped == {"look": 1}
    Image.new("RGB", (33, 44), (1, 2, 3)).save(tmp_path / "img" / "5.jpg")   # the truncated image, fixed
    with caplog.at_level(logging.WARNING, logger="thanora_ds.data"):
        again = build_multitask_data(config(tmp_path, path), processor=proc)
    assert again.cache.status == "built" and again.skipped == {}
    assert any("1 image(s) changed or disappeared" in w for w in warnings_of(caplog))
    os.remove(tmp_path / "img" / "0.jpg")                                   # an image gone: reported, not cached
    third = build_multitask_data(config(tmp_path, path), processor=proc)
    assert third.cache.status == "built" and third.skipped == {"see": 1}


def test_cache_folder_that_cannot_be_written_is_a_warning(tmp_path, tok, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"task": "qa", "prompt": f"q{i}", "response": "a"}) + "\n" for i in range(8)))
    (tmp_path / "file").write_text("")
    cfg = DataConfig.from_dict({"sources": [str(path)], "cache_dir": str(tmp_path / "file" / "sub")}, tmp_path)
    with caplog.at_level(logging.WARNING, logger="thanora_ds.data"):
        data = build_multitask_data(cfg, tokenizer=tok)
    assert data.cache.status == "built-unsaved" and len(data.tasks) == 1
    assert any("cannot write" in w for w in warnings_of(caplog))


def test_config_keys(tmp_path):
    cfg = DataConfig.from_dict({"sources": ["a.json"], "cache_dir": "cache"}, tmp_path)
    assert cfg.cache and cfg.cache_dir == str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"data\.cache_dir: must be a folder path"):
        DataConfig.from_dict({"sources": ["a.json"], "cache_dir": " "}, tmp_path)
    with pytest.raises(ConfigError, match=r"data\.cache: "):
        DataConfig.from_dict({"sources": ["a.json"], "cache": "no"}, tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        DataConfig.from_dict({"sources": ["a.json"], "cache_dir": "f"}, tmp_path)


def test_entries_of_deleted_data_are_pruned(tmp_path, tok):
    root = tmp_path / "cache"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "d.jsonl").write_text(json.dumps({"task": "qa", "prompt": "q", "response": "a"}) + "\n")
        cfg = DataConfig.from_dict({"sources": [str(tmp_path / name / "d.jsonl")], "cache_dir": str(root)}, tmp_path)
        build_multitask_data(cfg, tokenizer=tok)
    assert len(list(root.iterdir())) == 2
    os.remove(tmp_path / "a" / "d.jsonl")
    assert len(prune(root)) == 1 and len(list(root.iterdir())) == 1


# ----------------------------------------------------------------------------------------------
# image tokens from the processor's configuration


def test_configured_image_token_count_is_the_processors_real_expansion(tmp_path, proc):
    count, why = fixed_image_token_count(proc)
    assert (count, why) == (IMAGE_TOKENS_PER_IMAGE, "")
    for size in ((40, 30), (28, 28), (13, 90)):                     # any input size: resized and centre-cropped
        out = proc(text=["<image>"], images=[Image.new("RGB", size)], add_special_tokens=False)
        assert list(out["input_ids"][0]).count(proc.image_token_id) == count


@pytest.mark.parametrize("variant", ["chatml", "llava_hf_pad"])
def test_configured_count_gives_what_the_per_image_path_gives(tmp_path, proc, monkeypatch, variant):
    settings = {"cache": False}
    if variant == "llava_hf_pad":  # USER/ASSISTANT template (EOS appended) and LLaVA-1.5's pad to square
        proc = make_llava_processor(tmp_path / "hf", chat_template=LLAVA_HF_CHAT_TEMPLATE)
        settings["image_aspect_ratio"] = "pad"
    path = write_llava(tmp_path, n_images=8, n_text=2)
    fast = build_multitask_data(config(tmp_path, path, **settings), processor=proc)
    monkeypatch.setattr(encode, "fixed_image_token_count", lambda p: (None, "forced"))
    slow = build_multitask_data(config(tmp_path, path, **settings), processor=proc)
    assert every_example(fast) == every_example(slow) and fast.skipped == slow.skipped


def test_count_not_fixed_is_said_and_a_wrong_formula_fails_loudly(tmp_path, proc, monkeypatch):
    import copy

    free = copy.deepcopy(proc)
    free.image_processor.do_center_crop = False                     # resize keeping the aspect ratio: not fixed
    assert fixed_image_token_count(free)[0] is None and "no fixed output size" in fixed_image_token_count(free)[1]

    class LlavaNextProcessor:  # anyres: never the fixed formula
        pass
    assert fixed_image_token_count(LlavaNextProcessor())[0] is None
    path = write_llava(tmp_path, n_images=3, n_text=1)
    monkeypatch.setattr(encode, "fixed_image_token_count", lambda p: (IMAGE_TOKENS_PER_IMAGE + 1, ""))
    with pytest.raises(ValueError, match="5 image tokens per image from the processor's configuration, but the "
                                         "processor itself expands an image to 4"):
        build_multitask_data(config(tmp_path, path, cache=False), processor=proc)


def test_without_a_fixed_count_every_image_goes_through_the_processor(tmp_path, proc, counts):
    import copy

    free = copy.deepcopy(proc)
    free.image_processor.do_center_crop = False
    path = write_llava(tmp_path, n_images=4, n_text=1)
    build_multitask_data(config(tmp_path, path, cache=False), processor=free)
    assert counts["decode"] == 3                                    # the 3 valid images, each decoded


# ----------------------------------------------------------------------------------------------
# two ranks


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from transformers import AutoTokenizer
    import thanora_ds.data.encode as encode
    from thanora_ds.data import DataConfig, build_multitask_data

    dist.init_process_group("gloo")
    calls = [0]
    original = encode.Encoder.encode
    def counted(self, rec):
        calls[0] += 1
        return original(self, rec)
    encode.Encoder.encode = counted
    folder = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tok"))
    # "local": a cache folder per rank, as a node-local folder is for the ranks of other nodes
    cache = f"cache-{dist.get_rank()}" if sys.argv[2] == "local" else "cache"
    cfg = DataConfig.from_dict({"sources": ["d.jsonl"], "cache_dir": cache}, folder)
    data = build_multitask_data(cfg, tokenizer=tok)
    out = {"rank": dist.get_rank(), "encoded": calls[0], "status": data.cache.status,
           "first": data.train[data.tasks[0]][0]["input_ids"]}
    with open(os.path.join(folder, f"{sys.argv[2]}-rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
""")


def test_two_ranks_build_it_once(tmp_path):
    make_llama_tokenizer(tmp_path / "tok")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"task": "qa", "prompt": f"q {i}", "response": f"a {i}"})
                                              + "\n" for i in range(30)))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    results = {}
    for run in ("first", "second", "local"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(tmp_path / "rank.py"), str(tmp_path), run]
        proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        results[run] = [json.loads((tmp_path / f"{run}-rank{r}.json").read_text()) for r in (0, 1)]
    first, second = results["first"], results["second"]
    assert [r["encoded"] for r in first] == [30, 0] and [r["status"] for r in first] == ["built", "hit"]
    assert [r["encoded"] for r in second] == [0, 0] and [r["status"] for r in second] == ["hit", "hit"]
    assert first[0]["first"] == first[1]["first"] == second[0]["first"]
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # a rank that cannot see rank 0's entry builds it itself (with a warning) instead of failing or waiting forever
    assert [r["status"] for r in results["local"]] == ["built", "built-here"]
    assert [r["encoded"] for r in results["local"]] == [30, 30]


def test_token_store_gives_back_exactly_what_was_added():
    import random

    from thanora_ds.data.tokens import TokenStoreBuilder

    rng, image = random.Random(0), 7
    rows = []
    for _ in range(200):
        ids = []
        for _ in range(rng.randint(0, 5)):       # text pieces and image runs, adjacent runs and runs at either end
            ids += [image] * rng.choice([0, 1, 4, 576]) + [rng.randint(8, 900) for _ in range(rng.randint(0, 6))]
        labels = [-100 if t == image or rng.random() < 0.5 else t for t in ids]
        rows.append((ids, labels))
    builder = TokenStoreBuilder(image)
    for ids, labels in rows:
        builder.add(ids, labels)
    store = builder.finish()
    store.check()
    assert [store.row(i) for i in range(len(rows))] == rows
    assert store.tokens() == sum(len(ids) for ids, _ in rows) and len(store.input_ids) < store.tokens() / 10
    with pytest.raises(ValueError, match="neither its token nor -100"):
        builder.add([1, 2], [1, 5])
    with pytest.raises(ValueError, match="image token carries a label"):
        builder.add([image], [image])


def test_the_train_command_builds_once_and_a_requeue_loads_it(tmp_path):
    """launchers/train.py --check on 2 ranks, twice (a requeue): the trainer needs no change to use the cache."""
    import yaml

    from run_fixtures import launch, make_run

    config = make_run(tmp_path, llava=True)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    config.write_text(yaml.safe_dump(cfg))
    first, second = (launch(config, 2, "--check") for _ in range(2))
    first, second = first.stdout + first.stderr, second.stdout + second.stderr
    assert "data cache: built and saved" in first and "data cache: loaded" not in first
    assert "data cache: loaded" in second and "data cache: built" not in second
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_evaluation_reads_no_record_and_scores_each_record_against_its_own_answer(tmp_path, tok, monkeypatch):
    """The eval references come with the data (kept after a build, read from the cache entry on a cached start):
    `eval_items` reads no record again, and two eval records with the same id keep their own answers."""
    from thanora_ds.evaluate import eval_items

    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"task": "qa", "id": f"r{i}", "prompt": f"Q{i}?", "response": f"a{i}"}) + "\n"
                             for i in range(8)))
    answers = {"e0": "Paris  ", "e1": " Rome"}   # kept exactly as written (scorers normalise, not the data)
    rows = [{"task": "qa", "id": k, "prompt": f"Capital {k}?", "response": v} for k, v in answers.items()]
    rows += [{"task": "qa", "id": "dup", "prompt": f"Say {w}.", "response": w} for w in ("alpha", "beta")]
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = lambda: DataConfig.from_dict({"sources": [{"path": str(train)}, {"path": str(held), "split": "eval"}],  # noqa: E731
                                        "preview_samples": 2, "cache_dir": str(tmp_path / "cache")}, tmp_path)
    reads = Counter()
    read_rows = records._read_rows
    monkeypatch.setattr(records, "_read_rows", lambda src, *a: reads.update([src.path]) or read_rows(src, *a))
    for status in ("built", "hit"):
        data = build_multitask_data(cfg(), tokenizer=tok)
        assert data.cache.status == status and sum(reads.values()) == (2 if status == "built" else 0)
        reads.clear()
        items = eval_items(data, tok)["qa"]
        assert not reads, reads                   # no data file opened again to find the answers
        assert sorted(it.reference for it in items) == sorted([*answers.values(), "alpha", "beta"])
        for it in items:
            if it.id in answers:
                assert it.reference == answers[it.id]
            else:   # each duplicate against its own answer: the one its prompt asks for
                assert f"Say {it.reference}." in tok.decode(it.prompt_ids)
