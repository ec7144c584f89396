"""Celery tasks: run a stored user message's turn and tell the user's live connections.

The task takes an id, resolves the message's agent through the registry and hands both to the one
turn runner (``agentflow.runner.run_turn``); ordering and failure rules live there. What stays
here is the queue's part: retrying later (an earlier message still pending, a transient LLM error,
with backoff) and telling the user's connections. LLM I/O runs on an event loop kept per worker
thread (Celery 5.7 has no asyncio pool), so each thread keeps its own HTTP connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import uuid
from collections.abc import Coroutine
from concurrent.futures import Executor
from typing import Any, NamedTuple

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown
from django.db import connections
from django.db.models import QuerySet

from agentflow import hoptrace, limits, pipeline
from agentflow.conf import conf
from agentflow.errors import AgentUnavailable, LLMError, NotFound
from agentflow.jobs import TURN_TASK
from agentflow.llm import whole_replies
from agentflow.loops import ThreadSteps, take_thread_loops, thread_loop, thread_steps
from agentflow.prepared import PreparedQuery
from agentflow.registry import agent_cached, agent_for, cached_agents, default_agent
from agentflow.runner import run_turn
from agentflow.unavailable import is_unavailable, unavailable_component

from . import notifications  # noqa: F401  (registers the Slack notice job with the workers)
from .events import DeltaStream, apublish, apublish_listened, apublish_many, publish
from .models import Message
from .recovery import claim_retry_in
from .selectors import thread_change_shown
from .services import message_fail

logger = logging.getLogger("agentflow.tasks")

MAX_LLM_RETRIES = 3
# A database or Redis outage inside a turn: retried 8 times, 1, 2, 4 ... 30 s apart (about two minutes).
INFRA_RETRIES = 8
INFRA_BACKOFF_CAP = 30
# How long a message waits for the user's earlier one: 50 retries 0.2 s apart, then 2 s apart until
# the earlier one is outside pipeline.ORDER_WINDOW (it no longer blocks), plus a margin.
ORDER_FAST_RETRIES = 50
ORDER_RETRIES = ORDER_FAST_RETRIES + int(pipeline.ORDER_WINDOW.total_seconds() / 2) + 10


@worker_ready.connect
def _warm_up(**kwargs: Any) -> None:
    """Build the default agent and load the embedding model and the LLM SDK before the first turn.

    Loading them lazily cost the first turns of a fresh worker seconds each (the SDK alone imports
    hundreds of modules), and under load every worker thread waited on that import.
    """
    try:
        agent = default_agent()
        agent.embedder.embed(["warm up"])
        import anthropic.types  # noqa: F401
    except Exception:  # a worker that cannot warm up still serves; the first turn reports the error
        logger.exception("worker warm-up failed")
    freeze_loaded_objects()


def freeze_loaded_objects() -> None:
    """Take what the worker loaded before its first turn out of the garbage collector's full passes.

    Django, the models, the embedding model and the SDKs are ~290,000 long-lived objects that every
    full collection walked again: 160-260 ms of CPU each, about once per 100-130 turns under load
    (bench/production_load.py: 1-2 ms of worker CPU per turn). ``gc.freeze`` moves them to the
    permanent generation (after a last collection, so no garbage is frozen); they stay alive as
    before, and objects made by turns are collected as before. An object frozen here that later
    becomes cyclic garbage (an agent replaced by a rebuild) is not reclaimed: a few per worker life.

    Then the young generation's threshold is raised from Python's 700 to ``YOUNG_GC_THRESHOLD``.
    With a hundred turns in flight, a young collection found thousands of live young objects to walk
    each time (~0.55 ms, ~230 of them per 750 turns) and every tenth one walked the middle generation
    too (~4.6 ms): ~0.33 ms of CPU a turn. Collected 30 times less often, each walks about as many
    objects, most having died in between (``gc.callbacks`` counters, bench/production_load.py).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)


# Net new container objects between young collections once the worker is warm (Python's default: 700).
YOUNG_GC_THRESHOLD = 20_000


@worker_shutdown.connect
def _close_thread_loops(**kwargs: Any) -> None:
    """Close the LLM clients each worker thread's loop holds, then the loops."""
    for loop in take_thread_loops():
        if loop.is_running() or loop.is_closed():
            continue
        for agent in cached_agents():
            close = getattr(agent.llm, "aclose", None)
            if close is not None:
                loop.run_until_complete(close())
        loop.close()


