"""Scoring: exact match after normalisation."""

from __future__ import annotations

import re

_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}


def normalize(text: str) -> str:
    """Lower-case, first word, punctuation stripped, number words as digits."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    if not words:
        return ""
    return _NUMBERS.get(words[0], words[0])
