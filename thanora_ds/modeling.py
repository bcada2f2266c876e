"""Loading the model and its tokenizer/processor with the real Hugging Face code (``from_pretrained``).

Under ZeRO-3 the model is built the ZeRO-3 way: an ``HfDeepSpeedConfig`` kept alive during
``from_pretrained`` makes transformers construct it under ``deepspeed.zero.Init``, so parameters are
partitioned as they load and no rank ever holds a full copy (and Hugging Face's weight init still runs).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from .models import family_of_path
from .train_config import ModelConfig

_KEEP_ALIVE = []  # HfDeepSpeedConfig must outlive from_pretrained (transformers holds a weak reference)


def load_processor(cfg: ModelConfig):
    """(tokenizer, processor): the processor is the family's (AutoProcessor) for multimodal models, else None."""
    family = family_of_path(cfg.path)
    loaded = family.load_processor(cfg.processor_path or cfg.path)
    processor, tokenizer = (loaded, loaded.tokenizer) if family.multimodal else (None, loaded)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, processor


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_digest(path: str | Path, samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """A cheap identity of a model folder's weights: sha256 over each weight file's name, size, safetensors
    header (names, dtypes, shapes, offsets) and ``samples`` evenly spaced ``sample_bytes`` reads of its data.
    Two folders with the same config.json but other weights (another fine-tune, another seed) differ in
    their data everywhere, so the sampled reads tell them apart without reading gigabytes."""
    import hashlib
    import struct

    h = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            if file.suffix == ".safetensors" and size >= 8:
                (n,) = struct.unpack("<Q", f.read(8))
                h.update(f.read(min(n, size - 8)))
            for k in range(samples):
                f.seek(max(0, (size - sample_bytes) * k // max(1, samples - 1)))
                h.update(f.read(sample_bytes))
    return h.hexdigest()


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a model folder's safetensors headers (no weight is read); {} without them."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def hidden_size(path: str) -> int:
    return family_of_path(path).hidden_size(AutoConfig.from_pretrained(path))


def load_model(cfg: ModelConfig, ds_config: dict | None = None):
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _KEEP_ALIVE[:] = [HfDeepSpeedConfig(ds_config)]
    cls = family_of_path(cfg.path).auto_model_class()
    model = cls.from_pretrained(cfg.path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        # Non-reentrant: the adapters' SPR term built inside forward keeps its gradient (see adapter.py).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5.x name
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def release_zero3_model_loading() -> None:
    """Forget the HfDeepSpeedConfig of a finished run: while it is registered, transformers builds every model
    loaded later in the process under zero.Init (empty, partitioned parameters)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    _KEEP_ALIVE.clear()
    unset_hf_deepspeed_config()
