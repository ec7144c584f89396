"""``bench/intent_eval.py --folds`` and ``--sgd``: the validation folds run on any train.csv (and SGD
dialogues) and refuse bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
THEMES = {
    "card_lost": ["I lost my card", "my card is missing", "can't find my bank card", "card went missing"],
    "pin_reset": ["reset my PIN", "forgot my PIN code", "change the PIN of my card", "new PIN please"],
    "exchange_rate": ["what is the exchange rate", "euro to dollar rate", "currency rate today", "fx rate"],
    "top_up": ["top up my account", "add money to my balance", "how do I top up", "load funds"],
    "refund": ["I want a refund", "get my money back", "refund my purchase", "return and refund"],
}


def write_train(folder: Path) -> None:
    (folder / "banking77").mkdir(parents=True)
    with (folder / "banking77" / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category"])
        for name, phrases in THEMES.items():
            for phrase in phrases:
                writer.writerow([phrase, name])
                writer.writerow([f"{phrase}, please", name])


def write_other_domains(folder: Path) -> None:
    turns = [
        {"speaker": "USER", "utterance": "Find me a hotel in Paris", "service": "Hotels_1", "label": "FIRST"},
        {"speaker": "SYSTEM", "utterance": "Which dates?", "service": "Hotels_1", "label": None},
        {"speaker": "USER", "utterance": "From Monday", "service": "Hotels_1", "label": "CONTINUATION"},
        {"speaker": "USER", "utterance": "Will it rain there?", "service": "Weather_1", "label": "NEW_TOPIC"},
        {"speaker": "USER", "utterance": "Check my balance", "service": "Banks_1", "label": "NEW_TOPIC"},
    ]
    (folder / "sgd_threads").mkdir()
    (folder / "sgd_threads" / "dev.jsonl").write_text(json.dumps({"dialogue_id": "1", "turns": turns}) + "\n")


def bench(*args: str | Path, mode: str = "--folds") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "agentflow_project.settings"}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "intent_eval.py"), mode, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def test_folds_print_each_fold_and_the_spread_and_keep_the_vectors(tmp_path):
    write_train(tmp_path)
    write_other_domains(tmp_path)
    cache = tmp_path / "vectors.npz"
    cache.write_bytes(b"not an npz file")  # an unreadable cache is rebuilt, not fatal

    run = bench(
        "--datasets",
        tmp_path,
        "--sizes",
        "3,5",
        "--seeds",
        "2",
        "--shots",
        "3",
        "--queries",
        "4",
        "--cache",
        cache,
    )

    assert run.returncode == 0, run.stderr
    assert "ignoring the unreadable cache" in run.stderr
    # The opening and new-topic user turns, banks excluded.
    assert "; 2 messages of other domains" in run.stdout
    fold_lines = [line.split() for line in run.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(line[0], line[1]) for line in fold_lines] == [("3", "0"), ("3", "1"), ("5", "0"), ("5", "1")]
    for line in fold_lines:
        accuracy, right, caught, other_caught = map(float, line[2:6])
        assert all(0.0 <= figure <= 1.0 for figure in (accuracy, right, caught, other_caught))
    assert "  all: accuracy " in run.stdout
    assert "  size 3: " in run.stdout and "  size 5: " in run.stdout
    stored = np.load(cache)
    assert str(stored["model_id"]) == "all-MiniLM-L6-v2-onnx-int8"
    assert stored["vectors"].shape[1] == 384
    # Every example and query of the folds (7 of each intent's 8 rows), the intents' names in words
    # and the other domains' messages.
    known = {text for phrases in THEMES.values() for p in phrases for text in (p, f"{p}, please")}
    known |= {"Find me a hotel in Paris", "Will it rain there?"}
    texts = set(stored["texts"].tolist())
    assert {name.replace("_", " ") for name in THEMES} <= texts
    assert len(texts - known) == len(THEMES)
    assert len(texts & known) >= 7 * len(THEMES) + 2


def test_folds_refuse_bad_input_with_a_clear_error(tmp_path):
    write_train(tmp_path)

    too_many = bench("--datasets", tmp_path, "--sizes", "6")
    assert too_many.returncode != 0
    assert "--sizes 6 is more than the 5 intents" in too_many.stderr

    no_rows_left = bench("--datasets", tmp_path, "--sizes", "3", "--shots", "8")
    assert no_rows_left.returncode != 0
    assert "have no rows left to classify after 8 examples" in no_rows_left.stderr

    missing = bench("--datasets", tmp_path / "nowhere")
    assert missing.returncode != 0
    assert "banking77/train.csv (--datasets names the folder" in missing.stderr

    for args, message in [
        (("--sizes", "20,x"), "expected whole numbers separated by commas"),
        (("--sizes", "1"), "each fold needs at least 2 intents"),
        (("--seeds", "0"), "must be at least 1"),
        (("--threshold", "1.5"), "--threshold must be between 0 and 1"),
    ]:
        run = bench("--datasets", tmp_path, *args)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)


SGD_INTENTS = {
    "GetWeather": ["will it rain today", "what's the weather in Paris", "is it sunny tomorrow"],
    "FindMovies": ["find me a movie to watch", "any good films tonight", "suggest a comedy movie"],
    "ReserveRestaurant": ["book a table for two", "reserve a restaurant at 7", "a table for dinner"],
    "PlaySong": ["play some jazz", "put on a song by Adele", "play music please"],
    "RentMovie": ["rent this film"],  # too few turns: left out
}


def write_sgd(folder: Path) -> None:
    dialogues = []
    for intent, phrases in SGD_INTENTS.items():
        turns = []
        for variant in ("", " now", " thanks", ", please"):
            for phrase in phrases:
                turns.append(
                    {
                        "speaker": "USER",
                        "utterance": phrase + variant,
                        "intent": intent,
                        "acts": ["INFORM_INTENT"],
                    }
                )
                turns.append({"speaker": "SYSTEM", "utterance": "Sure.", "label": None})
        # A turn without INFORM_INTENT (a slot value) is not an example of the intent.
        turns.append({"speaker": "USER", "utterance": "in Berlin", "intent": intent, "acts": ["INFORM"]})
        dialogues.append({"dialogue_id": intent, "turns": turns})
    (folder / "sgd_threads").mkdir(parents=True)
    (folder / "sgd_threads" / "dev.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dialogues))
    (folder / "tiage_threads").mkdir()
    chat = [{"speaker": "USER", "utterance": "I love painting on weekends", "label": "FIRST"}]
    (folder / "tiage_threads" / "train.jsonl").write_text(json.dumps({"turns": chat}) + "\n")


def sgd_bench(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return bench(*args, mode="--sgd")


def test_sgd_proxy_uses_the_turns_that_state_an_intent(tmp_path):
    write_sgd(tmp_path)

    run = sgd_bench("--datasets", tmp_path, "--seeds", "2", "--shots", "3")

    assert run.returncode == 0, run.stderr
    # 4 intents with 12 turns each (RentMovie's 4 are too few for 3 examples + 5 to classify; the
    # INFORM-only turn counts for none) and the chit-chat opening.
    assert "SGD proxy: 4 intents, 48 turns, 2 random 3-shot samples" in run.stdout
    assert "; 1 chit-chat messages" in run.stdout
    fold_lines = [line.split() for line in run.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(line[0], line[1]) for line in fold_lines] == [("4", "0"), ("4", "1")]
    for line in fold_lines:
        assert all(0.0 <= float(figure) <= 1.0 for figure in line[2:6])
    assert "  all: accuracy " in run.stdout


def test_sgd_proxy_refuses_missing_or_thin_data(tmp_path):
    missing = sgd_bench("--datasets", tmp_path / "nowhere")
    assert missing.returncode != 0
    assert "sgd_threads/dev.jsonl (--datasets names the folder" in missing.stderr

    write_sgd(tmp_path)
    thin = sgd_bench("--datasets", tmp_path, "--shots", "10")
    assert thin.returncode != 0
    assert "fewer than 2 SGD intents have 15 turns stating them" in thin.stderr
