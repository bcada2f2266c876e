"""After training: read a run's checkpoint offline and turn it into a Hugging Face model or a PEFT adapter.

* ``find_checkpoint`` / ``load_checkpoint``: a ``checkpoints/step-N`` folder written by ``Trainer.save`` at any
  world size -> the adapters (fp32, reassembled from DeepSpeed's ZeRO partitions in one process, no process
  group), the trained projector, the HASI allocation, corda's initial blocks and the run's settings.
* ``BaseWeights`` + ``check_base``: the base model's safetensors files, and the refusal of a base that is not
  the one the checkpoint was trained on (another config, or a layer of another shape).
* ``stream_merge``: writes ``W + s B A`` (mode corda: ``W_0 + s [B, -B_0][A; A_0]``, from the ORIGINAL base) tensor
  by tensor into safetensors shards, so RAM holds the adapters, one output shard and one tensor; never a model.
* ``export_adapter``: the PEFT LoRA adapter for the original base (``merge.write_peft``).
* ``build_adapted_model``: the unmerged adapted model in one process (evaluation of a live checkpoint, latency).
"""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import distributed as D
from .checkpoint import META, CheckpointError, Checkpoints, verify
from .config import ThanoraConfig, from_dict
from .initializer import Allocation, subtract_corda_residual
from .merge import merged_weight, peft_pair, write_peft
from .models import family_of_path, projector_of_parameter

log = logging.getLogger("thanora_ds.export")
RUN_INFO = "thanora_run.json"   # written next to a merged model / adapter: where it came from, with the run config
IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "architectures"}


class ExportError(CheckpointError):
    """A checkpoint or base model that cannot be merged / exported; the message names the file or key."""


