"""LLaMA-layout decoder-only language models (``AutoModelForCausalLM``): LLaMA, SmolLM2, Mistral, Qwen2.

All of them keep the decoder stack at ``model.model`` with its blocks in ``layers`` and name the projections
q/k/v/o_proj and gate/up/down_proj, so the adapters, HASI's statistics and the merge are the same code; only
the text goes in (``input_ids``, ``attention_mask``), and there is no projector and no vision tower.
Qwen2's q/k/v biases stay on the frozen base linear: merging adds s B A to the weight and leaves the bias.
"""
from __future__ import annotations

from . import Family


class DecoderFamily(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")


DECODER = DecoderFamily()
