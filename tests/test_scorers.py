"""Scorers on hand-made predictions: each expected number is worked out by hand in the comment next to it."""
import pytest

from thanora_ds.scorers import (exact_match, get_scorer, multiple_choice, normalize, numeric, parse_number,
                                pick_choice, score_task)


def test_normalize():
    assert normalize("  Paris.\n") == "paris"
    assert normalize("New   York, NY!") == "new york ny"
    assert normalize("\uff30aris") == "paris"        # full-width P (NFKC)
    assert normalize("it\u2019s") == "it s"


def test_exact_match_hand_made():
    preds = ["Paris", "paris.", " Paris ", "Lyon", "Paris is the capital", ""]
    refs = ["Paris."] * 6
    # equal after normalization: 1, 1, 1; a different word: 0; extra words: 0; empty: 0
    assert score_task("exact_match", preds, refs) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert exact_match("Buenos Aires", "buenos  aires") == 1.0
    assert exact_match("Buenos-Aires", "buenos aires") == 1.0   # punctuation becomes a space


def test_multiple_choice_hand_made():
    choices = ["negative", "neutral", "positive"]
    cases = [
        ("negative", "negative", 1.0),                        # the choice itself
        ("Negative.", "negative", 1.0),                       # case and punctuation
        ("The sentiment is positive.", "positive", 1.0),      # named in a sentence
        ("positive, not negative", "negative", 0.0),          # the FIRST named choice counts: positive
        ("neutral", "positive", 0.0),                         # another choice
        ("I cannot tell", "neutral", 0.0),                    # no choice named
        ("nonnegative", "negative", 0.0),                     # whole words only
    ]
    scores = [multiple_choice(p, r, choices) for p, r, _ in cases]
    assert scores == [c[2] for c in cases]
    assert sum(scores) / len(scores) == pytest.approx(3 / 7)
    assert pick_choice("very positive indeed", ["positive", "very positive"]) == "very positive"  # longest wins
    with pytest.raises(ValueError, match="not one of the choices"):
        multiple_choice("yes", "maybe", ["yes", "no"])


def test_multiple_choice_default_choices_are_the_references():
    refs = ["yes", "no", "Yes", "no"]
    preds = ["Yes!", "yes", "the answer is yes", "No."]
    # choices {no, yes}: yes==yes 1; yes!=no 0; yes==yes 1; no==no 1
    assert score_task("multiple_choice", preds, refs) == [1.0, 0.0, 1.0, 1.0]


def test_numeric_hand_made():
    ref = "She sells 16 - 3 - 4 = 9 eggs\nSo she makes 9 * 2 = $18\n#### 18"
    cases = [
        ("The answer is 18.", 1.0),                      # last number 18
        ("#### 18", 1.0),
        ("9 * 2 = 18.00", 1.0),                          # 18.00 == 18 as numbers
        ("She makes $18 after selling 9 eggs", 0.0),     # last number is 9
        ("eighteen", 0.0),                               # no digits
        ("-18", 0.0),
    ]
    assert [numeric(p, ref) for p, _ in cases] == [c[1] for c in cases]
    assert numeric("It costs $1,234.50", "#### 1234.5") == 1.0   # comma removed, 1234.50 == 1234.5
    assert numeric("a loss of -7", "-7") == 1.0                   # a reference without ####: its last number
    assert numeric("3", "#### 3,000") == 0.0
    assert numeric("16-3=13", "13") == 1.0 and parse_number("5-3") == 3   # a minus between numbers is no sign
    assert parse_number("from 1,000,000 to .5") == parse_number("0.5")
    with pytest.raises(ValueError, match="holds no number"):
        numeric("1", "no number here")


def test_task_scores_and_unknown_scorer():
    scores = score_task("numeric", ["1", "2", "x", "4"], ["#### 1", "#### 3", "#### 3", "4"])
    assert scores == [1.0, 0.0, 0.0, 1.0] and sum(scores) / 4 == 0.5
    with pytest.raises(ValueError, match=r"data\.tasks\.gsm\.scorer: unknown scorer 'bleu'"):
        get_scorer("bleu", "gsm")