@dataclass
class RunCheckpoint:
    path: Path
    meta: dict
    thanora: ThanoraConfig
    tasks: list[str]
    allocation: Allocation
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]          # layer -> (A [r, d_in], B [d_out, r]), fp32
    corda: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (A_0, B_0)
    projector: dict[str, torch.Tensor] = field(default_factory=dict)  # full parameter name -> value

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    @property
    def base_path(self) -> str:
        return self.config.get("model", {}).get("path", "")

    @property
    def processor_path(self) -> str:
        return self.config.get("model", {}).get("processor_path") or self.base_path

    @property
    def scale(self) -> float:
        from .adapter import lora_scale
        return lora_scale(self.thanora.alpha, self.thanora.rank, self.thanora.rslora)

    def peft_pair(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) against the ORIGINAL base weight (rank 2r in mode corda)."""
        a, b = self.lora[layer]
        a0, b0 = self.corda.get(layer, (None, None))
        return peft_pair(a, b, a0, b0)

    def run_info(self, kind: str) -> dict:
        return {"kind": kind, "checkpoint": str(self.path), "step": self.meta.get("step"),
                "world_size": self.meta.get("world_size"), "tasks": self.tasks, "config": self.config}


def find_checkpoint(output_dir: str | Path, tag: str | None = None) -> Path:
    """The checkpoint folder: OUTPUT_DIR may be the run's output_dir, its ``checkpoints`` folder or a checkpoint
    folder itself; TAG is ``latest`` (default), ``step-00000040`` or a step number."""
    path = Path(output_dir)
    if (path / META).is_file() and tag is None:
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise ExportError(f"{output_dir}: no such directory")
    if tag in (None, "latest"):
        found = Checkpoints(root.parent).latest() if root.name == "checkpoints" else None
        if found is None:
            raise ExportError(f"{root}: no complete checkpoint (no step-*/{META}); is it a training output_dir?")
        return found
    name = Checkpoints.name(int(tag)) if str(tag).isdigit() else str(tag)
    candidate = root / name
    if not (candidate / META).is_file():
        have = sorted(p.name for p in root.glob("step-*") if (p / META).is_file())
        raise ExportError(f"{candidate}: no complete checkpoint with tag {tag!r}; available: {have or 'none'}")
    return candidate


def load_checkpoint(path: str | Path) -> RunCheckpoint:
    """Everything merge/export/eval need from one checkpoint folder (no GPU, no process group)."""
    path = Path(path)
    meta = Checkpoints.read_meta(path)
    problem = verify(path)
    if problem:
        raise ExportError(f"{path}: damaged checkpoint: {problem}")
    config = meta.get("config") or {}
    if "thanora" not in config or "model" not in config:
        raise ExportError(f"{path / META}: no 'config.thanora' / 'config.model' (written by another version?)")
    thanora = from_dict(ThanoraConfig, config["thanora"], "thanora")
    tasks = list(meta.get("fingerprint", {}).get("tasks") or [])
    alloc_file = path / "allocation.json"
    if not alloc_file.is_file():
        raise ExportError(f"{alloc_file}: missing; the checkpoint is incomplete")
    allocation = Allocation.load(alloc_file)
    trainable = D.read_zero_trainable(path)
    lora = {}
    for layer in allocation.layers:
        try:
            a, b = trainable.pop(f"{layer}.lora_A"), trainable.pop(f"{layer}.lora_B")
        except KeyError as err:
            raise ExportError(f"{path}: the DeepSpeed checkpoint has no parameter {err.args[0]} although "
                              f"{alloc_file.name} lists layer {layer}") from None
        if a.shape[0] != thanora.rank or b.shape[1] != thanora.rank:
            raise ExportError(f"{path}: {layer} has rank {a.shape[0]} but {META} says thanora.rank={thanora.rank}")
        lora[layer] = (a, b)
    stray = [n for n in trainable if projector_of_parameter(n) is None]
    if stray:
        raise ExportError(f"{path}: trainable parameters that are neither adapters of {alloc_file.name} nor the "
                          f"projector: {stray[:4]}")
    if trainable and not thanora.train_projector:
        raise ExportError(f"{path}: projector parameters saved but {META} says thanora.train_projector=false")
    corda = {}
    if thanora.mode == "corda":
        init_file = path / "corda_init.safetensors"
        if not init_file.is_file():
            raise ExportError(f"{init_file}: missing (mode corda needs the initial blocks to undo the residual)")
        init = load_file(str(init_file))
        for layer in lora:
            if f"{layer}.corda_A0" not in init:
                raise ExportError(f"{init_file}: no {layer}.corda_A0")
            corda[layer] = (init[f"{layer}.corda_A0"].float(), init[f"{layer}.corda_B0"].float())
    return RunCheckpoint(path, meta, thanora, tasks, allocation, lora, corda, dict(trainable))


# ------------------------------------------------------------------------------------------------------------
class BaseWeights:
    """The tensors of a Hugging Face model folder's safetensors files, read one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").is_file():
            self.files = ["model.safetensors"]
        else:
            raise ExportError(f"{self.path}: no model.safetensors(.index.json); the base model must be a Hugging "
                              "Face folder with safetensors weights (re-save it with save_pretrained)")
        self.family = family_of_path(self.path, "the base model")
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in self.files:
            with safe_open(str(self.path / name), "pt") as f:
                for key in f.keys():
                    self.file_of[key] = name
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    def key_of(self, live_name: str) -> str | None:
        """The file key of a parameter named as in the loaded (transformers 5) model, also for legacy files."""
        if live_name in self.file_of:
            return live_name
        for new, old in self.family.legacy_prefixes:
            if live_name.startswith(new) and old + live_name[len(new):] in self.file_of:
                return old + live_name[len(new):]
        return None

    def iter_tensors(self):
        """(file, key, tensor) in file order, one tensor in memory at a time. The file is memory-mapped anew for
        each tensor: pages of a mapping held open would stay resident and count as a second copy in the RSS."""
        for name in self.files:
            with safe_open(str(self.path / name), "pt") as f:
                keys = list(f.keys())
            for key in keys:
                with safe_open(str(self.path / name), "pt") as f:
                    tensor = f.get_tensor(key)
                yield name, key, tensor


def _comparable_config(path: Path) -> dict:
    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in IGNORED_CONFIG_KEYS}
    return clean(json.loads((path / "config.json").read_text()))


