"""The hand-written support-chat set (bench/data/support_turns.jsonl): loading and its fixed split.

Each line is one dialogue::

    {"dialogue_id": "printers-01", "domain": "printers", "split": "tune",
     "turns": [{"speaker": "USER", "utterance": "...", "label": "FIRST", "kind": null, "thread": 0},
               {"speaker": "SYSTEM", "utterance": "...", "label": null}, ...]}

User-turn labels are thread events: FIRST, FOLLOW_UP (clarifications, "still broken", partial fixes),
RESOLUTION (thanks, thanks with what fixed it, "never mind, found it"), NEW_TOPIC ("by the way",
"one more thing", "and how do I ...?" after an unrelated problem) and RETURN (back to an earlier
thread; ``thread`` is the thread returned to). ``kind`` names the shape (``thanks-detail``,
``partial``, ``still-broken``, ``one-more``, ``return``, ...). ``thread`` numbers the user's threads
in order of opening, so training can replay the gold segmentation.

The split is fixed by a hash of the dialogue id (about a third held out), so adding dialogues never
moves old ones between parts. Nothing is tuned on the held-out part.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SUPPORT_PATH = Path(__file__).resolve().parent / "data" / "support_turns.jsonl"
# A second, separately written set that is never used for tuning or for choosing a setting: scored once
# before and once after a change (only each dialogue's last user turn counts).
HOLDOUT_PATH = Path(__file__).resolve().parent / "data" / "support_holdout.jsonl"
HOLDOUT_SPLIT = "heldout-new"
# A second held-out set, written later and blind to the rules (no code read, no evaluation run).
HOLDOUT2_PATH = HOLDOUT_PATH.with_name("support_holdout2.jsonl")
# Unmarked topic shifts and the follow-ups of the same form (bench/data/support_unmarked2.jsonl), split
# by a fixed rule into a tuning part and a part kept aside (``file_split``).
UNMARKED2_PATH = HOLDOUT_PATH.with_name("support_unmarked2.jsonl")
FILE_SPLITS = ("tune", "aside")


def file_split(dialogue_id: str) -> str:
    """'aside' for about two groups in five, 'tune' for the rest. The group is the id without its last
    "-suffix", so the two chats of a pair (a shift and the follow-up of the same form, "-shift" /
    "-lean") always fall in the same part; depends only on the id."""
    group = dialogue_id.rsplit("-", 1)[0]
    return "aside" if hashlib.sha256(group.encode()).digest()[0] % 5 < 2 else "tune"


def support_split(dialogue_id: str) -> str:
    """'heldout' for about one dialogue in three, 'tune' for the rest; depends only on the id."""
    digest = hashlib.sha256(dialogue_id.encode()).digest()
    return "heldout" if digest[0] % 3 == 0 else "tune"


def load_support(part: str | None = None, path: Path = SUPPORT_PATH) -> list[dict]:
    """Dialogues of one part ('tune' or 'heldout'), or all of them; checks the stored split."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        if row["split"] != support_split(row["dialogue_id"]):
            raise ValueError(f"{row['dialogue_id']}: stored split {row['split']!r} disagrees with its hash")
    return [r for r in rows if part is None or r["split"] == part]


def load_support_holdout(
    path: Path = HOLDOUT_PATH, *, any_split: bool = False, part: str | None = None
) -> list[dict]:
    """The separate held-out set (bench/data/support_holdout.jsonl), every dialogue marked held out.

    Only the last user turn of each dialogue is scored; the earlier turns set the scene. With
    ``any_split`` the dialogues may carry any split (a check set of other support chats). With ``part``
    ('tune' or 'aside') only the dialogues ``file_split`` puts in that part, checked against the split
    stored in the file ("<name>-tune" / "<name>-aside").
    """
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        if not any_split and not str(row.get("split", "")).startswith(HOLDOUT_SPLIT):
            raise ValueError(f"{row['dialogue_id']}: a held-out file holds only {HOLDOUT_SPLIT!r}* dialogues")
        if row["turns"][-1]["speaker"] != "USER":
            raise ValueError(f"{row['dialogue_id']}: the scored last turn must be the user's")
    if part is None:
        return rows
    if part not in FILE_SPLITS:
        raise ValueError(f"unknown part {part!r}: one of {FILE_SPLITS}")
    for row in rows:
        stored = str(row.get("split", "")).rsplit("-", 1)[-1]
        if stored != file_split(row["dialogue_id"]):
            raise ValueError(f"{row['dialogue_id']}: stored split {row['split']!r} disagrees with its hash")
    return [r for r in rows if file_split(r["dialogue_id"]) == part]
