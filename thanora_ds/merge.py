"""Merge the adapters into the base weights (a plain Hugging Face model) and export them in PEFT LoRA format.

    merged:  W' = W + s B A            (mode corda: W is already the residual W_res = W0 - s B_0 A_0)
    PEFT:    (B, A) against the original base; mode corda: the rank-2r pair [B, -B_0] [A; A_0] with alpha
             doubled (sqrt(2) x with rsLoRA) so the scale s is unchanged and no residual base is needed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .adapter import ThanoraLinear
from .inject import thanora_modules
from .models import module_name, projector, projector_of_parameter


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s B A, computed in fp32 (or wider) and returned in W's dtype."""
    work = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(work) + scale * (lora_B.to(work) @ lora_A.to(work))).to(weight.dtype)


def peft_pair(lora_A: torch.Tensor, lora_B: torch.Tensor, a0: torch.Tensor | None, b0: torch.Tensor | None):
    """The (A, B) PEFT stores against the ORIGINAL base: as is, or [A; A_0], [B, -B_0] for corda."""
    if a0 is None:
        return lora_A, lora_B
    return torch.cat([lora_A, a0.to(lora_A.dtype)], 0), torch.cat([lora_B, -b0.to(lora_B.dtype)], 1)


def peft_alpha(alpha: float, rslora: bool, corda: bool) -> float:
    if not corda:
        return alpha
    return alpha * (math.sqrt(2) if rslora else 2.0)


@torch.no_grad()
def merge_into_base(model: nn.Module) -> nn.Module:
    """Replace every ThanoraLinear by its base nn.Linear carrying W + s B A; the model is then exactly the
    base architecture (same module tree and parameter names). In place; returns the model."""
    for name, adapter in thanora_modules(model).items():
        base = adapter.base
        base.weight.copy_(merged_weight(base.weight, adapter.lora_A, adapter.lora_B, adapter.scale))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def peft_task(model_class: str | None, module: str | None) -> dict:
    """What lets PEFT's auto classes rebuild the base: ``task_type: CAUSAL_LM`` for a causal LM
    (``AutoPeftModelForCausalLM``); otherwise (LLaVA: no PEFT task type fits) the base class itself as
    ``auto_mapping`` (``AutoPeftModel``)."""
    if model_class is None:
        return {"task_type": None}
    if model_class.endswith("ForCausalLM"):
        return {"task_type": "CAUSAL_LM"}
    return {"task_type": None, "auto_mapping": {"base_model_class": model_class, "parent_library": module}}


def peft_config(targets: list[str], rank: int, alpha: float, rslora: bool, dropout: float, base_path: str,
                modules_to_save: list[str] | None, corda: bool, model_class: tuple[str, str] | None = None) -> dict:
    return {
        "peft_type": "LORA",
        **peft_task(*(model_class or (None, None))),
        "base_model_name_or_path": base_path,
        "r": 2 * rank if corda else rank,
        "lora_alpha": peft_alpha(alpha, rslora, corda),
        "use_rslora": rslora,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
    }


def _peft_key(module_name: str, leaf: str) -> str:
    return f"base_model.model.{module_name}.{leaf}"


@torch.no_grad()
def export_peft(model: nn.Module, out_dir: str | Path, base_path: str = "") -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``
    on the original base model (a trained projector goes in as a PEFT ``modules_to_save`` entry)."""
    adapters = thanora_modules(model)
    if not adapters:
        raise ValueError("export_peft: the model has no ThanoRA adapters")
    first: ThanoraLinear = next(iter(adapters.values()))
    layers = {name: (a.lora_A, a.lora_B, a.corda_A0, a.corda_B0) for name, a in adapters.items()}
    projector_params = {}
    module = projector(model)
    if module is not None and any(p.requires_grad for p in module.parameters()):
        prefix = module_name(model, module)
        projector_params = {f"{prefix}.{n}": p for n, p in module.named_parameters()}
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    write_peft(out_dir, layers, projector_params, first.rank, first.alpha, first.rslora, dropout, base_path,
               (type(model).__name__, type(model).__module__))


@torch.no_grad()
def write_peft(out_dir: str | Path, layers: dict, projector: dict[str, torch.Tensor] | None, rank: int, alpha: float,
               rslora: bool, dropout: float, base_path: str = "", model_class: tuple[str, str] | None = None) -> None:
    """The PEFT files from plain tensors: ``layers`` maps module name -> (A, B, A_0 or None, B_0 or None);
    ``projector`` maps full parameter names of a trained projector to values (saved as ``modules_to_save``)."""
    corda = next(iter(layers.values()))[2] is not None
    tensors: dict[str, torch.Tensor] = {}
    for name, (lora_a, lora_b, a0, b0) in layers.items():
        a, b = peft_pair(lora_a, lora_b, a0, b0)
        tensors[_peft_key(name, "lora_A.weight")] = a.detach().contiguous().cpu()
        tensors[_peft_key(name, "lora_B.weight")] = b.detach().contiguous().cpu()
    modules_to_save = None
    if projector:
        modules_to_save = sorted({_module_to_save(n) for n in projector})
        for full_name, p in projector.items():
            tensors[f"base_model.model.{full_name}"] = p.detach().contiguous().cpu()
    cfg = peft_config(list(layers), rank, alpha, rslora, dropout, base_path, modules_to_save, corda, model_class)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def _module_to_save(param_name: str) -> str:
    """PEFT names a module to save by its last name component: that of the projector holding the parameter."""
    name = projector_of_parameter(param_name)
    if name is None:
        raise ValueError(f"write_peft: {param_name} is not a multimodal projector parameter")
    return name
