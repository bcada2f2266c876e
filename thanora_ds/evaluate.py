"""Per-task evaluation on the eval splits: batched greedy generation scored per task, and per-task loss.

The eval split is the one training held out (``data.splits``: deterministic from the data config's seed, task
names and sizes, independent of world size), encoded with the model's own chat template exactly as in
training. For each example the prompt is the conversation up to its last assistant turn (with the generation
prompt), the reference is that turn's text as written in the data file; generation stops at the template's
end-of-turn token or EOS. The loss is the training loss (next-token cross-entropy over every assistant token)
averaged over a task's tokens.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import DataConfig, IGNORE_INDEX, MultiTaskData, collate_batch
from .models import family_of
from .scorers import score_task

log = logging.getLogger("thanora_ds.evaluate")


@dataclass
class EvalItem:
    task: str
    id: str
    example: dict                 # input_ids, labels, task_id (, pixel_values)
    prompt_ids: list[int]         # up to the start of the last assistant turn
    reference: str
    stop_id: int | None = None    # the template's end-of-turn token (first special token after the answer)


@dataclass
class TaskResult:
    task: str
    scorer: str
    n: int
    score: float | None
    loss: float | None
    loss_tokens: int
    generated_tokens: int = 0
    predictions: list[dict] = field(default_factory=list)


def last_answer_start(labels: list[int]) -> int:
    """Index of the first token of the last assistant turn (the last run of labels != -100)."""
    i = len(labels) - 1
    while i >= 0 and labels[i] == IGNORE_INDEX:
        i -= 1
    if i < 0:
        raise ValueError("an eval example has no label")
    while i > 0 and labels[i - 1] != IGNORE_INDEX:
        i -= 1
    return i


def eval_items(data: MultiTaskData, tokenizer, tasks: list[str] | None = None, limit: int = 0) -> dict[str, list[EvalItem]]:
    """The eval examples of each task with their prompts and reference answers (``MultiTaskData.references``:
    no record is read again)."""
    special = set(tokenizer.all_special_ids)
    out = {}
    for task in tasks or data.tasks:
        if task not in data.eval:
            raise ValueError(f"--tasks: unknown task {task!r}; the data has {data.tasks}")
        items = []
        examples, references = data.eval[task], data.references(task)
        for k in range(len(examples) if not limit else min(limit, len(examples))):
            ex = examples[k]
            start = last_answer_start(ex["labels"])
            answer = [t for t in ex["labels"][start:] if t != IGNORE_INDEX]
            stop = next((t for t in answer if t in special), None)
            items.append(EvalItem(task, ex["id"], ex, ex["input_ids"][:start], references[k], stop))
        out[task] = items
    return out


def _model_device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


def _batch_loss(model, chunk: list[EvalItem], pad_id: int) -> tuple[float, int]:
    """(sum of the token losses, number of label tokens) of one batch."""
    from .trainer import token_losses

    device, dtype = _model_device_dtype(model)
    batch = collate_batch([it.example for it in chunk], pad_id)
    inputs = family_of(model).model_inputs(batch, device, dtype)
    logits = model(**inputs, use_cache=False).logits
    per_token = token_losses(logits, batch["labels"].to(device))
    return float(per_token.double().sum()), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def task_loss(model, items: list[EvalItem], pad_id: int, batch_size: int) -> tuple[float | None, int]:
    total, tokens = 0.0, 0
    for s in range(0, len(items), batch_size):
        loss_sum, n = _batch_loss(model, items[s:s + batch_size], pad_id)
        total, tokens = total + loss_sum, tokens + n
    return (total / tokens if tokens else None), tokens


@torch.no_grad()
def generate(model, items: list[EvalItem], tokenizer, batch_size: int, max_new_tokens: int,
             synced_gpus: bool = False) -> tuple[list[str], int, float]:
    """Greedy answers (in ``items`` order), the number of generated tokens, and the seconds spent generating.
    ``synced_gpus``: every rank keeps stepping until all ranks are done (ZeRO-3 gathers parameters collectively)."""
    device, dtype = _model_device_dtype(model)
    family = family_of(model)
    pad = tokenizer.pad_token_id
    gen = copy.deepcopy(model.generation_config)
    stops = {t for t in ([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else (gen.eos_token_id or []))}
    stops |= {tokenizer.eos_token_id} | {it.stop_id for it in items if it.stop_id is not None}
    stops.discard(None)
    gen.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1, max_new_tokens=max_new_tokens,
               eos_token_id=sorted(stops), pad_token_id=pad, use_cache=True)
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids))  # little padding per batch
    texts: list[str] = [""] * len(items)
    n_tokens, seconds = 0, 0.0
    for s in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[s:s + batch_size]]
        width = max(len(it.prompt_ids) for it in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, it in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[b, width - len(it.prompt_ids):] = torch.tensor(it.prompt_ids)
            mask[b, width - len(it.prompt_ids):] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        pixels = [it.example["pixel_values"] for it in chunk if it.example.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        inputs = family.model_inputs(batch, device, dtype)
        t0 = time.perf_counter()
        out = model.generate(**inputs, generation_config=gen, synced_gpus=synced_gpus)
        seconds += time.perf_counter() - t0
        for b, i in enumerate(order[s:s + batch_size]):
            new = out[b, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            n_tokens += len(new) if cut is None else cut + 1
            texts[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    return texts, n_tokens, seconds


def evaluate(model, data: MultiTaskData, tokenizer, batch_size: int = 8, max_new_tokens: int = 128,
             tasks: list[str] | None = None, limit: int = 0, with_loss: bool = True, with_generation: bool = True) -> dict:
    """Scores and losses of every task; the returned dict is what ``eval.json`` holds (predictions apart).
    ``max_new_tokens`` caps generation for tasks whose data config sets no ``max_new_tokens`` of their own."""
    cfg: DataConfig = data.config
    results: list[TaskResult] = []
    gen_tokens, gen_seconds = 0, 0.0
    for task, items in eval_items(data, tokenizer, tasks, limit).items():
        settings = cfg.tasks.get(task)
        scorer = settings.scorer if settings else "exact_match"
        choices = settings.choices if settings else None
        loss, loss_tokens = task_loss(model, items, data.pad_token_id, batch_size) if with_loss else (None, 0)
        result = TaskResult(task, scorer, len(items), None, loss, loss_tokens)
        if with_generation and items:
            cap = settings.max_new_tokens if settings and settings.max_new_tokens else max_new_tokens
            texts, n, sec = generate(model, items, tokenizer, batch_size, cap)
            scores = score_task(scorer, texts, [it.reference for it in items], choices, task)
            result.score = sum(scores) / len(scores)
            result.generated_tokens = n
            result.predictions = [{"task": task, "id": it.id, "prediction": t, "reference": it.reference, "score": sc}
                                  for it, t, sc in zip(items, texts, scores)]
            gen_tokens += n
            gen_seconds += sec
        log.info("%s: %d examples, %s %s, loss %s", task, len(items), scorer,
                 "-" if result.score is None else f"{result.score:.4f}", "-" if loss is None else f"{loss:.4f}")
        results.append(result)
    scored = [r.score for r in results if r.score is not None]
    return {
        "tasks": {r.task: {k: v for k, v in r.__dict__.items() if k not in ("task", "predictions")} for r in results},
        "mean_score": sum(scored) / len(scored) if scored else None,
        "generation": {"tokens": gen_tokens, "seconds": gen_seconds,
                       "tokens_per_s": gen_tokens / gen_seconds if gen_seconds > 0 else None},
        "predictions": [p for r in results for p in r.predictions],
    }


@torch.no_grad()
def evaluate_sharded(model, items_by_task: dict[str, list[EvalItem]], data: MultiTaskData, tokenizer, batch_size: int,
                     max_new_tokens: int, with_generation: bool) -> dict[str, dict]:
    """Per-task eval loss (and, with generation, score) under data parallelism, e.g. during training under ZeRO-3.

    Rank r takes eval examples r, r + W, ...; the sums of token losses and token counts are reduced over the ranks,
    so the loss equals ``evaluate``'s in one process; predictions are gathered and scored as there. Every rank runs
    the same number of forward / generate calls (ZeRO-3 gathers parameters collectively): a rank whose share is
    shorter runs a copy of an example whose result it discards."""
    import math

    from . import distributed as D

    rank, world = D.rank(), D.world_size()
    cfg: DataConfig = data.config
    out: dict[str, dict] = {}
    for task, items in items_by_task.items():
        mine = items[rank::world]
        n_batches = math.ceil(math.ceil(len(items) / world) / batch_size)
        chunks = [mine[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
        sums = torch.zeros(2, dtype=torch.float64)
        for chunk in chunks:
            loss_sum, n = _batch_loss(model, chunk or items[:1], data.pad_token_id)
            if chunk:
                sums += torch.tensor([loss_sum, n], dtype=torch.float64)
        D.all_reduce_sum_(sums)
        result = {"n": len(items), "loss": float(sums[0] / sums[1]) if sums[1] > 0 else None}
        if with_generation and items:
            settings = cfg.tasks.get(task)
            cap = settings.max_new_tokens if settings and settings.max_new_tokens else max_new_tokens
            texts: list[str] = []
            for chunk in chunks:
                answers, _, _ = generate(model, chunk or items[:1], tokenizer, batch_size, cap, synced_gpus=world > 1)
                texts += answers if chunk else []
            gathered = D.all_gather_objects(texts)
            ordered = [gathered[i % world][i // world] for i in range(len(items))]  # back to items order
            scores = score_task(settings.scorer if settings else "exact_match", ordered,
                                [it.reference for it in items], settings.choices if settings else None, task)
            result["score"] = sum(scores) / len(scores)
            result["predictions"] = [{"id": it.id, "prediction": t, "score": sc}
                                     for it, t, sc in zip(items, ordered, scores)]
        out[task] = result
    return out


def markdown_table(report: dict, title: str = "") -> str:
    def fmt(v, digits=4):
        return "-" if v is None else f"{v:.{digits}f}"
    lines = [f"### {title}", ""] if title else []
    lines += ["| task | scorer | n | score | loss |", "|---|---|---:|---:|---:|"]
    for task, r in report["tasks"].items():
        lines.append(f"| {task} | {r['scorer']} | {r['n']} | {fmt(r['score'])} | {fmt(r['loss'])} |")
    losses = [r["loss"] for r in report["tasks"].values() if r["loss"] is not None]
    lines.append(f"| **mean** | | | {fmt(report['mean_score'])} | {fmt(sum(losses) / len(losses) if losses else None)} |")
    g = report["generation"]
    if g["tokens"]:
        lines += ["", f"Generation: {g['tokens']} tokens in {g['seconds']:.1f} s ({fmt(g['tokens_per_s'], 1)} tokens/s)."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path, title: str = "") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = report.get("predictions", [])
    body = {k: v for k, v in report.items() if k != "predictions"}
    (out / "eval.json").write_text(json.dumps(body, indent=1))
    (out / "eval.md").write_text(markdown_table(report, title))
    with open(out / "predictions.jsonl", "w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