def _message_agent(*, pk: uuid.UUID) -> QuerySet[Message, Any]:
    return Message.objects.filter(pk=pk, role=Message.Role.USER).values(
        "user_id", "user__agent__name", "user__agent__version"
    )[:1]


# Read at the start of every turn a worker runs: compiled once per process (agentflow.prepared).
_MESSAGE_AGENT = PreparedQuery(_message_agent)


def _agent_of(message_id: str) -> tuple[Any, int]:
    """The agent a message belongs to, as this process runs it, and the message's end user pk."""
    try:
        pk = uuid.UUID(str(message_id))
    except ValueError:
        raise NotFound(f"message {message_id} not found") from None
    rows = _MESSAGE_AGENT.run(pk=pk)
    if not rows:
        raise NotFound(f"message {message_id} not found")
    row = rows[0]
    return agent_for(row["user__agent__name"], version=row["user__agent__version"]), row["user_id"]


@shared_task(
    name=TURN_TASK,
    bind=True,
    acks_late=True,
    max_retries=None,
    soft_time_limit=limits.CELERY_SOFT_LIMIT.total_seconds(),
    time_limit=limits.TURN_HARD_LIMIT.total_seconds(),
)
def process_turn(
    self: Any,
    message_id: str,
    llm_attempt: int = 0,
    infra_attempt: int = 0,
    agent: str | None = None,
    version: int | None = None,
    user_pk: int | None = None,
) -> str:
    """Run the turn of stored user message ``message_id`` and publish its result.

    ``agent``, ``version`` and ``user_pk`` (``agentflow.jobs.queue_turn``: the web process read
    them when it stored the message) spare the turn its first read (``_agent_of``) when this process
    runs that agent at that version; otherwise, or when absent (a task queued by older code, the
    recovery sweep), the message's agent is read as before. The turn's own read of the message
    checks that it belongs to that agent. Every retry carries them.

    The threads pool does not enforce Celery's time limits, so the turn is also cancelled here after
    ``TURN_SOFT_LIMIT`` (the message is failed and the client told). PostgreSQL or Redis going away
    (``agentflow.unavailable``) is retried with backoff and jitter, up to ``INFRA_RETRIES`` times; the
    message stays ``pending`` meanwhile (and the recovery sweep re-queues it if even the retry
    cannot be queued, Redis being down).
    """
    hoptrace.mark(message_id, "k_start")
    db = thread_steps()  # every database step of this task runs on this thread (see agentflow.loops)
    hint = _Hint(agent, version, user_pk) if agent and version is not None and user_pk is not None else None
    try:
        return _process_turn(self, message_id, llm_attempt, db, hint)
    except Exception as exc:
        if not is_unavailable(exc) or infra_attempt >= INFRA_RETRIES:
            raise
        countdown = infra_backoff(infra_attempt)
        logger.warning(
            "process_turn: message %s: %s unavailable (%s); again in %.1f s",
            message_id,
            unavailable_component(exc),
            type(exc).__name__,
            countdown,
        )
        raise self.retry(
            exc=exc,
            countdown=countdown,
            args=(),
            kwargs={
                "message_id": message_id,
                "llm_attempt": llm_attempt,
                "infra_attempt": infra_attempt + 1,
                **_hint_kwargs(hint),
            },
        ) from exc
    finally:
        with contextlib.suppress(Exception):  # a dead connection is dropped by the pool's check
            db.submit(connections.close_all).result()  # back to the pool between tasks


