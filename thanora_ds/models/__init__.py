"""Model families: all that is specific to one architecture family lives in that family's module.

    family = family_of(model)            # a loaded model (or a DeepSpeed engine around one)
    family = family_of_path(path)        # a Hugging Face folder, from its config.json alone (nothing loads)

A family says which transformers auto class loads it, where the decoder stack the adapters go into is, which
module is the multimodal projector (if any), which batch keys its forward takes, how every rank runs the same
modules under ZeRO-3, which parts are never adapted, and the legacy weight-name prefixes of its older files.
The rest of thanora_ds (inject, trainer, initializer, evaluate, export, merge, the CLIs) asks the family and
knows no model family by name.

Families: ``llama.DECODER`` (LLaMA and the decoder-only LMs with the same layout: Mistral, Qwen2),
``llava.LLAVA`` (LLaVA-1.5). A new family is one module with a ``Family`` subclass, its entry in ``FAMILIES``
and a tiny-model test (tests/test_model_families.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..typed_config import ConfigError

log = logging.getLogger("thanora_ds.models")


class Family:
    """A text-only causal LM: the defaults; multimodal families override what differs."""

    name = "base"
    model_types: tuple[str, ...] = ()
    refused: dict[str, str] = {}                  # model_type -> what it is: known, and refused up front
    multimodal = False
    auto_class = "AutoModelForCausalLM"           # transformers' auto class that loads the full model
    processor_class = "AutoTokenizer"             # what loads (and saves) its tokenizer / processor
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")   # batch keys the forward takes
    never_adapted: tuple[str, ...] = ()           # name parts of modules whose linears are never adapter targets
    projector_name: str | None = None             # the trainable projector's module name (PEFT modules_to_save)
    legacy_prefixes: tuple[tuple[str, str], ...] = ()   # (transformers 5 name prefix, older files' prefix)

    def check_supported(self, config: dict, path: str | Path, key: str) -> None:
        """Refuse, before anything loads, a model this family would train silently wrong (ConfigError)."""

    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack whose ``layers`` hold the adapter targets."""
        return getattr(model, "model", model)

    def projector(self, model: nn.Module) -> nn.Module | None:
        return None

    def hidden_size(self, config) -> int:
        return int(config.hidden_size)

    def image_token_id(self, processor) -> int | None:
        return None

    def model_inputs(self, batch: dict, device, dtype: torch.dtype) -> dict:
        """The forward's keyword arguments from a collated batch, on ``device``; floating inputs in ``dtype``."""
        return {k: batch[k].to(device, dtype if batch[k].is_floating_point() else None)
                for k in self.inputs if k in batch}

    def symmetric_forward(self, model: nn.Module, batch_has_images: bool):
        """A context for one forward under which every rank runs the same modules (ZeRO-3 gathers each module's
        parameters collectively); nothing to do for a text-only model."""
        return contextlib.nullcontext()

    def auto_model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def load_processor(self, path: str | Path):
        import transformers

        return getattr(transformers, self.processor_class).from_pretrained(str(path))


def _families() -> list[Family]:
    from .llama import DECODER
    from .llava import LLAVA

    return [DECODER, LLAVA]


def _config_dict(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{file}: cannot be read ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: not a JSON object")
    return config


_WARNED: set[str] = set()


def family_for(config: dict, where: str = "the model") -> Family:
    """The family of a model from its config (a config.json dict). A text-only model of a type no family lists
    is taken as a LLaMA-layout decoder (``model.layers``), with a warning: its targets are checked by name when
    the adapters go in. A multimodal model of an unknown type is refused: its vision path is family-specific."""
    kind = config.get("model_type")
    families = _families()
    for family in families:
        if kind in family.model_types:
            return family
    for family in families:
        if kind in family.refused:
            return family   # its check_supported says why
    if config.get("vision_config"):
        raise ConfigError(
            f"{where}: model_type {kind!r} is a multimodal family thanora_ds does not know (known: "
            f"{sorted(t for f in families if f.multimodal for t in f.model_types)}); its vision path, inputs and "
            "projector would be guessed. Add a family module under thanora_ds/models/ for it.")
    from .llama import DECODER

    if kind not in _WARNED:
        _WARNED.add(kind)
        log.warning("%s: model_type %r is not a listed family (%s); treating it as a LLaMA-layout decoder "
                    "(adapters in model.layers; targets are checked by name)", where, kind,
                    sorted(t for f in families for t in f.model_types))
    return DECODER


def family_of_path(path: str | Path, key: str = "model.path") -> Family:
    """The family of a Hugging Face model folder from its config.json, checked (exit 2 on a refused model)."""
    config = _config_dict(path)
    family = family_for(config, f"{key}: {path}")
    family.check_supported(config, path, key)
    return family


def family_of(model: nn.Module) -> Family:
    """The family of a loaded model (a DeepSpeed engine is unwrapped)."""
    model = getattr(model, "module", model)
    config = model.config   # only what family_for reads (to_dict would copy the whole config at every batch)
    return family_for({"model_type": config.model_type, "vision_config": getattr(config, "vision_config", None)},
                      type(model).__name__)


def projector(model: nn.Module) -> nn.Module | None:
    """The multimodal projector of a model (None for a text-only one)."""
    model = getattr(model, "module", model)
    return family_of(model).projector(model)


def projector_of_parameter(name: str) -> str | None:
    """The projector module's name (a family's ``projector_name``) that a full parameter name lies in, else None:
    a checkpoint's trainable parameters are adapters or projector parameters, and PEFT's ``modules_to_save``
    names the projector by that last component."""
    parts = name.split(".")
    return next((f.projector_name for f in _families() if f.projector_name in parts), None)


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
