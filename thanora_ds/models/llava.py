"""LLaVA specifics: which LLaVA families this framework trains correctly, checked before anything loads.

LLaVA-1.5 (``LlavaForConditionalGeneration``, model_type ``llava``) is supported end to end: a fixed number of
image tokens per image, 4-D pixel values, the projector trainable, adapters in the language model only.

LLaVA-NeXT (``llava_next``: anyres tiling, 5-D pixel values whose valid tiles are given by ``image_sizes``) and its
video / OneVision relatives are refused up front: this framework's data path computes one fixed-size pixel tensor
per image and does not carry ``image_sizes`` through collation, HASI's previews and evaluation, so such a model
would train on wrongly tiled (or padded) images without any error. Refused with exit 2 at config validation,
before the data or the model is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..typed_config import ConfigError

SUPPORTED = {"llava"}
# model_type -> what it is, for the message
REFUSED = {
    "llava_next": "LLaVA-NeXT (anyres tiling; 5-D pixel_values with image_sizes)",
    "llava_next_video": "LLaVA-NeXT-Video (anyres tiling, video frames)",
    "llava_onevision": "LLaVA-OneVision (anyres tiling; 5-D pixel_values with image_sizes)",
}


def model_type(path: str | Path) -> str | None:
    """``model_type`` of a Hugging Face folder's config.json (None when the file has none or is unreadable)."""
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def check_supported(path: str | Path, key: str = "model.path") -> None:
    """Refuse a model family this framework would train silently wrong (ConfigError: exit 2 in every command)."""
    kind = model_type(path)
    if kind in REFUSED:
        raise ConfigError(
            f"{key}: {path} is a {REFUSED[kind]} model (config.json model_type {kind!r}), which thanora_ds does not "
            "support: its images are tiled into a variable number of crops whose layout (image_sizes) this "
            "framework's data, HASI and evaluation paths do not carry, so it would train on wrong image features. "
            "Use a LLaVA-1.5 model (model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf).")

