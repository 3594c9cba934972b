"""Scoring of the long-context tasks, as the reference definitions score them.

RULER (NIAH, variable tracking, common and frequent words): the output is stripped, control characters become
newlines, and `string_match_all` is the share of reference strings found in it, case-insensitively, x 100.
Passkey (landmark attention): the first number in the output equals the key.
"""

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_prediction(text: str) -> str:
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's per-sample score: 100 x the fraction of `references` contained in `prediction` (case-insensitive)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference string.")
    found = clean_prediction(prediction).lower()
    return 100.0 * sum(ref.lower() in found for ref in references) / len(references)


def passkey_score(prediction: str, references: list[str]) -> float:
    """100 if the first number in the output is the pass key, else 0."""
    match = re.search(r"\d+", prediction)
    return 100.0 if match is not None and match.group(0) == references[0] else 0.0
