"""Bad inputs as a hostile user or a flaky cluster brings them, one table row each.

Every case runs the real command (``launchers/train.py`` or ``launchers/merge.py``, in this process so that the
table stays fast) and asserts its exit code (2 for a named error; 0 with a warning for what is only odd, checked
with ``train.py --check``), that the message names what is wrong (file and line, record and field, or config
key), and that it came before the model was loaded: ``thanora_ds.modeling.load_model`` is replaced by a function
that fails the test. Merge cases also check that no file of the protected folders changed (sha256 of each file).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from run_fixtures import REPO, launch, launch_env, make_run


from thanora_ds.cli import eval as EVAL, merge as MERGE, train as TRAIN  # what launchers/*.py and thanora-* run


class ModelLoaded(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    """No model load, and no trace of the in-process runs for later tests: the launcher environment variables
    they set (MASTER_PORT, RANK, ...) are restored and the process group they started is destroyed."""
    def refuse(*args, **kwargs):
        raise ModelLoaded("the model was loaded before the bad input was reported")
    monkeypatch.setattr("thanora_ds.modeling.load_model", refuse)
    environ = dict(os.environ)
    yield
    from thanora_ds.distributed import shutdown
    shutdown()
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny LLaMA run and a tiny LLaVA run (model, data, config), and a text run with two checkpoints."""
    root = tmp_path_factory.mktemp("bad_inputs")
    text = make_run(root / "text")
    llava = make_run(root / "llava", llava=True)
    launch(text, 0, "train.max_steps=2", "train.save_every=1", f"train.output_dir={root / 'trained'}")
    other = root / "other_weights"  # the same architecture and config.json, other weights
    shutil.copytree(root / "text" / "model", other)
    import torch
    from safetensors.torch import load_file, save_file
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in weights.items()}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    return {"text": text, "llava": llava, "trained": root / "trained", "other": other, "root": root}


# ------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    expect: list[str]                       # regexes that must all occur in the logged messages
    overrides: list[str] = field(default_factory=list)
    setup: Callable | None = None           # setup(cfg_dict, folder, runs) -> extra overrides (may edit cfg_dict)
    rc: int = 2
    check: bool = False                     # run with --check (warning cases: exit 0)
    run: str = "text"


def jsonl(path: Path, lines: list) -> None:
    """One line per item: a record (dict / list, written as JSON) or a raw line (str)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def pr(i: int, task: str = "extra", **kw) -> dict:
    return dict({"id": f"{task}-{i}", "prompt": f"say {task} {i}", "response": "one two", "task": task}, **kw)


def with_source(records_or_lines, name="bad.jsonl", fmt="prompt_response", **cfg_data):
    """Setup adding one data file (a list of records / raw lines, or bytes) to the run's sources."""
    def setup(cfg, folder, runs):
        path = folder / name
        if isinstance(records_or_lines, bytes):
            path.write_bytes(records_or_lines)
        elif name.endswith(".json"):
            path.write_text(records_or_lines if isinstance(records_or_lines, str) else json.dumps(records_or_lines))
        else:
            jsonl(path, records_or_lines)
        cfg["data"]["sources"].append({"path": str(path), "format": fmt})
        cfg["data"].update(cfg_data)
        return []
    return setup


GOOD = [pr(i) for i in range(8)]
BAD_UTF8 = b"\n".join([json.dumps(r).encode() for r in GOOD[:6]]
                      + [json.dumps(GOOD[6]).encode().replace(b"say", b"s\xffy")] + [json.dumps(GOOD[7]).encode()])
TRUNCATED = [json.dumps(r) for r in GOOD[:2]] + ['{"task": "extra", "id": "cut", "prompt": "say'] + \
            [json.dumps(r) for r in GOOD[2:]]


