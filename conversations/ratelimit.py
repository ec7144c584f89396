"""Rate limits that hold: token buckets in Redis, shared by every web and worker process.

A bucket holds at most ``burst`` tokens and refills at ``per_minute`` tokens a minute; each request
takes one. A burst is therefore cut at ``burst``, and a steady stream at ``per_minute``, with no
window edge to exploit (the old fixed one-minute window let twice its limit through across a
minute boundary). Each check is one Lua script, so concurrent processes never both take the last
token. A look (``cost=0``, the refused-key check before every API call) writes nothing: the refill is
linear up to ``burst``, so the stored state gives the same count later, and an address that never
sent a wrong key has no bucket at all. A negative cost gives tokens back (up to ``burst``): a message
whose token was taken before the database said it is a resend (``user_message_give_back``).

Buckets (docs/configuration.md, "Rate limits"):

- ``user``: an end user's messages (``rate_limit_config``: ``messages_per_minute``, ``burst``);
- ``key``: REST calls per API key, ``ip``: REST calls per client IP;
- ``authfail``: refused API keys per client IP (a guesser is stopped before its keys are checked);
- WebSocket connections per end user (``ws_connection_acquire``); frames per connection are
  counted in the consumer itself (``FrameBucket``), as a connection lives in one process.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from typing import Any

import redis
from django.core.cache import cache

from agentflow.conf import REDIS_MAX_CONNECTIONS, conf, redis_url
from agentflow.errors import RateLimited

_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
  ts = now
end
local allowed = 0
if cost < 0 then
  allowed = 1
  tokens = math.min(capacity, tokens - cost)
elseif tokens >= 1 then
  allowed = 1
  tokens = tokens - cost
end
if cost ~= 0 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
  redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
end
local wait = 0
if allowed == 0 then
  wait = (1 - tokens) / rate
end
return {allowed, tostring(tokens), tostring(wait)}
"""

_CONNECTIONS = """
local now = tonumber(ARGV[1])
local stale = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[4]) == false and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + stale, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(stale) + 1)
return 1
"""

_lock = threading.Lock()
_client: redis.Redis | None = None
_scripts: dict[str, Any] = {}


def _redis() -> redis.Redis:
    global _client
    with _lock:
        if _client is None:
            _client = redis.Redis.from_url(redis_url(), max_connections=REDIS_MAX_CONNECTIONS)
            _scripts["bucket"] = _client.register_script(_BUCKET)
            _scripts["connections"] = _client.register_script(_CONNECTIONS)
        return _client


def _key(scope: str, ident: str) -> str:
    """The Redis key of a bucket, under the cache's prefix; the identity is hashed (ids may be PII)."""
    digest = hashlib.sha256(ident.encode()).hexdigest()[:32]
    return cache.make_key(f"ratelimit:{scope}:{digest}")


def limits() -> dict[str, int | float]:
    """The transport limits of ``AGENTFLOW["RATE_LIMITS"]`` (read at call time: tests override them)."""
    return conf().RATE_LIMITS


def bucket_take(
    *, scope: str, ident: str, per_minute: float, burst: float, now: float | None = None, cost: int = 1
) -> tuple[bool, float]:
    """Take ``cost`` tokens (0: only look; negative: give back, up to ``burst``) from the bucket
    ``scope``/``ident``.

    Returns:
        ``(allowed, retry_after_seconds)``: allowed when a token was there (then it is taken).
    """
    if per_minute <= 0 or burst <= 0:
        return True, 0.0
    _redis()
    allowed, _, wait = _scripts["bucket"](
        keys=[_key(scope, ident)],
        args=[burst, per_minute / 60.0, time.time() if now is None else now, cost],
    )
    return bool(int(allowed)), float(wait)


def rate_limit_take(
    *, scope: str, ident: str, per_minute: float, burst: float, what: str, now: float | None = None
) -> None:
    """Take one token or raise ``RateLimited`` (with ``retry_after``, whole seconds, at least 1).

    Raises:
        RateLimited: the bucket is empty; nothing was taken.
    """
    allowed, wait = bucket_take(scope=scope, ident=ident, per_minute=per_minute, burst=burst, now=now)
    if not allowed:
        retry = max(1, math.ceil(wait))
        raise RateLimited(
            f"too many {what}: at most {burst} at once and {per_minute} a minute; try again in {retry} s",
            retry_after=retry,
        )


