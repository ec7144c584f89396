"""The personal-data scrubber on our own labelled support messages: recall per entity type.

    python bench/pii_eval.py [--data bench/data/pii_eval.jsonl] [--patterns-only] [--misses]

Each line of the data is ``{"id", "text", "spans": [{"type", "start", "end", "text"}]}``: hand-written
support-chat messages with the personal data in them labelled (PERSON, CREDENTIAL, ADDRESS, EMAIL,
PHONE, CARD, ACCOUNT); messages with no spans are the negatives. A span counts as caught when the
scrubbed text no longer contains it. Prints recall per type, the share of negatives the scrubber
changed (false positives), the model's load time and memory, and ms per message (p50/p95, after loading).
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "bench" / "data" / "pii_eval.jsonl")
    parser.add_argument("--patterns-only", action="store_true", help="our patterns without the NER model")
    parser.add_argument("--misses", action="store_true", help="print every missed span and changed negative")
    args = parser.parse_args()

    from memory.scrub import scrub_personal_data

    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    ner = not args.patterns_only
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    scrub_personal_data("Warm-up for Ann Lee.", ner=ner)  # loads the NER model once
    load_s = time.perf_counter() - started
    rss_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024

    caught: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    negatives = changed = 0
    timings: list[float] = []
    for row in rows:
        started = time.perf_counter()
        scrubbed = scrub_personal_data(row["text"], ner=ner)
        timings.append((time.perf_counter() - started) * 1000)
        if not row["spans"]:
            negatives += 1
            if scrubbed != row["text"]:
                changed += 1
                if args.misses:
                    print(f"  changed negative #{row['id']}: {scrubbed!r}")
        for span in row["spans"]:
            total[span["type"]] += 1
            if span["text"] not in scrubbed:
                caught[span["type"]] += 1
            elif args.misses:
                print(f"  missed {span['type']} {span['text']!r} in #{row['id']}: {scrubbed!r}")

    print(f"PII scrubber ({'patterns only' if args.patterns_only else 'patterns + Presidio/spaCy NER'})")
    print(f"{len(rows)} messages, {sum(total.values())} labelled spans, {negatives} negatives")
    print(f"{'type':<12}{'spans':>7}{'caught':>8}{'recall':>8}")
    for kind in sorted(total):
        print(f"{kind:<12}{total[kind]:>7}{caught[kind]:>8}{caught[kind] / total[kind]:>8.3f}")
    all_caught, all_total = sum(caught.values()), sum(total.values())
    print(f"{'all':<12}{all_total:>7}{all_caught:>8}{all_caught / all_total:>8.3f}")
    print(f"negatives changed (false positives): {changed}/{negatives} = {changed / max(negatives, 1):.3f}")
    print(f"first call (loads the model): {load_s * 1000:.0f} ms, peak memory +{rss_mb:.0f} MB")
    print(f"ms per message: p50 {pct(timings, 50):.1f}, p95 {pct(timings, 95):.1f}, max {max(timings):.1f}")


if __name__ == "__main__":
    main()
