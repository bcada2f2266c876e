"""Injection of ThanoRA adapters into a model of any family of ``thanora_ds.models`` (transformers 5).

Targets are the ``nn.Linear`` modules of the family's decoder stack (``Family.decoder``) inside its ``layers``
whose last name component is in ``ThanoraConfig.targets``; lm_head, a vision tower and a multimodal projector
are never wrapped (CLIP/DINOv2 towers also have q_proj/v_proj, so the search is scoped to the decoder). Works on
a model whose parameters are ZeRO-3 partitioned: shapes come from ``ds_shape`` when present.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .adapter import ThanoraLinear
from .config import ConfigError, ThanoraConfig
from .models import family_of, module_name, projector


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's real shape, also when ZeRO-3 has replaced it by an empty partition placeholder."""
    return tuple(getattr(param, "ds_shape", param.shape))


def find_targets(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """(full module name, module) of every target linear inside the language model's decoder layers."""
    lm = family_of(model).decoder(model)
    prefix = module_name(model, lm)
    wanted = set(targets)
    found = []
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in wanted and ".layers." in f".{name}":
            found.append((f"{prefix}.{name}" if prefix else name, mod))
    matched = {n.split(".")[-1] for n, _ in found}
    missing = sorted(wanted - matched)
    if missing:
        raise ConfigError(f"thanora.targets: {missing} match no linear layer in the language model's decoder "
                          f"layers (available: {sorted(_linear_leaf_names(lm))})")
    return found


def _linear_leaf_names(module: nn.Module) -> set[str]:
    return {n.split(".")[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear) and n}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def train_projector_only(model: nn.Module) -> dict[str, ThanoraLinear]:
    """``train.adapters: false`` (LLaVA-1.5's stage 1): freeze everything but the multimodal projector, inject
    nothing; returns the (empty) adapters."""
    proj = projector(model)
    if proj is None:
        raise ConfigError("train.adapters: false trains the multimodal projector alone, but the model has none "
                          "(a text-only model?)")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in proj.parameters():
        p.requires_grad_(True)
    return {}


def inject_thanora(model: nn.Module, cfg: ThanoraConfig, num_tasks: int, adapters: bool = True) -> dict[str, ThanoraLinear]:
    """Freeze the model, wrap every target linear in a ThanoraLinear, return them by module name.

    Adapters start as a plain LoRA (A Kaiming-uniform as PEFT/nn.Linear, B = 0) from a seeded generator, so all
    ranks build identical values; the initializer later replaces the task blocks and sets the split.
    ``adapters=False`` (``train.adapters``): no adapters, only the projector trains (``train_projector_only``).
    """
    if not adapters:
        return train_projector_only(model)
    cfg.validate(num_tasks)
    targets = find_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    shared = cfg.resolved_shared_rank(num_tasks)
    uniform = [(cfg.rank - shared) // num_tasks] * num_tasks
    for t in range((cfg.rank - shared) % num_tasks):
        uniform[t] += 1
    wrapped: dict[str, ThanoraLinear] = {}
    for index, (name, linear) in enumerate(targets):
        d_out, d_in = full_shape(linear.weight)
        adapter = ThanoraLinear(linear, cfg.rank, cfg.alpha, cfg.rslora, cfg.dropout, uniform + [shared],
                                in_features=d_in, out_features=d_out)
        generator = torch.Generator().manual_seed(cfg.init_seed * 1_000_003 + index)
        with torch.no_grad():
            a = torch.empty(cfg.rank, d_in, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            adapter.lora_A.copy_(a)
        if cfg.spr_lambda > 0:
            adapter.enable_spr(cfg.spr_normalize, cfg.spr_terms)
        _set_submodule(model, name, adapter)
        wrapped[name] = adapter
    proj = projector(model)
    if cfg.train_projector:
        if proj is None:
            raise ConfigError("thanora.train_projector: the model has no multimodal projector")
        for p in proj.parameters():
            p.requires_grad_(True)
    return wrapped


def thanora_modules(model: nn.Module) -> dict[str, ThanoraLinear]:
    """The adapters already injected in ``model``, by module name (the wrapper's own name)."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, ThanoraLinear)}


def spr_loss(adapters) -> torch.Tensor | None:
    """L_SPR = mean over adapted layers of the per-layer penalty computed in the last forward pass."""
    adapters = list(adapters)
    values = [a.spr_value for a in adapters if a.spr_value is not None]
    if not values:
        return None
    total = torch.stack(values).sum() / len(adapters)
    for a in adapters:
        a.spr_value = None
    return total
