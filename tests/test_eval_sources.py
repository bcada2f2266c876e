"""Separate eval data: a source marked `split: eval` is the task's eval split, record for record; `split: train`
never gives records to eval; HASI's previews come from the training data."""
import json

import pytest
import torch

from thanora_ds.data import DataConfig, DataValidationError, build_multitask_data
from thanora_ds.evaluate import evaluate
from tiny_assets import make_llama_tokenizer
from tiny_models import llama_config


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_llama_tokenizer(tmp_path_factory.mktemp("tok"))


def write(path, task, ids):
    path.write_text("".join(json.dumps({"id": i, "prompt": f"say {i}", "response": "ok", "task": task}) + "\n"
                            for i in ids))
    return str(path)


def ids(split) -> list[str]:
    return sorted(ex["id"] for ex in split)


def test_eval_source_is_the_eval_split_and_train_source_never_is(tmp_path, tok):
    qa_train = write(tmp_path / "qa_train.jsonl", "qa", [f"tr{i}" for i in range(40)])
    qa_test = write(tmp_path / "qa_test.jsonl", "qa", [f"te{i}" for i in range(7)])
    chat_train = write(tmp_path / "chat_train.jsonl", "chat", [f"c{i}" for i in range(40)])
    chat_all = write(tmp_path / "chat_all.jsonl", "chat", [f"a{i}" for i in range(20)])
    cfg = DataConfig.from_dict({"sources": [{"path": qa_train}, {"path": qa_test, "split": "eval"},
                                            {"path": chat_train, "split": "train"}, {"path": chat_all}],
                                "preview_samples": 8, "eval_samples": 5}, tmp_path)
    data = build_multitask_data(cfg, tokenizer=tok)
    # qa: eval is exactly the test file (all 7, not capped by eval_samples); train + preview are the train file
    assert ids(data.eval["qa"]) == sorted(f"te{i}" for i in range(7))
    assert sorted(ids(data.train["qa"]) + ids(data.preview["qa"])) == sorted(f"tr{i}" for i in range(40))
    assert len(data.preview["qa"]) == 8
    # chat: eval carved from the `all` file only; the train-only file is all training / preview
    assert len(data.eval["chat"]) == 5 and all(i.startswith("a") for i in ids(data.eval["chat"]))
    assert set(ids(data.train["chat"]) + ids(data.preview["chat"])) >= {f"c{i}" for i in range(40)}
    assert not set(ids(data.eval["chat"])) & set(ids(data.train["chat"]) + ids(data.preview["chat"]))

    # evaluated on exactly that file's records
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM
    config = llama_config(len(tok))
    config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    report = evaluate(LlamaForCausalLM(config).eval(), data, tok, batch_size=4, max_new_tokens=2, tasks=["qa"])
    assert sorted(p["id"] for p in report["predictions"]) == sorted(f"te{i}" for i in range(7))
    assert report["tasks"]["qa"]["n"] == 7


def test_a_task_only_in_eval_sources_is_refused(tmp_path, tok):
    only = write(tmp_path / "only.jsonl", "ghost", ["g0", "g1"])
    other = write(tmp_path / "other.jsonl", "qa", [f"q{i}" for i in range(8)])
    cfg = DataConfig.from_dict({"sources": [{"path": only, "split": "eval"}, {"path": other}]}, tmp_path)
    with pytest.raises(DataValidationError, match="task ghost has records only in eval sources"):
        build_multitask_data(cfg, tokenizer=tok)


def test_unknown_split_names_the_key(tmp_path):
    from thanora_ds.typed_config import ConfigError
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.split: 'test' is not one of"):
        DataConfig.from_dict({"sources": [{"path": "a.jsonl", "split": "test"}]}, tmp_path)