def check_base(ckpt: RunCheckpoint, base: BaseWeights, allow_other_weights: bool = False) -> dict[str, str]:
    """Refuse a base model the checkpoint was not trained on: another config, a layer of another shape, or (from
    the run's weights digest) other weights under the same config. Returns {file key: adapter layer or projector
    parameter name} for the tensors the merge replaces."""
    from .modeling import weights_digest

    if not (base.path / "config.json").is_file():
        raise ExportError(f"{base.path}: no config.json (not a Hugging Face model folder)")
    trained_on = Path(ckpt.base_path)
    if trained_on.resolve() != base.path.resolve() and (trained_on / "config.json").is_file():
        ours, theirs = _comparable_config(base.path), _comparable_config(trained_on)
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if diff:
            raise ExportError(f"{ckpt.path / META} says the run trained {trained_on}, whose config.json differs from "
                              f"{base.path / 'config.json'} in {diff}: refusing to merge into another model")
    targets: dict[str, str] = {}
    for layer, (a, b) in ckpt.lora.items():
        key = base.key_of(f"{layer}.weight")
        if key is None:
            raise ExportError(f"{ckpt.path}: adapted layer {layer} has no weight in {base.path} (another "
                              "architecture than the one trained?)")
        want = (b.shape[0], a.shape[1])
        if base.shapes[key] != want:
            raise ExportError(f"{ckpt.path}: {layer} was trained on a {list(want)} weight but {base.path / base.file_of[key]}"
                              f" has {key} of shape {list(base.shapes[key])}: not the base model of this checkpoint")
        targets[key] = layer
    for name, value in ckpt.projector.items():
        key = base.key_of(name)
        if key is None or base.shapes[key] != tuple(value.shape):
            raise ExportError(f"{ckpt.path}: trained projector parameter {name} {list(value.shape)} has no "
                              f"counterpart of that shape in {base.path}")
        targets[key] = name
    trained_digest = ckpt.meta.get("fingerprint", {}).get("model_weights_digest")
    if trained_digest and not allow_other_weights and weights_digest(base.path) != trained_digest:
        raise ExportError(f"{base.path}: its weights are not those the run trained on ({ckpt.path / META} records "
                          f"another weights digest of {ckpt.base_path}): another fine-tune, seed or dtype of the same "
                          "architecture. Merge into the very base that was trained on (pass --allow-other-weights "
                          "only if you know this copy holds the same values, e.g. re-saved in another dtype)")
    return targets


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: kB


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(text).upper())
    if not m:
        raise ValueError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the files merge / export write: with --overwrite, only these are replaced (or removed when stale) in an existing folder
OUTPUT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                   "adapter_config.json", RUN_INFO)


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


@contextmanager
def output_folder(out_dir: str | Path, protected: list[str | Path], overwrite: bool = False):
    """A fresh folder to write merge / export output into, moved into place as ``out_dir`` on success.

    Never writes into, or deletes from, a folder this command did not create unless ``overwrite``: an existing
    non-empty ``out_dir`` is refused, and with ``overwrite`` only the files written (and stale files of the same
    kinds, ``OUTPUT_PATTERNS``) are replaced. ``out_dir`` may never overlap a ``protected`` folder (the base model,
    the checkpoints), whatever ``overwrite`` says. On failure the partial folder is removed and ``out_dir`` is
    untouched."""
    out = Path(out_dir).resolve()
    for p in protected:
        if p and _overlap(out, Path(p).resolve()):
            raise ExportError(f"--out {out_dir}: overlaps {p}, which this command reads (the base model or the "
                              "checkpoints); choose a separate folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out_dir}: exists and is not a folder")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and not overwrite:
        raise ExportError(f"--out {out_dir}: not empty ({', '.join(existing[:5])}{' ...' if len(existing) > 5 else ''})"
                          "; choose a new folder, or pass --overwrite to replace the files merge writes there")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)  # a leftover of this very pid's earlier attempt
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if not out.exists():
        os.replace(partial, out)
        return
    written = {p.name for p in partial.iterdir()}
    for pattern in OUTPUT_PATTERNS:
        for stale in out.glob(pattern):
            if stale.name not in written and stale.is_file():
                stale.unlink()
    for item in partial.iterdir():
        target = out / item.name
        if target.is_dir() and not item.is_dir():
            raise ExportError(f"--out {out_dir}: {target} is a folder where merge writes a file; left as it is "
                              f"(the output is in {partial})")
        os.replace(item, target)
    partial.rmdir()


@torch.no_grad()
def stream_merge(ckpt: RunCheckpoint, base_path: str | Path, out_dir: str | Path, max_shard_size="5GB",
                 dtype: str | None = None, progress: bool = True, allow_other_weights: bool = False) -> dict:
    """Write the merged model (weights, config, generation config, tokenizer/processor) to ``out_dir`` (a fresh
    folder: see ``output_folder``)."""
    from tqdm import tqdm

    base = BaseWeights(base_path)
    targets = check_base(ckpt, base, allow_other_weights)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit, cast = parse_size(max_shard_size), DTYPES[dtype] if dtype else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes, written, weight_map, total = 0, [], {}, 0
    merged_count = 0

    def flush():
        nonlocal shard_bytes
        if shards[-1]:
            name = f".part-{len(written):05d}.safetensors"
            save_file(shards[-1], str(out / name), metadata={"format": "pt"})
            written.append((name, list(shards[-1])))
            shards[-1] = {}
            shard_bytes = 0

    bar = tqdm(total=len(base.file_of), desc="merge", unit="tensor", disable=not progress)
    for _, key, tensor in base.iter_tensors():
        target = targets.get(key)
        if target in ckpt.lora:
            a, b = ckpt.peft_pair(target)
            tensor = merged_weight(tensor, a, b, ckpt.scale)
            merged_count += 1
        elif target is not None:
            tensor = ckpt.projector[target].to(tensor.dtype)
        if cast is not None and tensor.is_floating_point():
            tensor = tensor.to(cast)
        size = tensor.numel() * tensor.element_size()
        if shard_bytes and shard_bytes + size > limit:
            flush()
        shards[-1][key] = tensor.contiguous()
        shard_bytes += size
        total += size
        bar.update(1)
    flush()
    bar.close()
    if merged_count != len(ckpt.lora):
        raise ExportError(f"merged {merged_count} of {len(ckpt.lora)} adapted layers (a weight listed twice?)")
    n = len(written)
    for i, (tmp, keys) in enumerate(written):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({k: final for k in keys})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _write_side_files(ckpt, Path(base_path), out, cast)
    (out / RUN_INFO).write_text(json.dumps(ckpt.run_info("merged"), indent=1, default=str))
    return {"tensors": len(weight_map), "merged_layers": merged_count, "shards": n, "bytes": total,
            "peak_rss_mb": peak_rss_mb()}


