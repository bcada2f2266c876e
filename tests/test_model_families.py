"""Model families (thanora_ds.models): which family a model is, what each family owns, and the decoder family on
Qwen2 and Mistral, each a tiny model trained, merged and exported through the same code as LLaMA."""
import copy
import json
import logging

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from thanora_ds.config import ThanoraConfig
from thanora_ds.hasi import common_prefix_length
from thanora_ds.initializer import run_hasi
from thanora_ds.inject import inject_thanora, spr_loss
from thanora_ds.merge import export_peft, merge_into_base
from thanora_ds.models import family_of, family_of_path, projector, projector_of_parameter
from thanora_ds.typed_config import ConfigError
from tiny_models import llama_config, llava_config, synthetic_batches, tiny_llama, tiny_llava

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)


def write_config(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_family_from_a_folder_and_from_a_loaded_model(tmp_path):
    llama = write_config(tmp_path / "llama", llama_config().to_dict())
    llava = write_config(tmp_path / "llava", llava_config().to_dict())
    assert family_of_path(llama).name == "llama" and family_of(tiny_llama()).name == "llama"
    assert family_of_path(llava).name == "llava" and family_of(tiny_llava()).name == "llava"
    for kind in ("qwen2", "mistral"):
        assert family_of_path(write_config(tmp_path / kind, {"model_type": kind})).name == "llama"


def test_what_each_family_owns():
    llama, llava = tiny_llama(), tiny_llava()
    assert family_of(llama).decoder(llama) is llama.model and projector(llama) is None
    assert family_of(llava).decoder(llava) is llava.model.language_model
    assert projector(llava) is llava.model.multi_modal_projector
    assert family_of(llava).auto_model_class().__name__ == "AutoModelForImageTextToText"
    assert family_of(llama).auto_model_class() is AutoModelForCausalLM
    # the forward's inputs: only the keys it takes, floating ones in the model's dtype, ids kept integer
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "pixel_values": torch.zeros(2, 3, 28, 28), "labels": torch.ones(2, 5), "task_ids": torch.zeros(2)}
    inputs = family_of(llava).model_inputs(batch, "cpu", torch.bfloat16)
    assert sorted(inputs) == ["attention_mask", "input_ids", "pixel_values"]
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.long
    assert sorted(family_of(llama).model_inputs(batch, "cpu", torch.bfloat16)) == ["attention_mask", "input_ids"]
    # a checkpoint's projector parameters are recognised by name, adapters are not
    assert projector_of_parameter("model.multi_modal_projector.linear_1.weight") == "multi_modal_projector"
    assert projector_of_parameter("model.language_model.layers.0.self_attn.q_proj.lora_A") is None


def test_unknown_families(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="thanora_ds.models"):
        family = family_of_path(write_config(tmp_path / "gemma", {"model_type": "gemma_like_test"}))
    assert family.name == "llama" and "gemma_like_test" in caplog.text and "not a listed family" in caplog.text
    folder = write_config(tmp_path / "vlm", {"model_type": "some_vlm", "vision_config": {"hidden_size": 8}})
    with pytest.raises(ConfigError, match="model.path: .*some_vlm.*multimodal family thanora_ds does not know"):
        family_of_path(folder)
    with pytest.raises(ConfigError, match="LLaVA-NeXT"):
        family_of_path(write_config(tmp_path / "next", {"model_type": "llava_next", "vision_config": {}}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken/config.json: not valid JSON \(line 1"):
        family_of_path(tmp_path / "broken")


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("cls,config", [(Qwen2ForCausalLM, Qwen2Config), (MistralForCausalLM, MistralConfig)],
                         ids=["qwen2", "mistral"])
def test_decoder_family_trains_merges_and_exports(tmp_path, cls, config):
    torch.manual_seed(0)
    model = cls(config(**SMALL)).float().eval()
    base = copy.deepcopy(model)
    base.save_pretrained(tmp_path / "base")
    assert family_of_path(tmp_path / "base").name == "llama"
    cfg = ThanoraConfig(rank=8, alpha=16, mode="orthogonal", dropout=0.0, spr_lambda=1e-2)
    batches = synthetic_batches(3)
    adapters = inject_thanora(model, cfg, 3)
    assert len(adapters) == 2 * 7 and all(n.startswith("model.layers.") for n in adapters)
    prefix = common_prefix_length([row.tolist() for task in batches for b in task for row in b["input_ids"]])
    run_hasi(model, adapters, cfg, ["a", "b", "c"], lambda t: batches[t], prefix)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for task in batches:
        loss = model(**{k: task[0][k] for k in ("input_ids", "attention_mask", "labels")}).loss
        (loss + cfg.spr_lambda * spr_loss(adapters.values())).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    probe = batches[1][1]
    adapted = _logits(model, probe)
    assert not torch.allclose(adapted, _logits(base, probe), atol=1e-4)
    export_peft(model, tmp_path / "peft", str(tmp_path / "base"))
    merge_into_base(copy.deepcopy(model)).save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, probe), adapted, atol=1e-5, rtol=0)
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in base.named_parameters()]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
                                     tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(peft, probe), adapted, atol=1e-5, rtol=0)
