#!/usr/bin/env python
"""Build benchmarks/data/arithmetic.jsonl: the quality benchmark's fourth text task, written the same way as
the demo tasks (one `prompt_response` record per line with a unique `id` and `task`, sorted by id).

    pip install reasoning-gym==0.1.25        # Apache-2.0; procedural generators, no data download
    python benchmarks/data/build_arithmetic.py [--out benchmarks/data/arithmetic.jsonl] [--check]

Why: the bundled demo mixture's fourth task (vqa) needs a multimodal model; the benchmark runs on the
text-only SmolLM2-135M-Instruct, so it uses the three demo text tasks plus this one. The records come from
reasoning-gym's `basic_arithmetic` generator (integer expressions of 2-3 terms with 1-2 digit operands and
+, -, *; no parentheses or negation), seeded, so the file is byte-for-byte reproducible (--check compares).
Answers are short integers: scored with the `numeric` scorer. Questions are deduplicated.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "arithmetic.jsonl"
SEED = 0
N_RECORDS = 300
GENERATOR = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, operators=("+", "-", "*"),
                 allow_parentheses=False, allow_negation=False, format_style="simple", whitespace="single")
PROMPT = "{question} Answer with the number only."


def build() -> str:
    try:
        import reasoning_gym
    except ImportError:
        sys.exit("reasoning-gym is not installed: pip install reasoning-gym==0.1.25")
    ds = reasoning_gym.create_dataset("basic_arithmetic", seed=SEED, size=4 * N_RECORDS, **GENERATOR)
    seen, records = set(), []
    for i in range(len(ds)):
        item = ds[i]
        q = item["question"].strip()
        if q in seen:
            continue
        if not ds.score_answer(item["answer"], item) == 1.0:   # the generator's own check of its answer
            continue
        seen.add(q)
        records.append({"id": f"arithmetic-{len(records):04d}", "prompt": PROMPT.format(question=q),
                        "response": str(item["answer"]).strip(), "task": "arithmetic"})
        if len(records) == N_RECORDS:
            break
    if len(records) < N_RECORDS:
        sys.exit(f"only {len(records)} distinct questions generated; raise size")
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["id"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = p.parse_args(argv)
    text = build()
    out = Path(args.out)
    if args.check:
        same = out.is_file() and out.read_bytes() == text.encode("utf-8")
        print(f"{out}: {'identical' if same else 'DIFFERS from a fresh build'}")
        return 0 if same else 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(text.encode("utf-8"))
    print(f"wrote {out}: {N_RECORDS} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
