#!/usr/bin/env python
"""Build the LLaVA demo data (``data/llava_demo``) from easy-VQA (``pip install easy-vqa``, MIT), deterministically.

    python scripts/build_llava_demo_data.py [--out DIR] [--train-images 1200] [--eval-per-task 200]

easy-VQA has 64x64 images of one coloured shape (circle, rectangle, triangle; 8 colours) with questions whose
answers are one word. Its questions fall into three kinds that need different things from the image, which
become three image tasks of stage 2:

* ``color``  "what color is the triangle?"        -> one of 8 colours
* ``shape``  "what is the blue shape?"            -> circle / rectangle / triangle
* ``yesno``  "is there not a red shape?"          -> yes / no (half of them negated)

and a caption task for stage 1 (LLaVA-1.5 aligns its projector on image-caption pairs, not on the
instruction data): ``caption`` "Describe the image in a few words." -> "A blue rectangle." (colour and shape read
off the image's own questions).

Files (LLaVA conversation format, ``task`` field set, ``image`` relative to ``images/``):

* ``caption.json``       stage 1: one caption per training image
* ``vqa_train.json``     stage 2: per training image one question of each kind (3 x --train-images records)
* ``vqa_test.json``      held out: --eval-per-task questions per kind about easy-VQA's TEST images (never seen in
                         training, by either stage); every test image is used once across the three kinds
* ``images/train/*.png``, ``images/test/*.png``: the images used, copied byte for byte

The text tasks of stage 2 are the bundled ``data/demo`` sentiment and country_qa files (see
configs/llava_demo_stage2.yaml). Rebuilding with the same easy-vqa version reproduces the files exactly.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "data" / "llava_demo"
SEED = 0
SHAPES = ("circle", "rectangle", "triangle")
KINDS = ("color", "shape", "yesno")
SUFFIX = " Answer with one word."
CAPTION_PROMPT = "Describe the image in a few words."


def easy_vqa_dir() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        print("build_llava_demo_data: easy-vqa is not installed (pip install easy-vqa)", file=sys.stderr)
        sys.exit(2)
    return Path(spec.submodule_search_locations[0]) / "data"


def kind_of(answer: str) -> str:
    return "yesno" if answer in ("yes", "no") else "shape" if answer in SHAPES else "color"


def read_split(root: Path, split: str) -> dict[int, list[tuple[int, str, str]]]:
    """image id -> [(question index, question, answer)] in file order."""
    path = root / split / "questions.json"
    try:
        questions = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        print(f"build_llava_demo_data: {path}: {err}", file=sys.stderr)
        sys.exit(2)
    by_image: dict[int, list[tuple[int, str, str]]] = {}
    for q, (question, answer, image_id) in enumerate(questions):
        by_image.setdefault(int(image_id), []).append((q, question.strip(), answer.strip()))
    return by_image


def caption(questions: list[tuple[int, str, str]]) -> str | None:
    colour = next((a for _, q, a in questions if kind_of(a) == "color"), None)
    shape = next((a for _, q, a in questions if kind_of(a) == "shape"), None)
    return f"A {colour} {shape}." if colour and shape else None


def record(rid: str, task: str, image: str, question: str, answer: str) -> dict:
    return {"id": rid, "task": task, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def ask(question: str) -> str:
    return question[0].upper() + question[1:] + SUFFIX


def build(out: Path, train_images: int, eval_per_task: int) -> dict:
    root = easy_vqa_dir()
    rng = random.Random(SEED)
    train = read_split(root, "train")
    test = read_split(root, "test")
    train_ids = sorted(i for i in train if caption(train[i]) and all(any(kind_of(a) == k for _, _, a in train[i])
                                                                    for k in KINDS))
    rng.shuffle(train_ids)
    train_ids = sorted(train_ids[:train_images])
    captions, vqa_train = [], []
    for i in train_ids:
        image = f"train/{i:04d}.png"
        captions.append(record(f"caption-{i:04d}", "caption", image, CAPTION_PROMPT, caption(train[i])))
        for kind in KINDS:
            pool = [(q, qs, a) for q, qs, a in train[i] if kind_of(a) == kind]
            q, question, answer = rng.choice(pool)
            vqa_train.append(record(f"{kind}-train-{q:05d}", kind, image, ask(question), answer))
    test_ids = sorted(test)
    rng.shuffle(test_ids)
    need = eval_per_task * len(KINDS)
    if len(test_ids) < need:
        print(f"build_llava_demo_data: {eval_per_task} per task needs {need} test images, easy-VQA has "
              f"{len(test_ids)}", file=sys.stderr)
        sys.exit(2)
    vqa_test, used_test = [], []
    for k, kind in enumerate(KINDS):
        chosen = 0
        for i in test_ids[k * eval_per_task:]:
            if chosen == eval_per_task:
                break
            pool = [(q, qs, a) for q, qs, a in test[i] if kind_of(a) == kind]
            if not pool or i in used_test:
                continue
            q, question, answer = rng.choice(pool)
            vqa_test.append(record(f"{kind}-test-{q:05d}", kind, f"test/{i:04d}.png", ask(question), answer))
            used_test.append(i)
            chosen += 1
        if chosen < eval_per_task:
            print(f"build_llava_demo_data: only {chosen} test questions of kind {kind}", file=sys.stderr)
            sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", train_ids), ("test", sorted(used_test))):
        folder = out / "images" / split
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in ids:
            shutil.copyfile(root / split / "images" / f"{i}.png", folder / f"{i:04d}.png")
    files = {"caption.json": captions, "vqa_train.json": vqa_train,
             "vqa_test.json": sorted(vqa_test, key=lambda r: (KINDS.index(r["task"]), r["id"]))}
    for name, records in files.items():
        (out / name).write_text(json.dumps(records, indent=0, ensure_ascii=False, sort_keys=True) + "\n",
                                encoding="utf-8", newline="\n")
    counts = {name: len(r) for name, r in files.items()}
    counts["train_images"], counts["test_images"] = len(train_ids), len(used_test)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--train-images", type=int, default=1200, help="training images (default 1200)")
    p.add_argument("--eval-per-task", type=int, default=200, help="held-out questions per image task (default 200)")
    args = p.parse_args(argv)
    counts = build(Path(args.out), args.train_images, args.eval_per_task)
    print(f"wrote {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