def conv(i, value="<image>\nwhat color?", answer="red", image="img0.png", **kw):
    rec = {"id": f"img-{i}", "task": "look", "conversations": [{"from": "human", "value": value},
                                                              {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    rec.update(kw)
    return rec


def image_source(records, files: dict[str, bytes | None] | None = None, **cfg_data):
    def setup(cfg, folder, runs):
        images = Path(cfg["data"]["image_folder"])
        for name, payload in (files or {}).items():
            (images / name).parent.mkdir(parents=True, exist_ok=True)
            (images / name).write_bytes(payload)
        path = folder / "bad_images.json"
        path.write_text(json.dumps(records))
        cfg["data"]["sources"].append({"path": str(path), "format": "llava"})
        cfg["data"].update(cfg_data)
        return []
    return setup


def jpeg_bytes(truncate: bool = False) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[: len(data) * 2 // 3] if truncate else data


def edit(fn):
    def setup(cfg, folder, runs):
        fn(cfg, folder, runs)
        return []
    return setup


def deepspeed_file(text: str):
    def setup(cfg, folder, runs):
        (folder / "ds.json").write_text(text)
        cfg["deepspeed"]["config"] = str(folder / "ds.json")
        return []
    return setup


def resume_from(corrupt: Callable[[Path], None] | None, explicit: bool = True, which: str = "latest"):
    """A copy of the trained run's output dir, its latest (or every) checkpoint damaged by ``corrupt``."""
    def setup(cfg, folder, runs):
        out = folder / "out"
        shutil.copytree(runs["trained"], out)
        steps = sorted((out / "checkpoints").glob("step-*"))
        for step in (steps if which == "all" else steps[-1:]):
            if corrupt is not None:
                corrupt(step)
        return [f"train.output_dir={out}", "train.max_steps=4"] + ([f"train.resume={steps[-1]}"] if explicit else [])
    return setup


def truncate(name, size=100):
    def corrupt(step):
        path = next(step.glob(name))
        path.write_bytes(path.read_bytes()[:size])
    return corrupt


def garbage(name):
    def corrupt(step):
        path = next(step.glob(name))
        size = path.stat().st_size
        path.write_bytes((b"\x00garbage" * (size // 8 + 1))[:size])  # same size: only the digest can tell
    return corrupt


def remove(name):
    return lambda step: next(step.glob(name)).unlink()


OPTIM, MODEL_STATES, RANK, META, MANIFEST = ("*optim_states.pt", "*model_states.pt", "rank-00000.pt",
                                             "thanora_meta.json", "manifest.json")

CASES = [
    # --- config: every error names the key, before data or model ------------------------------------------
    Case("spr_lambda_nan", [r"thanora\.spr_lambda: must be a finite number, got nan"], ["thanora.spr_lambda=.nan"]),
    Case("grad_norm_nan", [r"train\.max_grad_norm: must be a finite number"], ["train.max_grad_norm=.nan"]),
    Case("lr_inf", [r"train\.lr: must be a finite number, got inf"], ["train.lr=.inf"]),
    Case("lr_negative", [r"train\.lr: must be >= 0"], ["train.lr=-1e-3"]),
    Case("skip_invalid_string", [r"data\.skip_invalid: expected true or false, got a string 'false'"],
         ["data.skip_invalid='false'"]),
    Case("bool_as_int", [r"model\.activation_checkpointing: expected true or false"], ["model.activation_checkpointing=1"]),
    Case("ds_override_misspelt", [r"deepspeed\.overrides: zero_optimization\.stage3_param_persistance_threshold: "
                                  r"not a key.*did you mean zero_optimization\.stage3_param_persistence_threshold"],
         ["deepspeed.overrides={zero_optimization.stage3_param_persistance_threshold: 0}"]),
    Case("ds_override_unknown_section", [r"zero_optimisation: not a DeepSpeed config key.*zero_optimization"],
         ["deepspeed.overrides={zero_optimisation.stage: 2}"]),
    Case("ds_override_bad_value", [r"deepspeed\.overrides: zero_optimization\.stage"],
         ["deepspeed.overrides={zero_optimization.stage: three}"]),
    Case("ds_override_nan", [r"deepspeed\.overrides\.gradient_clipping: must be a finite number"],
         ["deepspeed.overrides={gradient_clipping: .nan}"]),
    Case("ds_json_invalid", [r"deepspeed\.config: .*ds\.json:3: not valid JSON"],
         setup=deepspeed_file('{\n "train_batch_size": "auto",\n "bf16": {enabled: true}\n}')),
    Case("ds_json_list", [r"deepspeed\.config: .*top level must be a JSON object"], setup=deepspeed_file("[1, 2]")),
    Case("ds_json_misspelt_key", [r"deepspeed\.config .*ds\.json.*zero_optimization\.stag: not a key"],
         setup=deepspeed_file('{"zero_optimization": {"stag": 3}}')),
    Case("ds_config_missing", [r"deepspeed\.config: nope\.json not found"], ["deepspeed.config=nope.json"]),
    Case("preview_samples_float", [r"data\.preview_samples: expected an integer, got float 8\.5"],
         ["data.preview_samples=8.5"]),
    Case("seed_string", [r"data\.seed: expected an integer, got a string 'abc'"], ["data.seed=abc"]),
    Case("tasks_list", [r"data\.tasks: expected a mapping, got list"], ["data.tasks=[count, color]"]),
    Case("sources_empty", [r"data\.sources: empty"], ["data.sources=[]"]),
    Case("source_no_path", [r"data\.sources\[0\]\.path: required"], ["data.sources=[{format: chat}]"]),
    Case("source_bad_format", [r"data\.sources\[0\]\.format: 'csv' is not one of"],
         setup=edit(lambda c, f, r: c["data"]["sources"][0].update(format="csv"))),
    Case("source_unknown_key", [r"unknown key\(s\) data\.sources\[0\]\.fmt"],
         setup=edit(lambda c, f, r: c["data"]["sources"][0].update(fmt="chat"))),
    Case("scorer_misspelt", [r"data\.tasks\.count\.scorer: unknown scorer 'exact'"],
         ["data.tasks={count: {scorer: exact}, color: null, story: null}"]),
    Case("task_weight_negative", [r"data\.tasks\.count\.weight: must be >= 0"],
         ["data.tasks={count: {weight: -1}, color: null, story: null}"]),
    Case("max_new_tokens_zero", [r"data\.tasks\.count\.max_new_tokens: must be >= 1"],
         ["data.tasks={count: {max_new_tokens: 0}, color: null, story: null}"]),
    Case("one_choice", [r"data\.tasks\.count\.choices: .*at least 2"],
         ["data.tasks={count: {scorer: multiple_choice, choices: [one]}, color: null, story: null}"]),
    Case("weights_missing", [r"data\.mixing: weights needs a weight for every task.*missing for: color"],
         ["data.mixing=weights", "data.tasks={count: {weight: 1}, color: null, story: null}"]),
    Case("mixing_unknown", [r"data\.mixing: 'random' is not one of"], ["data.mixing=random"]),
    Case("temperature_zero", [r"data\.temperature: must be > 0"], ["data.temperature=0"]),
    Case("max_length_one", [r"data\.max_length: must be >= 2"], ["data.max_length=1"]),
    Case("data_unknown_key", [r"unknown key\(s\) data\.skip_invalids"], ["data.skip_invalids=true"]),
    Case("section_unknown", [r"unknown key\(s\) trian"], ["trian.lr=1"]),
    Case("key_unknown", [r"unknown key\(s\) thanora\.rnak"], ["thanora.rnak=3"]),
    Case("override_no_equals", [r"override 'thanora\.rank' is not of the form key=value"], ["thanora.rank"]),
    Case("rank_zero", [r"thanora\.rank: must be >= 1"], ["thanora.rank=0"]),
    Case("mode_unknown", [r"thanora\.mode: unknown value 'svd'"], ["thanora.mode=svd"]),
    Case("allocation_unknown", [r"thanora\.allocation: unknown value"], ["thanora.allocation=greedy"]),
    Case("dropout_one", [r"thanora\.dropout: must be in \[0, 1\)"], ["thanora.dropout=1.0"]),
    Case("gamma_zero", [r"thanora\.gamma: must be > 0"], ["thanora.gamma=0"]),
    Case("tau_zero", [r"thanora\.tau: must be > 0 for softmax"], ["thanora.tau=0"]),
    Case("targets_empty", [r"thanora\.targets: is empty"], ["thanora.targets=[]"]),
    Case("targets_string", [r"thanora\.targets: expected a list"], ["thanora.targets=q_proj"]),
    Case("micro_batch_zero", [r"train\.micro_batch_size: must be >= 1"], ["train.micro_batch_size=0"]),
    Case("micro_batch_float", [r"train\.micro_batch_size: expected an integer, got float 2\.0"],
         ["train.micro_batch_size=2.0"]),
    Case("adam_betas_one", [r"train\.adam_betas: two numbers in \[0, 1\)"], ["train.adam_betas=[0.9]"]),
    Case("adam_eps_zero", [r"train\.adam_eps: must be > 0"], ["train.adam_eps=0"]),
    Case("min_lr_ratio", [r"train\.min_lr_ratio: must be in \[0, 1\]"], ["train.min_lr_ratio=2"]),
    Case("resume_missing", [r"train\.resume: '/nonexistent/ckpt' is neither auto"], ["train.resume=/nonexistent/ckpt"]),
    Case("projector_lr_text", [r"train\.projector_lr: set, but thanora\.train_projector is false"],
         ["train.projector_lr=1e-3"]),
    Case("dtype_fp16", [r"model\.dtype: unknown value 'fp16'"], ["model.dtype=fp16"]),
    Case("flash_attn_cpu", [r"model\.attn_implementation: flash_attention_2 needs flash-attn"],
         ["model.attn_implementation=flash_attention_2"]),
    Case("model_missing", [r"model\.path: /nonexistent/model is not a directory"], ["model.path=/nonexistent/model"]),
    Case("model_empty_folder", [r"model\.path: .*empty_model has no config\.json"],
         setup=lambda c, f, r: (f / "empty_model").mkdir() or [f"model.path={f / 'empty_model'}"]),
    Case("dist_backend", [r"dist\.backend: unknown value 'mpi'"], ["dist.backend=mpi"]),
    Case("dist_timeout", [r"dist\.timeout_minutes: must be >= 1"], ["dist.timeout_minutes=0"]),
    Case("dist_env_name", [r"dist\.env: 'BAD-NAME' is not an environment variable name"],
         ["dist.env={BAD-NAME: 1}"]),
    Case("yaml_syntax", [r"config\.yaml:\d+: not valid YAML"],
         setup=lambda c, f, r: (f / "config.yaml").write_text("model:\n  path: [unclosed\n") and ["--raw-config"]),
    # --- impossible ranks (after the data is known, before the model) ---------------------------------------
    Case("rank_too_small", [r"thanora\.rank: r=2 is too small for 3 tasks"], ["thanora.rank=2"]),
    Case("rank_too_large", [r"thanora\.rank: r=80 leaves .* task rows.*min\(d_out, d_in\) = 16"], ["thanora.rank=80"]),
    # --- data: named by file and line / record and field -----------------------------------------------------
    Case("jsonl_truncated_line", [r"bad\.jsonl:3: not valid JSON"], setup=with_source(TRUNCATED)),
    Case("jsonl_truncated_line_skip", [r"skipped 1 invalid record.*per task: extra=1", r"bad\.jsonl:3",
                                       r"train sizes \[\d+, \d+, \d+, \d+\]"],
         setup=with_source(TRUNCATED, skip_invalid=True), rc=0, check=True),
    Case("jsonl_bad_utf8", [r"bad\.jsonl:7: not valid UTF-8 \(byte 0xff"], setup=with_source(BAD_UTF8)),
    Case("jsonl_bad_utf8_skip", [r"skipped 1 invalid record.*per task: extra=1", r"bad\.jsonl:7"],
         setup=with_source(BAD_UTF8, skip_invalid=True), rc=0, check=True),
    Case("file_empty", [r"bad\.jsonl: the data file is empty"], setup=with_source(b"")),
    Case("file_blank_lines", [r"bad\.jsonl: the data file holds no record"], setup=with_source(b"\n\n  \n")),
    Case("file_missing", [r"nothere\.jsonl: data file not found"],
         setup=edit(lambda c, f, r: c["data"]["sources"].append({"path": str(f / "nothere.jsonl")}))),
    Case("file_missing_skip", [r"nothere\.jsonl: data file not found", r"skip_invalid cannot skip"],
         setup=edit(lambda c, f, r: c["data"].update(skip_invalid=True) or
                    c["data"]["sources"].append({"path": str(f / "nothere.jsonl")}))),
    Case("json_array_syntax", [r"bad\.json:4: not valid JSON"],
         setup=with_source('[\n{"prompt": "a", "response": "b", "task": "extra"},\n\n{"prompt": "c",, }\n]',
                           name="bad.json")),
    Case("json_array_syntax_skip", [r"bad\.json:4: not valid JSON", r"skip_invalid cannot skip"],
         setup=with_source('[\n{"prompt": "a", "response": "b", "task": "extra"},\n\n{"prompt": "c",, }\n]',
                           name="bad.json", skip_invalid=True)),
    Case("json_array_not_objects", [r"bad\.json record 2: a record must be a JSON object"],
         setup=with_source([pr(0), [1, 2], pr(2)], name="bad.json")),
    Case("jsonl_line_is_list", [r"bad\.jsonl:2: a record must be a JSON object, got list"],
         setup=with_source([pr(0), [1, 2], pr(2)])),
    Case("record_no_task", [r"bad\.jsonl:2 \(id='extra-1'\): field 'task': missing task"],
         setup=with_source([pr(0), {"id": "extra-1", "prompt": "p", "response": "r"}])),
    Case("record_task_number", [r"bad\.jsonl:1 \(id='x'\): field 'task': task must be a non-empty string"],
         setup=with_source([{"id": "x", "prompt": "p", "response": "r", "task": 7}])),
    Case("record_unknown_task", [r"bad\.jsonl:1 .*field 'task': unknown task 'extra'; data\.tasks lists"],
         ["data.tasks={count: null, color: null, story: null}"], setup=with_source(GOOD)),
    Case("configured_task_without_data", [r"field 'tasks\.ghost': configured task has no valid record"],
         ["data.tasks={count: null, color: null, story: null, ghost: null}"]),
    Case("prompt_not_string", [r"bad\.jsonl:1 .*field 'prompt': missing or not a string"],
         setup=with_source([pr(0, prompt=["a"])])),
    Case("response_missing", [r"bad\.jsonl:1 .*field 'response': missing assistant turn"],
         setup=with_source([{"id": "e", "prompt": "p", "task": "extra"}])),
    Case("response_empty", [r"bad\.jsonl:2 .*field 'response': empty assistant turn"],
         setup=with_source([pr(0), pr(1, response="  ")])),
    Case("format_unknown", [r"bad\.jsonl:1 .*field 'conversations': cannot tell the format"],
         setup=with_source([{"id": "q", "question": "p", "answer": "r", "task": "extra"}], fmt="auto")),
    Case("chat_bad_role", [r"bad\.jsonl:1 .*field 'messages\[1\]\.role': unknown role 'bot'"],
         setup=with_source([{"id": "c", "task": "extra", "messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "bot", "content": "yo"}]}], fmt="chat")),
    Case("chat_not_alternating", [r"field 'messages\[1\]\.content': expected an assistant turn here, got user"],
         setup=with_source([{"id": "c", "task": "extra", "messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "user", "content": "again"},
                                                                      {"role": "assistant", "content": "x"}]}],
                           fmt="chat")),
    Case("image_in_text_model", [r"bad\.json record 1 \(id='img-0'\): field 'image': record has images but no processor"],
         setup=with_source([conv(0, image="img0.jpg")], name="bad.json", fmt="llava", image_folder=None),
         run="text_with_image"),
    Case("prompt_too_long", [r"bad\.jsonl:1 .*field 'response': the prompt alone is \d+ tokens >= max_length 64"],
         setup=with_source([pr(0, prompt="word " * 200)])),
    Case("skip_counts_exact", [r"skipped 3 invalid record.*per task: extra=3"],
         setup=with_source([pr(0), pr(1, response=""), pr(2, prompt=3), pr(3), {"id": "n", "prompt": "p",
                                                                               "task": "extra"}, pr(5)],
                           skip_invalid=True), rc=0, check=True),
    # --- quiet oddities: a warning, the run goes on -----------------------------------------------------------
    Case("duplicate_ids", [r"duplicate record ids within a task.*: 1; per task: extra=1 \(e\.g\. task extra "
                           r"id='extra-1' at .*bad\.jsonl:2 and .*bad\.jsonl:4"], setup=with_source(GOOD[:3] + [pr(1)] + GOOD[3:]), rc=0, check=True),
    Case("one_record_task", [r"task single has 1 record\(s\): too few for a separate preview split; HASI previews"],
         setup=with_source([pr(0, task="single")]), rc=0, check=True),
    # --- images (tiny LLaVA) -----------------------------------------------------------------------------------
    Case("image_missing", [r"bad_images\.json record 1 \(id='img-0'\): field 'image': image file not found: .*gone\.png"],
         setup=image_source([conv(0, image="gone.png")]), run="llava"),
    Case("image_truncated_jpeg", [r"record 1 \(id='img-0'\): field 'image': image (truncated|unreadable).*cut\.jpg"],
         setup=image_source([conv(0, image="cut.jpg")], {"cut.jpg": jpeg_bytes(truncate=True)}), run="llava"),
    Case("image_truncated_jpeg_skip", [r"skipped 1 invalid record.*look=1", r"cut\.jpg"],
         setup=image_source([conv(0, image="cut.jpg"), conv(1, image="ok.jpg")],
                            {"cut.jpg": jpeg_bytes(truncate=True), "ok.jpg": jpeg_bytes()}, skip_invalid=True),
         run="llava", rc=0, check=True),
    Case("image_not_an_image", [r"field 'image': image unreadable .*text\.png"],
         setup=image_source([conv(0, image="text.png")], {"text.png": b"not a png at all"}), run="llava"),
    Case("image_field_type", [r"field 'image': must be a path or a list of paths, got 5"],
         setup=image_source([conv(0, image=5)]), run="llava"),
    Case("image_placeholder_count", [r"field 'conversations\[0\]\.value': 2 <image> placeholder\(s\) but 1 image"],
         setup=image_source([conv(0, value="<image><image> twice?")]), run="llava"),
    Case("image_placeholder_in_answer", [r"field 'conversations\[1\]\.value': <image> placeholder outside a user turn"],
         setup=image_source([conv(0, value="<image> what?", answer="<image>")]), run="llava"),
    Case("image_path_escapes", [r"image paths that lead out of the image folder.*\.\./outside\.jpg"],
         setup=image_source([conv(0, image="../outside.jpg")], {"../outside.jpg": jpeg_bytes()}),
         run="llava", rc=0, check=True),
    # --- resume checkpoints: verified before the model loads ---------------------------------------------------
    Case("ckpt_truncated_optimizer", [r"train\.resume: .*step-00000002 is damaged.*optim_states\.pt has 100 bytes"],
         setup=resume_from(truncate(OPTIM))),
    Case("ckpt_zero_byte_model_states", [r"is damaged.*model_states\.pt has 0 bytes"],
         setup=resume_from(truncate(MODEL_STATES, 0))),
    Case("ckpt_truncated_meta", [r"is damaged.*thanora_meta\.json has 100 bytes"], setup=resume_from(truncate(META))),
    Case("ckpt_garbage_rank_file", [r"is damaged.*rank-00000\.pt does not match its sha256"],
         setup=resume_from(garbage(RANK))),
    Case("ckpt_missing_file", [r"is damaged.*optim_states\.pt is missing"], setup=resume_from(remove(OPTIM))),
    Case("ckpt_no_manifest", [r"is damaged.*manifest\.json is missing"], setup=resume_from(remove(MANIFEST))),
    Case("ckpt_garbage_manifest", [r"is damaged.*manifest\.json is unreadable"], setup=resume_from(garbage(MANIFEST))),
    Case("ckpt_auto_falls_back", [r"checkpoint step-00000002 is damaged, trying the previous one: .*optim_states\.pt",
                                  r"check passed: .*resume from .*step-00000001"],
         setup=resume_from(truncate(OPTIM), explicit=False), rc=0, check=True),
    Case("ckpt_auto_none_intact", [r"no intact checkpoint to resume in .*step-00000002: .*rank-00000\.pt.*\n.*"
                                   r"step-00000001: .*rank-00000\.pt"],
         setup=resume_from(garbage(RANK), explicit=False, which="all")),
    Case("ckpt_other_run", [r"comes from another run; refusing to resume.*thanora: checkpoint has .*'rank': 8.*'rank': 12"],
         ["thanora.rank=12"], setup=resume_from(None, explicit=False)),
    Case("ckpt_resume_never_over_checkpoints", [r"train\.resume=never, but .*checkpoints holds checkpoints of an "
                                                r"earlier run"], ["train.resume=never"],
         setup=resume_from(None, explicit=False)),
    Case("ckpt_other_base_weights", [r"comes from another run.*model_weights_digest"],
         setup=lambda c, f, r: resume_from(None, explicit=False)(c, f, r) + [f"model.path={r['other']}"]),
]


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_train_input(case: Case, runs, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = yaml.safe_load(Path(runs["text" if case.run == "text_with_image" else case.run]).read_text())
    if case.run == "text_with_image":  # an image beside the data file, read by a text-only model
        (tmp_path / "img0.jpg").write_bytes(jpeg_bytes())
    cfg["train"]["output_dir"] = str(tmp_path / "out")
    overrides = list(case.overrides)
    if case.setup is not None:
        overrides += case.setup(cfg, tmp_path, runs) or []
    config = tmp_path / "config.yaml"
    if "--raw-config" in overrides:  # the case wrote the config file itself
        overrides.remove("--raw-config")
    else:
        config.write_text(yaml.safe_dump(cfg))
    rc = TRAIN.main(["--config", str(config), *overrides] + (["--check"] if case.check else []))
    text = _messages(caplog)
    assert rc == case.rc, f"exit {rc}, expected {case.rc}; log:\n{text[-3000:]}"
    for pattern in case.expect:
        assert re.search(pattern, text, re.S), f"{pattern!r} not in the log:\n{text[-3000:]}"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    print(f"CASE {case.id}: exit {rc}: {said[0] if said else ''}")  # the table as a user sees it (pytest -s)


def test_table_is_large_enough():
    assert len(CASES) + len(MERGE_CASES) + len(EVAL_CASES) >= 60


# ------------------------------------------------------------------------------------------------------------
def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def foreign_folder(folder: Path) -> Path:
    out = folder / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "model.safetensors").write_bytes(b"my own file")
    return out


def run_dir(r) -> str:
    return str(r["trained"])


# (id, argv (runs, tmp) -> merge.py arguments, regexes, folders that must stay byte-identical)
MERGE_CASES = [
    ("out_is_base", lambda r, t: [run_dir(r), "--out", str(r["root"] / "text" / "model")], [r"overlaps .*model"],
     ["base"]),
    ("out_is_base_overwrite", lambda r, t: [run_dir(r), "--out", str(r["root"] / "text" / "model"), "--overwrite"],
     [r"overlaps .*model"], ["base"]),
    ("out_inside_base", lambda r, t: [run_dir(r), "--out", str(r["root"] / "text" / "model" / "merged")],
     [r"overlaps"], ["base"]),
    ("out_contains_base", lambda r, t: [run_dir(r), "--base", str(shutil.copytree(r["root"] / "text" / "model",
                                                                                  t / "b" / "m")),
                                        "--out", str(t / "b"), "--overwrite"], [r"overlaps"], []),
    ("out_in_checkpoints", lambda r, t: [run_dir(r), "--out", str(r["trained"] / "checkpoints" / "merged")],
     [r"overlaps .*checkpoints"], ["trained"]),
    ("out_foreign_nonempty", lambda r, t: [run_dir(r), "--out", str(foreign_folder(t))],
     [r"mine: not empty \(model\.safetensors, notes\.txt\).*--overwrite"], ["mine"]),
    ("adapter_out_foreign", lambda r, t: [run_dir(r), "--out", str(foreign_folder(t)), "--adapter-only"],
     [r"not empty"], ["mine"]),
    ("out_is_a_file", lambda r, t: [run_dir(r), "--out", str((t / "f.txt").write_text("x") and t / "f.txt")],
     [r"exists and is not a folder"], []),
    ("base_other_weights", lambda r, t: [run_dir(r), "--base", str(r["other"]), "--out", str(t / "m")],
     [r"other_weights: its weights are not those the run trained on"], ["other"]),
    ("base_missing", lambda r, t: [run_dir(r), "--base", str(t / "nobase"), "--out", str(t / "m")],
     [r"nobase.* not found"], []),
    ("base_not_hf", lambda r, t: [run_dir(r), "--base", str((t / "nb").mkdir() or t / "nb"), "--out", str(t / "m")],
     [r"nb: no model\.safetensors|nb: no config\.json"], []),
    ("tag_missing", lambda r, t: [run_dir(r), "--tag", "7", "--out", str(t / "m")],
     [r"step-00000007: no complete checkpoint.*available: \['step-00000001', 'step-00000002'\]"], []),
    ("shard_size_garbage", lambda r, t: [run_dir(r), "--max-shard-size", "lots", "--out", str(t / "m")],
     [r"--max-shard-size: cannot read 'lots'"], []),
    ("checkpoint_damaged", lambda r, t: [str(_damaged_copy(r["trained"], t)), "--tag", "2", "--out", str(t / "m")],
     [r"damaged checkpoint: .*optim_states"], []),
    ("not_a_run", lambda r, t: [str(t), "--out", str(t / "m")], [r"no complete checkpoint"], []),
]


def _damaged_copy(trained: Path, tmp: Path) -> Path:
    copy_ = tmp / "run"
    shutil.copytree(trained, copy_)
    truncate(OPTIM)(copy_ / "checkpoints" / "step-00000002")
    return copy_


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_bad_merge_input(case, runs, tmp_path, caplog):
    name, argv_of, expect, protected = case
    argv = argv_of(runs, tmp_path)
    folders = {"base": runs["root"] / "text" / "model", "trained": runs["trained"], "other": runs["other"],
               "mine": tmp_path / "mine"}
    before = {k: tree_digest(folders[k]) for k in protected}
    rc = MERGE.main([*argv, "--quiet"])
    text = _messages(caplog)
    print(f"CASE merge {name}: exit {rc}: {next((r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR), '')}")
    assert rc == 2, f"exit {rc}; log:\n{text[-3000:]}"
    for pattern in expect:
        assert re.search(pattern, text, re.S), f"{pattern!r} not in the log:\n{text[-3000:]}"
    for k in protected:
        assert tree_digest(folders[k]) == before[k], f"{k} changed"
    assert not list(tmp_path.glob(".*partial*")), "a partial output folder was left behind"


def test_merge_overwrite_replaces_only_its_own_files(runs, tmp_path):
    out = foreign_folder(tmp_path)
    assert MERGE.main([str(runs["trained"]), "--quiet", "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "my notes"          # not ours: untouched
    assert (out / "model.safetensors").read_bytes() != b"my own file"  # ours: replaced by the merged weights
    assert (out / "config.json").is_file()


# ------------------------------------------------------------------------------------------------------------
def test_second_run_on_a_locked_output_dir_is_refused(runs, tmp_path, caplog):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from thanora_ds.run_lock import OutputLock
        OutputLock({str(out)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, env=launch_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = TRAIN.main(["--config", str(runs["text"]), f"train.output_dir={out}"])
        text = _messages(caplog)
        assert rc == 2 and f"pid {holder.pid}" in text and "is in use by another run" in text, text[-2000:]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (kill -9): its lock is stale, taken over with a warning naming the dead holder
    caplog.clear()
    from thanora_ds.run_lock import OutputLock
    lock = OutputLock(out)
    lock.acquire()
    lock.release()
    assert f"pid {holder.pid}" in _messages(caplog) and "no longer running" in _messages(caplog)


def bad_data_yaml(t: Path) -> str:
    (t / "data.yaml").write_text("sources: [a.jsonl]\npreview_samples: many\n")
    return str(t / "data.yaml")


# (id, argv (runs, tmp) -> eval.py arguments, regexes): each fails before any model is loaded
EVAL_CASES = [
    ("model_not_hf", lambda r, t: ["--model", str(t), "--out", str(t / "e")], [r"--model .*: not a Hugging Face model"]),
    ("checkpoint_not_a_run", lambda r, t: ["--checkpoint", str(t), "--out", str(t / "e")], [r"no complete checkpoint"]),
    ("tag_missing", lambda r, t: ["--checkpoint", run_dir(r), "--tag", "9", "--out", str(t / "e")],
     [r"step-00000009: no complete checkpoint"]),
    ("tasks_unknown", lambda r, t: ["--checkpoint", run_dir(r), "--tasks", "colour", "--out", str(t / "e")],
     [r"--tasks: \['colour'\] not in the data's tasks \['color', 'count', 'story'\]"]),
    ("data_yaml_bad_type", lambda r, t: ["--checkpoint", run_dir(r), "--data", bad_data_yaml(t), "--out", str(t / "e")],
     [r"data\.preview_samples: expected an integer, got a string 'many'"]),
    ("no_data_config", lambda r, t: ["--model", str(r["root"] / "text" / "model"), "--out", str(t / "e")],
     [r"no data config: pass --data"]),
]


@pytest.mark.parametrize("case", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_eval_input(case, runs, tmp_path, caplog, monkeypatch):
    name, argv_of, expect = case
    def refuse(*args, **kwargs):
        raise ModelLoaded("eval loaded the model before reporting the bad input")
    monkeypatch.setattr(EVAL, "load_model", refuse)
    rc = EVAL.main(argv_of(runs, tmp_path))
    text = _messages(caplog)
    assert rc == 2, f"exit {rc}; log:\n{text[-3000:]}"
    for pattern in expect:
        assert re.search(pattern, text, re.S), f"{pattern!r} not in the log:\n{text[-3000:]}"
