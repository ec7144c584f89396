"""Scrub personal data from text before it becomes a memory shared by all users."""

from __future__ import annotations

import re

_PATTERNS = [
    (re.compile(r"\b[\w.+-]+@[\w-]+(\.[\w-]+)+\b"), "[email]"),
    (re.compile(r"https?://\S+"), "[link]"),
    (re.compile(r"(?<!\w)\+?\d[\d\s().-]{7,}\d\b"), "[phone]"),
    # Account, order, card and ticket ids: a run of 4+ digits, or letters and digits mixed (A-1001, ORD12345).
    (re.compile(r"\b(?=[A-Za-z0-9-]*\d)(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9]+(?:-[A-Za-z0-9]+)+\b"), "[id]"),
    (re.compile(r"\b(?=\w*\d)[A-Za-z]{1,5}\d{3,}\b"), "[id]"),
    (re.compile(r"\b\d{4,}\b"), "[number]"),
    # Names the user gives: "my name is Ann Lee", "I'm Bob", "this is Carol", "signed, Dave".
    (
        re.compile(
            r"\b((?i:my name is|i am|i'm|this is|call me|signed,?))\s+([A-Z][a-z]+(?:\s+[A-Z][a-z]+)?)"
        ),
        r"\1 [name]",
    ),
]


def scrub_personal_data(text: str) -> str:
    """Replace emails, links, phone numbers, ids and self-introduced names with placeholders."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
