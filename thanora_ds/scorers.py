"""Per-example scorers of generated answers against reference answers (1.0 correct, 0.0 wrong).

Each task names its scorer in the data config (``data.tasks.<name>.scorer``):

* ``exact_match``: the normalized prediction equals the normalized reference. Normalization: Unicode NFKC,
  lower case, punctuation removed, whitespace collapsed ("  Paris. " == "paris").
* ``multiple_choice``: the prediction is mapped to one of the task's choices (``data.tasks.<name>.choices``;
  default: the distinct references of the eval split) and compared with the reference's choice. Mapping: a
  prediction that normalizes to a choice is that choice; otherwise the choice that occurs first in it as a whole
  word or phrase ("The sentiment is negative." -> negative); a prediction naming no choice is wrong.
* ``numeric``: the last number in the prediction (thousands commas removed, "$1,234.50" -> 1234.50) equals the
  reference's answer as a number ("18" == "18.0"); the reference's answer is what follows its last "####"
  (GSM8K) if it has one, else its last number. A prediction with no number is wrong.
"""
from __future__ import annotations

import re
import string
import unicodedata
from decimal import Decimal, InvalidOperation
from typing import Callable, Sequence

_PUNCT = str.maketrans({c: " " for c in string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026"})
_NUMBER = re.compile(r"(?:(?<![\w.])[-+])?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCT)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def pick_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The normalized choice the prediction names, or None (see the module docstring)."""
    pred = normalize(prediction)
    options = [normalize(c) for c in choices]
    if pred in options:
        return pred
    best, best_at = None, None
    padded = f" {pred} "
    for option in sorted(set(options), key=len, reverse=True):   # longest first: "very positive" over "positive"
        at = padded.find(f" {option} ")
        if at >= 0 and (best_at is None or at < best_at):
            best, best_at = option, at
    return best


def multiple_choice(prediction: str, reference: str, choices: Sequence[str]) -> float:
    ref = normalize(reference)
    if ref not in {normalize(c) for c in choices}:
        raise ValueError(f"multiple_choice: the reference {reference!r} is not one of the choices {list(choices)}")
    return float(pick_choice(prediction, choices) == ref)


def parse_number(text: str) -> Decimal | None:
    """The last number in ``text`` as a Decimal, or None."""
    found = _NUMBER.findall(unicodedata.normalize("NFKC", text))
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None


def reference_number(reference: str) -> Decimal | None:
    if "####" in reference:
        return parse_number(reference.rsplit("####", 1)[1])
    return parse_number(reference)


def numeric(prediction: str, reference: str) -> float:
    ref = reference_number(reference)
    if ref is None:
        raise ValueError(f"numeric: the reference {reference!r} holds no number")
    pred = parse_number(prediction)
    return float(pred is not None and pred == ref)


SCORERS: dict[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "numeric": numeric,
}


def get_scorer(name: str, task: str = "?") -> Callable[..., float]:
    if name not in SCORERS:
        raise ValueError(f"data.tasks.{task}.scorer: unknown scorer {name!r}; choose one of {sorted(SCORERS)}")
    return SCORERS[name]


def score_task(scorer: str, predictions: Sequence[str], references: Sequence[str],
               choices: Sequence[str] | None = None, task: str = "?") -> list[float]:
    """Per-example scores of one task. ``multiple_choice`` without ``choices`` uses the distinct references."""
    fn = get_scorer(scorer, task)
    if len(predictions) != len(references):
        raise ValueError(f"task {task}: {len(predictions)} predictions but {len(references)} references")
    if scorer == "multiple_choice":
        if not choices:
            choices = sorted({normalize(r) for r in references})
        return [fn(p, r, choices) for p, r in zip(predictions, references)]
    return [fn(p, r) for p, r in zip(predictions, references)]
