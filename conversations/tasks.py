"""Celery tasks: run a stored user message's turn and tell the user's live connections.

Tasks take ids and are idempotent: a turn that is done is only re-published; one that another
worker holds is left alone. LLM I/O runs on an event loop kept per worker thread (Celery 5.7
has no asyncio pool), so each thread keeps its own HTTP connections to the LLM provider.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown

from agentflow import pipeline
from agentflow.defaults import get_agent
from agentflow.errors import LLMError, NotFound

from .events import DeltaStream, apublish, publish
from .models import Message, Thread

logger = logging.getLogger("agentflow.tasks")
_local = threading.local()
_loops: list[asyncio.AbstractEventLoop] = []
_loops_lock = threading.Lock()

MAX_LLM_RETRIES = 3
# Thread changes a chat client is told of as "thread" frames (a follow-up changes nothing visible).
THREAD_EVENTS_SHOWN = frozenset({"NEW_TOPIC", "RETURN", "RESOLUTION"})
ORDER_RETRIES = 150  # x 0.2 s: how long a message waits for the user's earlier one


def _thread_loop() -> asyncio.AbstractEventLoop:
    loop = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _local.loop = loop
        with _loops_lock:
            _loops.append(loop)
    return loop


@worker_ready.connect
def _warm_up(**kwargs: Any) -> None:
    """Build the agent and load the embedding model and the LLM SDK before the first turn.

    Loading them lazily cost the first turns of a fresh worker seconds each (the SDK alone imports
    hundreds of modules), and under load every worker thread waited on that import.
    """
    try:
        agent = get_agent()
        agent.embedder.embed(["warm up"])
        import anthropic.types  # noqa: F401
    except Exception:  # a worker that cannot warm up still serves; the first turn reports the error
        logger.exception("worker warm-up failed")


@worker_shutdown.connect
def _close_thread_loops(**kwargs: Any) -> None:
    """Close the LLM clients each worker thread's loop holds, then the loops."""
    from agentflow.defaults import cached_agents

    with _loops_lock:
        loops, _loops[:] = list(_loops), []
    for loop in loops:
        if loop.is_running() or loop.is_closed():
            continue
        for agent in cached_agents():
            close = getattr(agent.llm, "aclose", None)
            if close is not None:
                loop.run_until_complete(close())
        loop.close()


@shared_task(bind=True, acks_late=True, max_retries=None)
def process_turn(self: Any, message_id: str, llm_attempt: int = 0) -> str:
    """Run the turn of stored user message ``message_id`` and publish its result."""
    loop = _thread_loop()
    agent = get_agent()
    try:
        prepared = pipeline.prepare(agent, message_id=message_id)
        if prepared.judgement is not None:  # the thread scorer is unsure: the LLM places the message
            verdict = loop.run_until_complete(agent.judge_thread(prepared.judgement))
            prepared = pipeline.prepare(agent, message_id=message_id, verdict=verdict)
    except pipeline.EarlierMessagePending as exc:
        # Double-texting: the user's earlier message is placed first; this one follows shortly.
        if self.request.retries >= ORDER_RETRIES:
            raise
        raise self.retry(exc=exc, countdown=0.2) from exc
    except NotFound:
        logger.warning("process_turn: message %s no longer exists", message_id)
        return "missing"
    user_pk = Message.objects.values_list("user_id", flat=True).get(pk=message_id)
    if prepared.result is None and agent.intent_unsure(prepared):  # the LLM decides the intent
        verdict = loop.run_until_complete(agent.judge_intent(prepared))
        if verdict:
            prepared = pipeline.reclassify(agent, prepared, **verdict)
    if prepared.result is not None:
        if prepared.result["status"] == Message.Status.DONE:
            publish(user_pk=user_pk, event={"kind": "turn", "turn": prepared.result})
        return str(prepared.result["status"])
    try:
        outcome = loop.run_until_complete(
            _respond_streaming(agent, prepared, user_pk=user_pk, message_id=message_id)
        )
    except LLMError as exc:
        agent.fail(prepared, exc)
        if exc.transient and llm_attempt < MAX_LLM_RETRIES:
            raise self.retry(
                exc=exc,
                countdown=2 ** (llm_attempt + 1),
                args=(),
                kwargs={"message_id": message_id, "llm_attempt": llm_attempt + 1},
            ) from exc
        publish(
            user_pk=user_pk,
            event={
                "kind": "error",
                "code": exc.code,
                "message": "The assistant is unavailable right now.",
                "message_id": message_id,
            },
        )
        return "failed"
    except Exception as exc:
        agent.fail(prepared, exc)
        raise
    result = pipeline.finish(agent, prepared, outcome)
    loop.run_until_complete(_announce(user_pk=user_pk, message_id=message_id, result=result))
    return "done"


async def _respond_streaming(agent: Any, prepared: Any, *, user_pk: int, message_id: str) -> Any:
    """Run the reply, streaming its text to the user's connections as it is written."""
    await apublish(
        user_pk=user_pk,
        event={"kind": "typing", "role": "assistant", "state": True, "message_id": message_id},
    )
    stream = DeltaStream(user_pk=user_pk, message_id=message_id)
    try:
        return await agent.respond(prepared, on_text=stream)
    finally:
        await stream.close()


async def _announce(*, user_pk: int, message_id: str, result: dict[str, Any]) -> None:
    """Tell the user's connections the turn is done: the thread change, the final reply, typing off."""
    try:
        if result.get("thread_event") in THREAD_EVENTS_SHOWN and result.get("thread_id"):
            thread = await Thread.objects.filter(pk=result["thread_id"]).values("status", "topic").afirst()
            if thread is not None:
                await apublish(
                    user_pk=user_pk,
                    event={
                        "kind": "thread",
                        "event": result["thread_event"],
                        "thread_id": result["thread_id"],
                        **thread,
                    },
                )
        await apublish(user_pk=user_pk, event={"kind": "turn", "turn": result})
        await apublish(
            user_pk=user_pk,
            event={"kind": "typing", "role": "assistant", "state": False, "message_id": message_id},
        )
    except Exception:  # the reply is stored: a client that missed it gets it with "resume"
        logger.exception("could not announce the turn of message %s", message_id)


def enqueue_turn(message_id: Any) -> None:
    """Queue the turn once the surrounding transaction commits (call from a service or transport)."""
    from django.db import transaction

    transaction.on_commit(lambda: process_turn.delay(str(message_id)))
