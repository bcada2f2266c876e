"""LLaVA-1.5 (``LlavaForConditionalGeneration``, model_type ``llava``): a vision tower, a multimodal projector
and a LLaMA-layout language model, loaded by ``AutoModelForImageTextToText`` with an ``AutoProcessor``.

Supported end to end: a fixed number of image tokens per image, 4-D pixel values, the projector trainable
(``thanora.train_projector``; alone in stage 1, ``train.adapters: false``), adapters in the language model only
(the CLIP / DINOv2 tower has q_proj/v_proj too, so the target search stays inside the language model).

LLaVA-NeXT (``llava_next``: anyres tiling, 5-D pixel values whose valid tiles are given by ``image_sizes``) and its
video / OneVision relatives are refused up front: this framework's data path computes one fixed-size pixel tensor
per image and does not carry ``image_sizes`` through collation, HASI's previews and evaluation, so such a model
would train on wrongly tiled (or padded) images without any error. Refused with exit 2 at config validation,
before the data or the model is loaded.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from ..typed_config import ConfigError
from . import Family


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    refused = {   # model_type -> what it is, for the message
        "llava_next": "LLaVA-NeXT (anyres tiling; 5-D pixel_values with image_sizes)",
        "llava_next_video": "LLaVA-NeXT-Video (anyres tiling, video frames)",
        "llava_onevision": "LLaVA-OneVision (anyres tiling; 5-D pixel_values with image_sizes)",
    }
    multimodal = True
    auto_class = "AutoModelForImageTextToText"
    processor_class = "AutoProcessor"
    inputs = ("input_ids", "attention_mask", "pixel_values")
    never_adapted = ("vision_tower", "vision_model", "multi_modal_projector")
    projector_name = "multi_modal_projector"
    # transformers 5 names -> the names older LLaVA checkpoints (llava-hf/*) still use in their files
    legacy_prefixes = (("model.language_model.", "language_model.model."),
                       ("model.multi_modal_projector.", "multi_modal_projector."),
                       ("model.vision_tower.", "vision_tower."), ("lm_head.", "language_model.lm_head."))

    def check_supported(self, config: dict, path: str | Path, key: str) -> None:
        kind = config.get("model_type")
        if kind in self.refused:
            raise ConfigError(
                f"{key}: {path} is a {self.refused[kind]} model (config.json model_type {kind!r}), which thanora_ds "
                "does not support: its images are tiled into a variable number of crops whose layout (image_sizes) "
                "this framework's data, HASI and evaluation paths do not carry, so it would train on wrong image "
                "features. Use a LLaVA-1.5 model (model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf).")

    def decoder(self, model: nn.Module) -> nn.Module:
        return getattr(model, "model", model).language_model

    def projector(self, model: nn.Module) -> nn.Module | None:
        return getattr(model, "model", model).multi_modal_projector

    def hidden_size(self, config) -> int:
        return int(config.text_config.hidden_size)

    def image_token_id(self, processor) -> int | None:
        return getattr(processor, "image_token_id", None) if processor is not None else None

    @contextlib.contextmanager
    def symmetric_forward(self, model: nn.Module, batch_has_images: bool):
        """Under ZeRO-3 every module's forward gathers its parameters collectively, so all ranks must run the same
        modules in the same order. A rank whose micro-batch has no image would skip the vision tower and
        projector while another rank runs them, and the collectives would mismatch. If any rank has images, a
        rank without runs them on one dummy image, right after the token embeddings (where the real ones run),
        and adds 0 x the result to the embeddings so that its backward (and projector gradient reduction)
        happens too."""
        from .. import distributed as D

        if D.world_size() == 1 or not D.any_rank(batch_has_images) or batch_has_images:
            yield
            return
        inner = getattr(getattr(model, "module", model), "model")
        config = getattr(model, "module", model).config
        size = config.vision_config.image_size
        param = next(inner.vision_tower.parameters())
        dummy = torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)

        def add_dummy_vision(module, args, output):
            features = inner.get_image_features(pixel_values=dummy, return_dict=True).pooler_output
            features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
            return output + 0 * features.sum().to(output.dtype)

        handle = inner.get_input_embeddings().register_forward_hook(add_dummy_vision)
        try:
            yield
        finally:
            handle.remove()


LLAVA = LlavaFamily()
