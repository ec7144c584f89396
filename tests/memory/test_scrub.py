"""The personal-data scrubber through the real Presidio/spaCy model: a handful of the labelled
messages of bench/data/pii_eval.jsonl (the bench prints the recall over all of them), negatives left
alone, and a web process that never loads the NER model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memory.scrub import personal_data_spans, scrub_personal_data

ROOT = Path(__file__).resolve().parents[2]
EVAL = {
    row["id"]: row for row in map(json.loads, (ROOT / "bench/data/pii_eval.jsonl").read_text().splitlines())
}


@pytest.mark.parametrize(
    ("row_id", "expected"),
    [
        (1, "My login is broken for [name] (password [secret])"),
        (3, "hello this is [name] from the finance team, the export keeps failing"),  # lowercase name
        (4, "my name is [name], the invoice shows the wrong VAT"),
        (10, "Regards,\n[name]"),
        (16, "Dear support, my daughter [name] used my card without asking"),
        (21, "Forward this to [name] in accounting"),  # no cue but the NER model's
        (50, "pw is [secret] if you need to check"),
        (52, "The API key [secret] stopped working this morning"),
        (66, "Login: [secret]"),
        (81, "My password has a space in it: [secret]"),
        (82, "I live at [address]"),
        (84, "my address is [address]"),
        (88, "Send it to [address]"),
        (95, "the technician should come to [address] after 5pm"),
        (118, "The SMS code goes to [phone] but I changed my number"),
        (124, "My card [card] was charged twice"),
        (139, "passport number [account] was rejected during verification"),
        (152, "The account is under [name], IBAN [account]"),
    ],
)
def test_labelled_messages_lose_their_personal_data(row_id: int, expected: str) -> None:
    row = EVAL[row_id]

    scrubbed = scrub_personal_data(row["text"])

    assert scrubbed == expected
    assert row["spans"] and all(span["text"] not in scrubbed for span in row["spans"])


@pytest.mark.parametrize("row_id", [159, 164, 215, 217])
def test_messages_without_personal_data_are_left_alone(row_id: int) -> None:
    row = EVAL[row_id]
    assert row["spans"] == []

    assert scrub_personal_data(row["text"]) == row["text"]


def test_a_card_number_that_fails_the_luhn_check_is_not_called_a_card_but_still_goes() -> None:
    assert scrub_personal_data("card 4111 1111 1111 1112", ner=False) == "card [phone]"
    assert scrub_personal_data("card 4111 1111 1111 1111", ner=False) == "card [card]"


def test_spans_are_sorted_and_never_overlap() -> None:
    text = "I'm Ann Lee, password Hunter2Secret, at 221B Baker Street, London NW1 6XE, ann@lee.family"

    spans = personal_data_spans(text)

    assert [text[s:e] for s, e, _ in spans] == [
        "Ann Lee",
        "Hunter2Secret",
        "221B Baker Street, London NW1 6XE",
        "ann@lee.family",
    ]
    assert [label for *_, label in spans] == ["[name]", "[secret]", "[address]", "[email]"]


def test_the_web_process_never_loads_the_ner_model() -> None:
    code = (
        "import sys\n"
        "from agentflow_project.asgi import application\n"
        "import agentflow_project.urls, memory.tasks, conversations.api, conversations.consumers\n"
        "print(sorted(m for m in ('spacy', 'presidio_analyzer', 'thinc') if m in sys.modules))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}

    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    assert out.stdout.strip().splitlines()[-1] == "[]"
