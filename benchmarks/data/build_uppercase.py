#!/usr/bin/env python
"""Build benchmarks/data/uppercase.jsonl: the method study's string-transduction task (benchmarks/study.py).

    python benchmarks/data/build_uppercase.py [--out benchmarks/data/uppercase.jsonl] [--check]

300 chat records with their own system prompt ("Rewrite the text in capital letters..."), whose inputs are the
distinct country names and answers of the bundled data/demo/country_qa.jsonl (so no package or download is
needed), lower-cased; the answer is the input in upper case (`exact_match` scorer). Deterministic: the same
input file gives the same bytes (--check compares). Why this task: next to classification (sentiment),
numeric reasoning (arithmetic) and recall (country_qa) it is a fourth kind, token-level copying with a
transformation, and its system turn differs from the others' (METHOD.md 2.2 leaves it out of the statistics).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent / "data" / "demo" / "country_qa.jsonl"
OUT = HERE / "uppercase.jsonl"
N_RECORDS = 300
SYSTEM = "Rewrite the text in capital letters. Answer with the rewritten text only."


def build() -> str:
    texts = set()
    for line in SOURCE.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        country = rec["prompt"].rstrip("?").split(" of ")[-1].split(" in ")[-1]
        for text in (country, rec["response"]):
            text = text.strip()
            if 2 <= len(text) <= 28 and text.lower() != text.upper() and text.isascii():
                texts.add(text.lower())
    chosen = sorted(texts)[:N_RECORDS]
    if len(chosen) < N_RECORDS:
        sys.exit(f"only {len(chosen)} distinct texts in {SOURCE}")
    records = [{"id": f"uppercase-{i:04d}", "task": "uppercase",
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                             {"role": "assistant", "content": text.upper()}]} for i, text in enumerate(chosen)]
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--check", action="store_true", help="rebuild and compare with --out byte for byte")
    args = p.parse_args()
    text = build()
    if args.check:
        same = Path(args.out).read_text(encoding="utf-8") == text
        print("identical" if same else f"{args.out} differs from a rebuild")
        return 0 if same else 1
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {text.count(chr(10))} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
