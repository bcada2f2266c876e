"""Tiny LLaMA / LLaVA models built from configs (no hub), and synthetic multi-task preview batches."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

VOCAB = 128
IMAGE_TOKEN = VOCAB - 1
IMAGE_TOKENS_PER_IMAGE = 4  # (28 / 14)^2 patches, CLS dropped ("default" strategy)


def llama_config(vocab: int = VOCAB, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_llama(seed: int = 0, vocab: int = VOCAB, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab, layers)).float().eval()


def llava_config(vocab: int = VOCAB, image_token: int = IMAGE_TOKEN) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=14, projection_dim=32)
    return LlavaConfig(vision_config=vision, text_config=llama_config(vocab), image_token_id=image_token,
                       vision_feature_select_strategy="default", vision_feature_layer=-1)


def tiny_llava(seed: int = 0, vocab: int = VOCAB, image_token: int = IMAGE_TOKEN) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(llava_config(vocab, image_token)).float().eval()


def synthetic_batches(num_tasks: int, batches: int = 2, batch_size: int = 4, length: int = 12, seed: int = 0,
                      llava: bool = False) -> list[list[dict]]:
    """Per task: batches with a shared 2-token prefix, right padding, and task-specific token ranges
    (task t draws from a vocabulary slice whose width grows with t, so the tasks' statistics differ)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(num_tasks):
        width = 8 + 24 * t
        task = []
        for _ in range(batches):
            ids = torch.randint(3, 3 + width, (batch_size, length), generator=g)
            ids[:, :2] = torch.tensor([1, 5])
            mask = torch.ones_like(ids)
            mask[0, length - 3:] = 0  # padding on one row
            ids[mask == 0] = 0
            batch = {"input_ids": ids, "attention_mask": mask, "task_ids": torch.full((batch_size,), t)}
            if llava:
                ids[:, 2:2 + IMAGE_TOKENS_PER_IMAGE] = IMAGE_TOKEN
                batch["pixel_values"] = torch.randn(batch_size, 3, 28, 28, generator=g)
            batch["labels"] = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
            task.append(batch)
        out.append(task)
    return out