def _write_side_files(ckpt: RunCheckpoint, base_path: Path, out: Path, cast) -> None:
    """config.json, generation_config.json and the tokenizer or processor, next to the merged weights."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(base_path)
    if cast is not None:
        config.dtype = cast
    config.save_pretrained(out)
    if (base_path / "generation_config.json").is_file():
        shutil.copy(base_path / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(out)
    _save_processor(ckpt.processor_path if Path(ckpt.processor_path).is_dir() else base_path, base_path, out)


def _save_processor(source: str | Path, model_path: str | Path, out: Path) -> None:
    family_of_path(model_path).load_processor(source).save_pretrained(out)


def base_model_class(base_path: str | Path) -> tuple[str, str] | None:
    """(class name, module) of the base model as its config.json names it, e.g. LlavaForConditionalGeneration."""
    import transformers

    names = json.loads((Path(base_path) / "config.json").read_text()).get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    return (cls.__name__, cls.__module__) if cls is not None else None


def export_adapter(ckpt: RunCheckpoint, base_path: str | Path, out_dir: str | Path,
                   allow_other_weights: bool = False) -> dict:
    """PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for the ORIGINAL base model."""
    if not ckpt.lora:
        raise ExportError(f"{ckpt.path}: the run trained no adapters (train.adapters: false, the projector alone): "
                          "there is no LoRA to export; merge it instead (launchers/merge.py without --adapter-only)")
    base = BaseWeights(base_path)
    check_base(ckpt, base, allow_other_weights)
    th = ckpt.thanora
    layers = {name: (a, b, *ckpt.corda.get(name, (None, None))) for name, (a, b) in ckpt.lora.items()}
    write_peft(out_dir, layers, ckpt.projector, th.rank, th.alpha, th.rslora, th.dropout, str(Path(base_path).resolve()),
               base_model_class(base_path))
    _save_processor(ckpt.processor_path if Path(ckpt.processor_path).is_dir() else base_path, base_path, Path(out_dir))
    (Path(out_dir) / RUN_INFO).write_text(json.dumps(ckpt.run_info("peft_adapter"), indent=1, default=str))
    return {"layers": len(layers), "projector_params": len(ckpt.projector), "peak_rss_mb": peak_rss_mb()}


@torch.no_grad()
def build_adapted_model(ckpt: RunCheckpoint, base_path: str | Path | None = None, dtype=torch.float32,
                        attn_implementation: str = "sdpa"):
    """The base model with the checkpoint's adapters injected (unmerged), in eval mode, in this process."""
    from .inject import inject_thanora

    base_path = str(base_path or ckpt.base_path)
    check_base(ckpt, BaseWeights(base_path))
    cls = family_of_path(base_path, "the base model").auto_model_class()
    model = cls.from_pretrained(base_path, dtype=dtype, attn_implementation=attn_implementation)
    trained_adapters = ((ckpt.config.get("train") or {}).get("adapters", True)) and bool(ckpt.allocation.layers)
    adapters = inject_thanora(model, ckpt.thanora, len(ckpt.allocation.tasks), adapters=trained_adapters)
    ckpt.allocation.apply(adapters)
    for name, adapter in adapters.items():
        if name in ckpt.corda:
            subtract_corda_residual(adapter, *ckpt.corda[name])
        a, b = ckpt.lora[name]
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)
    for name, value in ckpt.projector.items():
        model.get_parameter(name).copy_(value)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
