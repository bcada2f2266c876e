#!/usr/bin/env python
"""The report of `bash scripts/demo_llava.sh`: per-task accuracy per stage, timings, the allocation of image tasks
against text tasks over depth, and the checks that the outputs load as plain Hugging Face / PEFT models.

    python scripts/llava_demo_report.py [--out runs/llava_demo] [--no-checks]

Reads OUT/eval/<stage>/eval.json (stage1, stage2_lora, stage2_thanora: whichever exist), OUT/timings.jsonl, each
stage's metrics.jsonl / timings.json, and OUT/stage2_thanora/allocation.json; writes OUT/report.md, OUT/report.json
and OUT/allocation_image_vs_text.png. With checks (default): the merged ThanoRA model is loaded with
`AutoModelForImageTextToText.from_pretrained` and asked about an easy-VQA test image that neither training nor the
evaluation used; the PEFT export is loaded onto the stage-1 model with `PeftModel.from_pretrained` and its logits
compared with the merged model's.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_TASKS = ("color", "shape", "yesno")
TEXT_TASKS = ("sentiment", "country_qa")
STAGES = (("stage1", "(a) after stage 1 (projector only)"), ("stage2_lora", "(b) stage 2, plain LoRA r=16"),
          ("stage2_thanora", "(c) stage 2, ThanoRA r=16"))


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def accuracy_table(out: Path) -> tuple[str, dict]:
    results = {name: read_json(out / "eval" / name / "eval.json") for name, _ in STAGES}
    tasks = [t for t in IMAGE_TASKS + TEXT_TASKS if any(r and t in r["tasks"] for r in results.values())]
    head = "| task | kind | n | " + " | ".join(label for name, label in STAGES if results[name]) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * sum(1 for r in results.values() if r)]
    table = {}
    for task in tasks:
        n = next(r["tasks"][task]["n"] for r in results.values() if r and task in r["tasks"])
        row = []
        for name, _ in STAGES:
            if results[name]:
                score = results[name]["tasks"].get(task, {}).get("score")
                table.setdefault(name, {})[task] = score
                row.append("-" if score is None else f"{score:.3f}")
        lines.append(f"| {task} | {'image' if task in IMAGE_TASKS else 'text'} | {n} | " + " | ".join(row) + " |")
    for kind, group in (("image mean", IMAGE_TASKS), ("text mean", TEXT_TASKS)):
        row = []
        for name, _ in STAGES:
            if results[name]:
                vals = [table[name][t] for t in group if table[name].get(t) is not None]
                mean = sum(vals) / len(vals) if vals else None
                table[name][kind] = mean
                row.append("-" if mean is None else f"**{mean:.3f}**")
        lines.append(f"| **{kind}** | | | " + " | ".join(row) + " |")
    return "\n".join(lines), table


def closed_set_table(out: Path) -> tuple[str, dict]:
    """The image tasks scored a second way from the saved predictions: the answer the prediction NAMES among the
    task's answers (the multiple_choice scorer: "A blue rectangle." to "What color is it?" counts as blue), beside
    the strict exact match of the run's config. Stage 1 never learned one-word answers; this column shows what its
    aligned projector lets the frozen language model see."""
    from thanora_ds.scorers import score_task

    lines = ["| task | " + " | ".join(label for name, label in STAGES if (out / "eval" / name).is_dir()) + " |",
             "|---|" + "---:|" * sum(1 for name, _ in STAGES if (out / "eval" / name).is_dir())]
    table: dict = {}
    for task in IMAGE_TASKS:
        row = []
        for name, _ in STAGES:
            path = out / "eval" / name / "predictions.jsonl"
            if not (out / "eval" / name).is_dir():
                continue
            preds = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
            preds = [x for x in preds if x["task"] == task]
            if not preds:
                row.append("-")
                continue
            scores = score_task("multiple_choice", [x["prediction"] for x in preds], [x["reference"] for x in preds],
                                None, task)
            table.setdefault(name, {})[task] = sum(scores) / len(scores)
            row.append(f"{table[name][task]:.3f}")
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines), table


def step_times(run: Path) -> dict | None:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r["step_seconds"] for r in rows if "step_seconds" in r]
    later = steps[2:] or steps
    timings = read_json(run / "timings.json") or {}
    return {"steps": len(steps), "median_step_seconds": statistics.median(later) if later else None,
            "mean_step_seconds": statistics.fmean(later) if later else None,
            "hasi_seconds": timings.get("hasi_seconds"), "setup_seconds": timings.get("setup_seconds"),
            "first_loss": rows[0].get("task_loss") if rows else None, "last_loss": rows[-1].get("task_loss") if rows else None}


def layer_index(name: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def allocation_summary(out: Path) -> dict | None:
    alloc = read_json(out / "stage2_thanora" / "allocation.json")
    if not alloc or not alloc.get("layers"):
        return None
    tasks = alloc["tasks"]
    img = [tasks.index(t) for t in IMAGE_TASKS if t in tasks]
    txt = [tasks.index(t) for t in TEXT_TASKS if t in tasks]
    depth = sorted({layer_index(n) for n in alloc["layers"]})
    types = sorted(set(alloc["module_types"]), key=alloc["module_types"].index)
    per = {m: {"image": [], "text": []} for m in types + ["all"]}
    entropy = {"image": [], "text": []}
    for d in depth:
        rows = [i for i, n in enumerate(alloc["layers"]) if layer_index(n) == d]
        for m in types + ["all"]:
            sel = [i for i in rows if m == "all" or alloc["module_types"][i] == m]
            for kind, group in (("image", img), ("text", txt)):
                per[m][kind].append(statistics.fmean(alloc["ranks"][i][t] for i in sel for t in group))
        for kind, group in (("image", img), ("text", txt)):
            entropy[kind].append(statistics.fmean(alloc["entropy"][i][t] for i in rows for t in group))
    third = max(1, len(depth) // 3)
    summary = {"entropy": {f"{part}_{kind}": statistics.fmean(v[:third] if part == "early" else v[-third:])
                           for kind, v in entropy.items() for part in ("early", "late")}}
    for m, v in per.items():
        diff = [a - b for a, b in zip(v["image"], v["text"])]
        summary[m] = {"early_image_minus_text": statistics.fmean(diff[:third]),
                      "late_image_minus_text": statistics.fmean(diff[-third:])}
    return {"tasks": tasks, "depth": depth, "module_types": types, "mean_rank": per, "mean_entropy": entropy,
            "summary": summary, "third": third, "rank": alloc["rank"], "shared_rank": alloc["shared_rank"]}


def plot_allocation(s: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["all"] + s["module_types"]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), sharex=True, squeeze=False)
    for ax, m in zip(axes.flat, panels):
        ax.plot(s["depth"], s["mean_rank"][m]["image"], marker="o", ms=3, label="image tasks (color, shape, yesno)")
        ax.plot(s["depth"], s["mean_rank"][m]["text"], marker="s", ms=3, label="text tasks (sentiment, country_qa)")
        ax.set_title("all module types" if m == "all" else m, fontsize=9)
        ax.axvspan(s["depth"][0] - 0.5, s["depth"][s["third"] - 1] + 0.5, color="0.93")
        ax.axvspan(s["depth"][-s["third"]] - 0.5, s["depth"][-1] + 0.5, color="0.93")
    for ax in axes[-1]:
        ax.set_xlabel("decoder layer")
    for row in axes:
        row[0].set_ylabel("mean rank per task")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"ThanoRA allocation on the LLaVA demo (r={s['rank']}, shared {s['shared_rank']}): mean task rank, "
                 "image vs text tasks; shaded: first and last third", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def unseen_image_answer(out: Path) -> dict | None:
    """Ask the merged ThanoRA model about an easy-VQA test image no stage trained or evaluated on."""
    import importlib.util

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    merged = out / "stage2_thanora_merged"
    if not (merged / "config.json").is_file():
        return None
    root = Path(importlib.util.find_spec("easy_vqa").submodule_search_locations[0]) / "data" / "test"
    used = {int(p.stem) for p in (REPO / "data" / "llava_demo" / "images" / "test").glob("*.png")}
    questions = json.loads((root / "questions.json").read_text())
    image_id = next(i for q, a, i in questions if i not in used)
    kinds = {"color": None, "shape": None, "yesno": None}   # one question of each kind about that image
    for q, a, i in questions:
        kind = "yesno" if a in ("yes", "no") else "shape" if a in ("circle", "rectangle", "triangle") else "color"
        if i == image_id and kinds[kind] is None:
            kinds[kind] = (q, a)
    asked = [qa for qa in kinds.values() if qa is not None]
    model = AutoModelForImageTextToText.from_pretrained(str(merged), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(merged))
    image = Image.open(root / "images" / f"{image_id}.png").convert("RGB")
    answers = []
    for question, reference in asked:
        q = question[0].upper() + question[1:] + " Answer with one word."
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + q}]}]
        inputs = processor(text=[processor.apply_chat_template(msgs, add_generation_prompt=True)], images=[image],
                           return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answer = processor.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        answers.append({"question": q, "answer": answer, "reference": reference})
    return {"class": type(model).__name__, "image": f"easy_vqa/data/test/images/{image_id}.png", "answers": answers}


def peft_check(out: Path) -> dict | None:
    """The PEFT export on the stage-1 model (the base of stage 2) against the merged model: max |logit diff|."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from PIL import Image

    peft_dir, base, merged = out / "stage2_thanora_peft", out / "stage1_merged", out / "stage2_thanora_merged"
    if not (peft_dir / "adapter_config.json").is_file() or not (merged / "config.json").is_file():
        return None
    processor = AutoProcessor.from_pretrained(str(base))
    image = Image.open(REPO / "data" / "llava_demo" / "images" / "test" / sorted(
        p.name for p in (REPO / "data" / "llava_demo" / "images" / "test").glob("*.png"))[0]).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat color is the shape?"}]}]
    inputs = processor(text=[processor.apply_chat_template(msgs, add_generation_prompt=True)], images=[image],
                       return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(peft_dir)).eval()
    with torch.no_grad():
        a = peft_model(**inputs).logits
        b = AutoModelForImageTextToText.from_pretrained(str(merged), dtype=torch.float32).eval()(**inputs).logits
    return {"base": str(base), "adapter": str(peft_dir), "max_abs_logit_diff_vs_merged": float((a - b).abs().max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "llava_demo"))
    p.add_argument("--no-checks", action="store_true", help="skip the model-loading checks")
    args = p.parse_args(argv)
    out = Path(args.out)
    table, scores = accuracy_table(out)
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()] \
        if (out / "timings.jsonl").is_file() else []
    runs = {name: step_times(out / name) for name in ("stage1", "stage2_thanora", "stage2_lora")}
    alloc = allocation_summary(out)
    closed, closed_scores = closed_set_table(out)
    report = {"scores": scores, "closed_set_scores": closed_scores, "timings": timings, "runs": runs}
    md = ["# LLaVA demo report", "", "Per-task accuracy (exact match; sentiment: multiple choice) on held-out "
          "questions: image tasks on easy-VQA test images no stage trained on.", "", table, "",
          "Image tasks, the answer the prediction names among the task's answers (multiple-choice mapping of the "
          "same predictions):", "", closed, ""]
    md += ["## Timings", "", "| step | seconds |", "|---|---:|"] + [f"| {t['step']} | {t['seconds']} |" for t in timings]
    md += ["", "| run | steps | median step s | HASI s | first / last loss |", "|---|---:|---:|---:|---|"]
    for name, r in runs.items():
        if r:
            hasi = "-" if not r["hasi_seconds"] else f"{r['hasi_seconds']:.0f}"
            md.append(f"| {name} | {r['steps']} | {r['median_step_seconds']:.2f} | {hasi} | "
                      f"{r['first_loss']:.3f} / {r['last_loss']:.3f} |")
    if alloc:
        plot_allocation(alloc, out / "allocation_image_vs_text.png")
        report["allocation"] = alloc["summary"]
        md += ["", "## Allocation: image tasks against text tasks over depth", "",
               f"Mean rank per task, image tasks minus text tasks, in the first and the last {alloc['third']} "
               "decoder layers (`allocation_image_vs_text.png`). The paper's Figure 1c: the image-heavy task gets "
               "more rank in early layers, the text-heavy one in late layers, i.e. early > late here.", "",
               "| module type | early: image - text | late: image - text | early > late |", "|---|---:|---:|---|"]
        for m, v in alloc["summary"].items():
            if m == "entropy":
                continue
            md.append(f"| {m} | {v['early_image_minus_text']:+.2f} | {v['late_image_minus_text']:+.2f} | "
                      f"{'yes' if v['early_image_minus_text'] > v['late_image_minus_text'] else 'no'} |")
    if alloc:
        e = alloc["summary"]["entropy"]
        md += ["", f"Normalized spectral entropy H (mean over tasks and module types), early / late layers: image tasks "
               f"{e['early_image']:.3f} / {e['late_image']:.3f}, text tasks {e['early_text']:.3f} / {e['late_text']:.3f}."]
    if not args.no_checks:
        answer = unseen_image_answer(out)
        peft = peft_check(out)
        report["unseen_image"], report["peft_on_stage1"] = answer, peft
        if answer:
            md += ["", "## The merged model on an unseen image", "",
                   f"`AutoModelForImageTextToText.from_pretrained(stage2_thanora_merged)` -> {answer['class']}; "
                   f"image `{answer['image']}` (used by no stage and no evaluation):", ""]
            md += [f"- {a['question']} -> **{a['answer']}** (reference: {a['reference']})" for a in answer["answers"]]
        if peft:
            md += ["", f"PEFT export on the stage-1 model (`PeftModel.from_pretrained`): max |logit difference| "
                   f"against the merged model {peft['max_abs_logit_diff_vs_merged']:.2e}."]
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