def infra_backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (0-based) after an outage: 1, 2, 4 ... 30, +-25 % jitter."""
    return float(min(INFRA_BACKOFF_CAP, 2**attempt) * random.uniform(0.75, 1.25))


class _Hint(NamedTuple):
    """What a task queued by ``queue_turn`` says of its message: its agent, version and end user."""

    agent: str
    version: int
    user_pk: int


def _hint_kwargs(hint: _Hint | None) -> dict[str, Any]:
    return {} if hint is None else {"agent": hint.agent, "version": hint.version, "user_pk": hint.user_pk}


def _process_turn(task: Any, message_id: str, llm_attempt: int, db: ThreadSteps, hint: _Hint | None) -> str:
    loop = thread_loop()
    hinted = agent_cached(hint.agent, version=hint.version) if hint is not None else None
    try:
        if hint is not None and hinted is not None:
            agent, user_pk = hinted, hint.user_pk  # no read: this process runs that agent at that version
        else:
            agent, user_pk = db.submit(_agent_of, message_id).result()
    except NotFound:
        logger.warning("process_turn: message %s no longer exists", message_id)
        return "missing"
    except AgentUnavailable as exc:
        # Never run with another agent's settings: the message fails, visibly, with the reason.
        logger.error("process_turn: message %s: %s", message_id, exc)
        user_pk = db.submit(_fail_unavailable, message_id, exc).result()
        return _tell_failed(user_pk=user_pk, message_id=message_id, code=exc.code)
    final = llm_attempt >= MAX_LLM_RETRIES
    try:
        turn = _within_limit(
            _run_streaming(agent, message_id, user_pk=user_pk, final_attempt=final, db=db),
            seconds=limits.TURN_SOFT_LIMIT.total_seconds(),
        )
        result, last_delta = db.drive(loop, turn)
        hoptrace.mark(message_id, "k_turned")
    except TimeoutError:
        return _timed_out(message_id, user_pk, db)
    except pipeline.EarlierMessagePending as exc:
        # Double-texting: the user's earlier message is placed first; this one follows shortly.
        if task.request.retries >= ORDER_RETRIES:
            raise
        countdown = 0.2 if task.request.retries < ORDER_FAST_RETRIES else 2.0
        logger.info("process_turn: message %s waits for an earlier one; again in %s s", message_id, countdown)
        raise task.retry(exc=exc, countdown=countdown) from exc  # the same arguments again
    except AgentUnavailable:
        if hinted is None:
            raise
        # The message is not of the agent its task named (the turn's read checks): read its agent.
        logger.warning(
            "process_turn: message %s is not of agent %s; reading its agent", message_id, agent.name
        )
        return _process_turn(task, message_id, llm_attempt, db, None)
    except NotFound:
        logger.warning("process_turn: message %s no longer exists", message_id)
        return "missing"
    except LLMError as exc:
        if exc.transient and not final:
            logger.warning(
                "process_turn: message %s: LLM error (%s); again in %s s",
                message_id,
                exc,
                2 ** (llm_attempt + 1),
            )
            raise task.retry(
                exc=exc,
                countdown=2 ** (llm_attempt + 1),
                args=(),
                kwargs={"message_id": message_id, "llm_attempt": llm_attempt + 1, **_hint_kwargs(hint)},
            ) from exc
        return _tell_failed(user_pk=user_pk, message_id=message_id, code=exc.code)
    if last_delta is not None and result["status"] != Message.Status.DONE:  # no end to go with: now
        loop.run_until_complete(_send_delta(user_pk=user_pk, event=last_delta))
    if result["status"] == Message.Status.PROCESSING:
        # Another worker holds the message (a redelivered or re-queued task): come back when its
        # claim would be stale instead of acking this task away; by then it is done or taken over.
        stale_in = db.submit(claim_retry_in, message_id=message_id).result()
        if stale_in is not None:
            logger.info(
                "process_turn: message %s is held by another worker; again in %s s", message_id, stale_in
            )
            raise task.retry(
                countdown=stale_in,
                args=(),
                kwargs={"message_id": message_id, "llm_attempt": llm_attempt, **_hint_kwargs(hint)},
            )
    if result["status"] == Message.Status.DONE:
        thread = db.submit(lambda: thread_change_shown(result=dict(result))).result()
        hoptrace.mark(message_id, "k_shown")
        loop.run_until_complete(
            _announce(
                user_pk=user_pk,
                message_id=message_id,
                result=dict(result),
                thread=thread,
                last_delta=last_delta,
            )
        )
        hoptrace.mark(message_id, "k_announced")
    return str(result["status"])


def _time_limit_error() -> str:
    return f"the turn took longer than {int(limits.TURN_SOFT_LIMIT.total_seconds())} s"


async def _within_limit(turn: Coroutine[Any, Any, Any], *, seconds: float) -> Any:
    """Run ``turn``; past ``seconds``, cancel it and raise ``TimeoutError``.

    The cancellation carries the reason, so the turn's own failure handling (``run_turn`` marks a
    cancelled turn failed with ``str(exc)``) stores the same error ``_timed_out`` writes, never a bare
    "CancelledError" that a reader could see in between.
    """
    task = asyncio.ensure_future(turn)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel(_time_limit_error())

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await task
    except asyncio.CancelledError:
        if expired:
            raise TimeoutError(_time_limit_error()) from None
        raise
    finally:
        timer.cancel()


def _timed_out(message_id: str, user_pk: int, db: Executor) -> str:
    """The turn ran past ``TURN_SOFT_LIMIT`` and was cancelled: the message fails, the client is told."""
    seconds = int(limits.TURN_SOFT_LIMIT.total_seconds())
    logger.error("process_turn: message %s ran over %s s and was cancelled", message_id, seconds)
    db.submit(message_fail, message_id=message_id, error=_time_limit_error()).result()
    return _tell_failed(
        user_pk=user_pk,
        message_id=message_id,
        code="turn_timeout",
        text="The assistant took too long to answer. Please send your message again.",
    )


def _tell_failed(
    *, user_pk: int, message_id: str, code: str, text: str = "The assistant is unavailable right now."
) -> str:
    """Tell the user's connections that the turn of ``message_id`` failed for good."""
    publish(user_pk=user_pk, event={"kind": "error", "code": code, "message": text, "message_id": message_id})
    return "failed"


