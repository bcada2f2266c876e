"""Per-GPU memory of a ThanoRA run under DeepSpeed ZeRO-3, from the model's config alone (no weights, no GPU).

Pure arithmetic on plain numbers, so it can be checked by hand (tests/test_llava_memory.py) and printed for a
recipe before any cluster time is spent (configs/llava15_7b.yaml, docs/llava.md). The terms, per GPU:

* frozen weights: every base parameter (language model, vision tower, projector) in the run's dtype, partitioned
  over the N data-parallel GPUs by ZeRO-3: ``P_frozen * bytes / N``;
* trainable parameters (adapters, and the projector with ``thanora.train_projector``): ZeRO-3 partitions the
  16 bit copy, its gradient and Adam's fp32 master, m and v: ``P_train * (2 + 2 + 12) / N`` (fp32 runs: 4 + 4 + 12);
* gathered working set: ZeRO-3 gathers one module's full weights at a time, plus the prefetch bucket: the largest
  of (one decoder layer, the embedding, lm_head, the vision tower's largest layer) + ``0.9 h^2`` elements, twice
  (the layer in use and the one being fetched);
* activations (training, micro batch B, length L): with activation checkpointing the input of every decoder layer
  (``B L h`` each, 16 bit) plus one layer recomputed in full during its backward (``~34 B L h`` bytes with a fused
  attention kernel, Korthikanti et al. 2022, no ``L^2`` score matrix); without checkpointing every layer's;
  plus the logits: 16 bit from the model, the fp32 copy the loss upcasts and its gradient: ``10 B L V`` bytes;
* HASI (before training, not at the same time as the activations): ``T x d_in x d_in`` fp32 statistics per input
  group held at once. ``hasi_groups_per_pass: G`` holds G consecutive groups (q/k/v one group, o one, gate/up
  one, down one per layer; 0 = all); the peak is the largest sum of ``d_in^2`` over any G consecutive groups.
  Preview activations (no grad, one layer at a time) are small next to it and left out;
* a fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation (``overhead_gib``).

The peak is the static part (weights, trainable states, gathered set, overhead) plus the larger of the training
activations and the HASI statistics.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1024 ** 3


@dataclass
class DecoderShape:
    """A LLaMA-style decoder (the language model)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    head_dim: int | None = None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    def layer_params(self) -> int:
        h = self.hidden
        attention = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        return attention + 3 * h * self.intermediate + 2 * h

    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return embeddings + self.layers * self.layer_params() + self.hidden

    def target_shapes(self, targets: list[str]) -> list[tuple[int, int]]:
        """(d_out, d_in) of every adapted linear layer."""
        h, i = self.hidden, self.intermediate
        shapes = {"q_proj": (self.q_dim, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h),
                  "o_proj": (h, self.q_dim), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ValueError(f"memory estimate: unknown target(s) {unknown}; known: {sorted(shapes)}")
        return [shapes[t] for t in targets] * self.layers

    def input_groups(self, targets: list[str]) -> list[int]:
        """d_in of every HASI input group in model order (q/k/v share one, gate/up one; o and down one each)."""
        per_layer = []
        if {"q_proj", "k_proj", "v_proj"} & set(targets):
            per_layer.append(self.hidden)
        if "o_proj" in targets:
            per_layer.append(self.q_dim)
        if {"gate_proj", "up_proj"} & set(targets):
            per_layer.append(self.hidden)
        if "down_proj" in targets:
            per_layer.append(self.intermediate)
        return per_layer * self.layers


@dataclass
class VisionShape:
    """A ViT vision tower (CLIP / DINOv2 style) and LLaVA's 2-layer projector into the decoder's hidden size."""
    hidden: int
    intermediate: int
    layers: int
    image_size: int
    patch_size: int
    channels: int = 3

    def layer_params(self) -> int:
        h = self.hidden
        return 4 * h * h + 4 * h + 2 * h * self.intermediate + self.intermediate + h + 4 * h

    def params(self) -> int:
        patches = (self.image_size // self.patch_size) ** 2
        embeddings = self.channels * self.patch_size ** 2 * self.hidden + (patches + 2) * self.hidden
        return embeddings + self.layers * self.layer_params() + 4 * self.hidden

    def projector_params(self, text_hidden: int) -> int:
        return self.hidden * text_hidden + text_hidden + text_hidden * text_hidden + text_hidden


def shapes_from_config(config: dict) -> tuple[DecoderShape, VisionShape | None]:
    """The shapes of a Hugging Face ``config.json`` (a LLaMA causal LM or a LLaVA model with ``text_config``)."""
    text = config.get("text_config") or config
    decoder = DecoderShape(hidden=text["hidden_size"], intermediate=text["intermediate_size"],
                           layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
                           kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
                           vocab=text["vocab_size"],
                           tie_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                           head_dim=text.get("head_dim"))
    v = config.get("vision_config")
    vision = None if not v else VisionShape(hidden=v["hidden_size"], intermediate=v["intermediate_size"],
                                            layers=v["num_hidden_layers"], image_size=v["image_size"],
                                            patch_size=v["patch_size"], channels=v.get("num_channels", 3))
    return decoder, vision


def hasi_peak_floats(groups: list[int], tasks: int, groups_per_pass: int) -> int:
    """Largest number of statistic floats held at once: T x the largest sum of d_in^2 over G consecutive groups."""
    squares = [d * d for d in groups]
    g = len(squares) if groups_per_pass <= 0 else min(groups_per_pass, len(squares))
    window = best = sum(squares[:g])
    for k in range(g, len(squares)):
        window += squares[k] - squares[k - g]
        best = max(best, window)
    return tasks * best


def estimate(decoder: DecoderShape, vision: VisionShape | None, *, gpus: int, micro_batch: int, max_length: int,
             rank: int, targets: list[str], tasks: int, train_projector: bool = True, bf16: bool = True,
             activation_checkpointing: bool = True, hasi_groups_per_pass: int = 0, hasi: bool = True,
             overhead_gib: float = 2.0) -> dict:
    """Per-GPU bytes of each term (see the module docstring) and the peak; ``*_gib`` fields in GiB."""
    if gpus < 1 or micro_batch < 1 or max_length < 1:
        raise ValueError("memory estimate: gpus, micro_batch and max_length must be >= 1")
    wbytes = 2 if bf16 else 4
    h, L, B, V = decoder.hidden, max_length, micro_batch, decoder.vocab
    lm = decoder.params()
    tower = vision.params() if vision else 0
    projector = vision.projector_params(h) if vision else 0
    lora = sum(rank * (d_in + d_out) for d_out, d_in in decoder.target_shapes(targets))
    trainable = lora + (projector if train_projector else 0)
    frozen = lm + tower + (0 if train_projector else projector)
    state_bytes = (2 + 2 + 12) if bf16 else (4 + 4 + 12)

    largest = max(decoder.layer_params(), V * h, vision.layer_params() if vision else 0)
    gathered = 2 * (largest + int(0.9 * h * h)) * wbytes
    if activation_checkpointing:
        activations = decoder.layers * B * L * h * wbytes + 34 * B * L * h
    else:
        activations = decoder.layers * 34 * B * L * h
    logits = 10 * B * L * V
    hasi_bytes = 4 * hasi_peak_floats(decoder.input_groups(targets), tasks, hasi_groups_per_pass) if hasi else 0
    terms = {
        "frozen_weights": frozen * wbytes / gpus,
        "trainable_states": trainable * state_bytes / gpus,
        "gathered_working_set": gathered,
        "activations": activations,
        "logits": logits,
        "hasi_statistics": hasi_bytes,
        "overhead": overhead_gib * GIB,
    }
    static = terms["frozen_weights"] + terms["trainable_states"] + terms["gathered_working_set"] + terms["overhead"]
    training_peak = static + activations + logits
    hasi_peak = static + hasi_bytes
    out = {
        "parameters": {"language_model": lm, "vision_tower": tower, "projector": projector, "lora": lora,
                       "trainable": trainable, "frozen": frozen},
        "bytes": terms,
        "training_peak_bytes": training_peak,
        "hasi_peak_bytes": hasi_peak,
        "peak_bytes": max(training_peak, hasi_peak),
        "settings": {"gpus": gpus, "micro_batch": micro_batch, "max_length": max_length, "rank": rank,
                     "targets": list(targets), "tasks": tasks, "bf16": bf16, "train_projector": train_projector,
                     "activation_checkpointing": activation_checkpointing,
                     "hasi_groups_per_pass": hasi_groups_per_pass},
        "decoder": asdict(decoder), "vision": asdict(vision) if vision else None,
    }
    out["gib"] = {k: v / GIB for k, v in terms.items()}
    out["peak_gib"] = out["peak_bytes"] / GIB
    return out


def estimate_for_run(model_config: dict, cfg, tasks: int, gpus: int) -> dict:
    """``estimate`` for a loaded run config (``train_config.TrainConfig``) and the model's config.json."""
    decoder, vision = shapes_from_config(model_config)
    return estimate(decoder, vision, gpus=gpus, micro_batch=cfg.train.micro_batch_size,
                    max_length=cfg.data.max_length, rank=cfg.thanora.rank, targets=list(cfg.thanora.targets),
                    tasks=tasks, train_projector=cfg.thanora.train_projector, bf16=cfg.model.dtype == "bf16",
                    activation_checkpointing=cfg.model.activation_checkpointing,
                    hasi_groups_per_pass=cfg.train.hasi_groups_per_pass, hasi=cfg.train.adapters)


def format_estimate(est: dict) -> str:
    """A Markdown table of the terms and the peak."""
    s = est["settings"]
    lines = [f"Per-GPU memory estimate: {s['gpus']} GPUs, ZeRO-3, {'bf16' if s['bf16'] else 'fp32'}, micro batch "
             f"{s['micro_batch']} x {s['max_length']} tokens, rank {s['rank']} on {len(s['targets'])} targets, "
             f"{s['tasks']} tasks, hasi_groups_per_pass {s['hasi_groups_per_pass']}",
             "", "| term | GiB |", "|---|---:|"]
    for key, value in est["gib"].items():
        lines.append(f"| {key.replace('_', ' ')} | {value:.2f} |")
    lines.append(f"| **peak** (static + max(training, HASI)) | **{est['peak_gib']:.2f}** |")
    lines.append(f"| training peak / HASI peak | {est['training_peak_bytes'] / GIB:.2f} / {est['hasi_peak_bytes'] / GIB:.2f} |")
    p = est["parameters"]
    lines.append("")
    lines.append(f"Parameters: language model {p['language_model'] / 1e9:.3f}B, vision tower {p['vision_tower'] / 1e6:.1f}M, "
                 f"projector {p['projector'] / 1e6:.1f}M, LoRA {p['lora'] / 1e6:.1f}M (trainable {p['trainable'] / 1e6:.1f}M).")
    return "\n".join(lines)
