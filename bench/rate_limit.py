"""Rate limits under a flood: how many of a burst get through, and what one bucket check costs.

    python bench/rate_limit.py [--burst 60]

Uses the configured (or embedded) PostgreSQL and Redis, like ``make run``. Prints:

- a flood of ``--burst`` messages from one end user through ``message_receive`` with the default
  ``rate_limit_config`` (30 a minute, burst 10): how many were stored, and in how long (the security
  review saw a fixed window let 60 through in 4.3 s);
- the latency of one token-bucket check (one Lua script call to Redis), p50 and p95.

Rows belong to a user named bench-rl-*, deleted at the end; its Redis buckets expire by themselves.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("AGENTFLOW_LOG_LEVEL", "WARNING")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=60, help="messages sent at once (default 60)")
    parser.add_argument("--checks", type=int, default=2000, help="bucket checks timed (default 2000)")
    args = parser.parse_args()
    import django

    django.setup()
    from django.core.management import call_command

    from agentflow.config import RateLimitConfig
    from agentflow.errors import RateLimited
    from conversations.models import EndUser
    from conversations.ratelimit import bucket_take
    from conversations.services import message_receive

    call_command("migrate", verbosity=0)
    config = RateLimitConfig()
    user = f"bench-rl-{uuid.uuid4().hex[:8]}"
    stored = 0
    started = time.perf_counter()
    try:
        for i in range(args.burst):
            try:
                message_receive(
                    user_id=user,
                    content=f"flood {i}",
                    ttl_seconds=3600,
                    max_chars=4000,
                    rate_per_minute=config.messages_per_minute,
                    rate_burst=config.burst,
                )
            except RateLimited:
                continue
            stored += 1
        elapsed = time.perf_counter() - started
        print(
            f"flood of {args.burst} messages ({config.messages_per_minute}/min, burst {config.burst}): "
            f"{stored} stored, {args.burst - stored} refused, in {elapsed:.2f} s"
        )
        timings = []
        for i in range(args.checks):
            t0 = time.perf_counter()
            bucket_take(scope="bench", ident=f"{user}-{i % 50}", per_minute=600, burst=100)
            timings.append((time.perf_counter() - t0) * 1000)
        print(f"one bucket check (Redis Lua): p50 {pct(timings, 50):.3f} ms, p95 {pct(timings, 95):.3f} ms")
    finally:
        EndUser.objects.filter(external_id=user).delete()


if __name__ == "__main__":
    main()