def _fail_unavailable(message_id: str, exc: AgentUnavailable) -> int:
    message_fail(message_id=message_id, error=f"agent unavailable: {exc}")
    return int(Message.objects.values_list("user_id", flat=True).get(pk=message_id))


async def _run_streaming(
    agent: Any, message_id: str, *, user_pk: int, final_attempt: bool, db: Executor
) -> Any:
    """Run the turn, streaming the reply's text to the user's connections as it is written.

    Whether anyone listens (a chat socket, a staff page) is told by the typing event's send, which
    reads the group's members anyway (``apublish_listened``): nobody (a REST caller) gets no
    deltas, which saves their channel-layer sends, and the LLM's reply is then asked for whole
    rather than streamed (``agentflow.llm.whole_replies``); the final ``turn`` is announced whatever
    the answer (a socket may open meanwhile).

    Every send of the turn (typing, deltas, the end) goes through the channel layer's blocking
    client (``blocking=True``): this thread's loop serves this turn alone, so a send holding it up
    for its round trips delays nothing else, and costs less CPU than the asyncio client's.

    Returns the turn's result and the reply's last ``delta`` event, not sent yet (None when all was
    sent, or nothing streamed): it goes with the end's events (``_announce``), one channel-layer
    send fewer a listened turn. A turn that fails sends it at once, as before.
    """
    listened = await apublish_listened(
        user_pk=user_pk,
        event={"kind": "typing", "role": "assistant", "state": True, "message_id": message_id},
        blocking=True,
    )
    hoptrace.mark(message_id, "k_typing")
    stream = DeltaStream(
        user_pk=user_pk,
        message_id=message_id,
        interval=conf().STREAM_INTERVAL_MS / 1000,
        listened=listened,
        blocking=True,
    )
    try:
        with contextlib.nullcontext() if listened else whole_replies():
            result = await run_turn(
                agent,
                message_id,
                on_text=stream,
                on_earlier="raise",
                final_attempt=final_attempt,
                jobs_inline=False,
                db_executor=db,
            )
    except BaseException:
        await stream.close()
        raise
    return result, stream.take()


async def _send_delta(*, user_pk: int, event: dict[str, Any]) -> None:
    try:
        await apublish(user_pk=user_pk, event=event, blocking=True)
    except Exception:  # the stored reply carries the whole text; a lost delta only costs smoothness
        logger.exception("could not stream a delta to user %s", user_pk)


async def _announce(
    *,
    user_pk: int,
    message_id: str,
    result: dict[str, Any],
    thread: dict[str, Any] | None,
    last_delta: dict[str, Any] | None = None,
) -> None:
    """Tell the user's connections the turn is done: the reply's last delta (if it was not sent
    yet), the thread change, the final reply, typing off.

    One channel-layer message carrying those events (``apublish_many``), in that order.
    """
    events = [last_delta] if last_delta is not None else []
    if thread is not None:
        events.append({"kind": "thread", **thread})
    events.append({"kind": "turn", "turn": result})
    events.append({"kind": "typing", "role": "assistant", "state": False, "message_id": message_id})
    try:
        await apublish_many(user_pk=user_pk, events=events, main=len(events) - 2, blocking=True)
    except Exception:  # the reply is stored: a client that missed it gets it with "resume"
        logger.exception("could not announce the turn of message %s", message_id)
