"""The LLaVA-1.5-7B recipe (configs/llava15_7b.yaml) and its per-GPU memory estimate; LLaVA-NeXT refused up front.

The recipe is loaded and validated as a real run would be (with model.path pointing at a folder holding the
llava-hf/llava-1.5-7b-hf config.json, no weights: nothing is downloaded), a 50-record LLaVA-665K-shaped sample is
validated record by record with its data section (task rule, nested image folders, text-only records), and the
memory estimate is printed (pytest -s shows it)."""
import json
import subprocess
import sys

import pytest

from run_fixtures import REPO, launch_env
from test_llava665k_data import write_665k
from thanora_ds.data import load_records
from thanora_ds.memory_estimate import (DecoderShape, estimate, estimate_for_run, format_estimate, hasi_peak_floats,
                                        shapes_from_config)
from thanora_ds.train_config import load_train_config
from thanora_ds.typed_config import ConfigError

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# llava-hf/llava-1.5-7b-hf config.json (the keys that matter; transformers fills the rest with its defaults)
LLAVA15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "projection_dim": 768},
}
LLAMA7B = DecoderShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)


def test_parameter_counts_on_plain_numbers():
    assert LLAMA7B.params() == 6_738_415_616                      # LLaMA-7B, as published
    decoder, vision = shapes_from_config(LLAVA15_7B)
    assert vision.projector_params(4096) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert 303e6 < vision.params() < 304e6                         # CLIP ViT-L/14-336: 303.5M
    total = decoder.params() + vision.params() + vision.projector_params(4096)
    assert 7.06e9 < total < 7.07e9                                 # llava-1.5-7b: 7.06B
    # LoRA r on q/k/v/o/gate/up/down: r * (d_in + d_out) summed
    per_layer = 4 * 8 * (4096 + 4096) + 3 * 8 * (4096 + 11008)
    assert sum(8 * (i + o) for o, i in LLAMA7B.target_shapes(ALL)) == 32 * per_layer


def test_hasi_statistics_on_plain_numbers():
    # README "HASI memory": one LLaMA-7B layer's groups are 3 x 4096^2 + 11008^2 = 171.5M floats per task
    layer = 3 * 4096 ** 2 + 11008 ** 2
    groups = LLAMA7B.input_groups(ALL)
    assert len(groups) == 4 * 32
    assert hasi_peak_floats(groups, tasks=4, groups_per_pass=4) == 4 * layer          # 2.7 GB for 4 tasks
    assert hasi_peak_floats(groups, tasks=4, groups_per_pass=0) == 4 * 32 * layer     # all at once: 88 GB
    assert hasi_peak_floats([1, 2, 3], tasks=2, groups_per_pass=2) == 2 * (4 + 9)    # worst window of 2
    assert 4 * hasi_peak_floats(groups, 4, 4) / 1e9 == pytest.approx(2.744, abs=1e-3)


def test_estimate_terms_on_plain_numbers():
    tiny = DecoderShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, vocab=10)
    est = estimate(tiny, None, gpus=2, micro_batch=3, max_length=5, rank=2, targets=["q_proj"], tasks=2,
                   bf16=True, activation_checkpointing=True, hasi_groups_per_pass=1, overhead_gib=0)
    b = est["bytes"]
    assert est["parameters"]["lora"] == 2 * 2 * (8 + 8)
    assert b["frozen_weights"] == tiny.params() * 2 / 2
    assert b["trainable_states"] == 64 * 16 / 2
    assert b["activations"] == 2 * 3 * 5 * 8 * 2 + 34 * 3 * 5 * 8
    assert b["logits"] == 10 * 3 * 5 * 10
    assert b["hasi_statistics"] == 4 * 2 * 8 * 8
    static = b["frozen_weights"] + b["trainable_states"] + b["gathered_working_set"]
    assert est["peak_bytes"] == static + max(b["activations"] + b["logits"], b["hasi_statistics"])


def test_llava15_7b_recipe_validates_a_665k_sample_and_prints_its_memory(tmp_path):
    model = tmp_path / "llava-1.5-7b-hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAVA15_7B))
    data, images = write_665k(tmp_path / "playground", n_per_source=8)     # 48 records in LLaVA-665K's layout
    records = json.loads(data.read_text())
    records += [{"id": f"sharegpt_extra_{i}", "conversations": [{"from": "human", "value": f"Count to {i}."},
                                                                 {"from": "gpt", "value": str(i)}]} for i in range(2)]
    data.write_text(json.dumps(records))
    assert len(records) == 50
    source = ("data.sources=[{path: %s, format: llava, task_from: image_folder, text_task: sharegpt, "
              "task_map: {ocr_vqa: ocr, textvqa: ocr}}]" % data)
    cfg = load_train_config(REPO / "configs" / "llava15_7b.yaml",
                            [f"model.path={model}", source, f"data.image_folder={images}", "data.skip_invalid=true",
                             f"train.output_dir={tmp_path / 'out'}"])
    assert (cfg.model.dtype, cfg.data.image_aspect_ratio, cfg.data.max_length) == ("bf16", "pad", 2048)
    assert (cfg.thanora.rank, cfg.thanora.alpha, cfg.thanora.train_projector) == (128, 256, True)
    assert (cfg.train.lr, cfg.train.projector_lr, cfg.train.num_epochs) == (2e-4, 2e-5, 1)
    assert cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * 8 == 128
    assert cfg.model.attn_implementation in ("flash_attention_2", "sdpa")    # auto: flash-attn where installed
    loaded = load_records(cfg.data)
    counts = {t: len(r) for t, r in loaded.by_task.items()}
    assert counts == {"coco": 8, "gqa": 8, "ocr": 16, "sharegpt": 10, "vg": 7} and loaded.skipped == {"vg": 1}
    assert set(counts) == set(cfg.data.tasks)
    est = estimate_for_run(LLAVA15_7B, cfg, tasks=len(counts), gpus=8)
    print("\n" + format_estimate(est))
    assert est["settings"]["hasi_groups_per_pass"] == 4
    assert 20 < est["peak_gib"] < 40                        # fits an A100/H100 40-80 GB; LLaVA used A100-40G
    assert est["gib"]["hasi_statistics"] == pytest.approx(5 * 4 * (3 * 4096 ** 2 + 11008 ** 2) / 2 ** 30)


def test_the_recipe_names_its_model_by_hub_id_and_refuses_it_offline_without_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="llava-hf/llava-1.5-7b-hf"):
        load_train_config(REPO / "configs" / "llava15_7b.yaml")


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_llava_next_is_refused_before_anything_loads(tmp_path, model_type):
    model = tmp_path / "next"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": 1, "prompt": "p", "response": "r", "task": "t"}) + "\n")
    (tmp_path / "run.yaml").write_text(json.dumps({
        "model": {"path": str(model)}, "data": {"sources": [str(tmp_path / "d.jsonl")]},
        "train": {"max_steps": 1, "output_dir": str(tmp_path / "out")}}))
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "train.py"), "--config", str(tmp_path / "run.yaml"),
                           "--check"], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    print(proc.stderr[-600:])
    assert proc.returncode == 2
    assert "model.path:" in proc.stderr and "does not support" in proc.stderr and model_type in proc.stderr
    assert "Traceback" not in proc.stderr