def user_message_take(*, user_id: str, per_minute: int, burst: int | None, now: float | None = None) -> None:
    """The end user's message bucket (``rate_limit_config``); ``burst`` None: ``per_minute``.

    Raises:
        RateLimited: the user sent too many messages; nothing was taken.
    """
    rate_limit_take(
        scope="user",
        ident=user_id,
        per_minute=per_minute,
        burst=per_minute if burst is None else burst,
        what="messages",
        now=now,
    )


def user_message_give_back(
    *, user_id: str, per_minute: int, burst: int | None, now: float | None = None
) -> None:
    """Give back the token ``user_message_take`` took for a message that was not stored after all
    (a resend of a stored one, which the rate limit does not count; a refused or failed store)."""
    bucket_take(
        scope="user",
        ident=user_id,
        per_minute=per_minute,
        burst=per_minute if burst is None else burst,
        now=now,
        cost=-1,
    )


def api_request_take(*, api_key_pk: int, ip: str | None) -> None:
    """One REST call with a valid API key: its key's bucket, then its client IP's.

    Raises:
        RateLimited: the key or the IP made too many calls.
    """
    conf = limits()
    rate_limit_take(
        scope="key",
        ident=str(api_key_pk),
        per_minute=conf["API_KEY_PER_MINUTE"],
        burst=conf["API_KEY_BURST"],
        what="API calls for this key",
    )
    if ip:
        rate_limit_take(
            scope="ip",
            ident=ip,
            per_minute=conf["IP_PER_MINUTE"],
            burst=conf["IP_BURST"],
            what="API calls from this address",
        )


def auth_failures_check(*, ip: str | None) -> None:
    """Refuse a client IP whose refused-key bucket is empty, before its key is even checked.

    Raises:
        RateLimited: too many wrong API keys from this address.
    """
    if not ip:
        return
    conf = limits()
    per_minute, burst = conf["AUTH_FAILURES_PER_MINUTE"], conf["AUTH_FAILURES_BURST"]
    allowed, wait = bucket_take(scope="authfail", ident=ip, per_minute=per_minute, burst=burst, cost=0)
    if not allowed:
        retry = max(1, math.ceil(wait))
        raise RateLimited(
            f"too many wrong API keys from this address; try again in {retry} s", retry_after=retry
        )


def auth_failure_count(*, ip: str | None) -> None:
    """Count one refused API key against its client IP."""
    if ip:
        conf = limits()
        bucket_take(
            scope="authfail",
            ident=ip,
            per_minute=conf["AUTH_FAILURES_PER_MINUTE"],
            burst=conf["AUTH_FAILURES_BURST"],
        )


CONNECTION_STALE_SECONDS = 120.0  # an entry not refreshed for this long no longer counts


def ws_connection_acquire(*, user_id: str, channel: str, limit: float, now: float | None = None) -> bool:
    """Count a WebSocket connection of the end user; False if they already have ``limit`` open.

    Also refreshes a counted connection (the consumer calls it again while frames arrive). A
    connection whose process died without a disconnect stops counting after
    ``CONNECTION_STALE_SECONDS`` without frames.
    """
    if limit <= 0:
        return True
    _redis()
    now = time.time() if now is None else now
    ok = _scripts["connections"](
        keys=[_key("wsconn", user_id)], args=[now, CONNECTION_STALE_SECONDS, limit, channel]
    )
    return bool(int(ok))


def ws_connection_release(*, user_id: str, channel: str) -> None:
    """The connection closed: it no longer counts."""
    _redis().zrem(_key("wsconn", user_id), channel)


class FrameBucket:
    """Frames per WebSocket connection: an in-process token bucket (a connection lives in one process).

    ``take()`` is True for a frame within the limit; ``overflow`` counts the frames refused since the
    last one let through, so the consumer can close a client that keeps flooding.
    """

    def __init__(self, *, per_second: float, burst: float) -> None:
        self.per_second, self.burst = per_second, burst
        self.tokens, self.stamp = float(burst), time.monotonic()
        self.overflow = 0

    def take(self, now: float | None = None) -> bool:
        if self.per_second <= 0 or self.burst <= 0:
            return True
        now = time.monotonic() if now is None else now
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.overflow = 0
            return True
        self.overflow += 1
        return False

    def retry_after(self) -> float:
        return round(max(0.0, (1 - self.tokens) / self.per_second), 3) if self.per_second > 0 else 0.0
