"""The one turn runner: every entry point (in-process call, REST, WebSocket, Celery) runs a stored
user message's turn through ``run_turn``.

A turn: claim and place the message (``pipeline.prepare``: thread, intent, history, memories), let
the LLM place it when the thread scorer is unsure (the first pass's embedding and scores are reused),
let the LLM decide the intent when the classifier is below the threshold, produce the reply
(``Agent.respond``: middleware, hand-off, handler or LLM with tools), store it (``pipeline.finish``).
The rules for ordering, retries and failure live here, once:

- **ordering**: a message waits for the user's earlier, still undecided one. ``on_earlier="wait"``
  polls here (in-process); ``"raise"`` lets ``EarlierMessagePending`` out so a queue can retry later.
- **failure**: any error marks the message ``failed`` (a resend retries it), except a transient LLM
  error when the caller will retry (``final_attempt=False``) and a database or Redis outage
  (``agentflow.unavailable``): the message goes back to ``pending`` and the error goes up to be retried.
- **degradation** (``agentflow.degrade``): a transient LLM error on the last attempt, or an open
  circuit breaker, gives the fallback reply (and a hand-off) instead of ``failed`` when
  ``fallback_config.enabled``; an offline reply opens the escalation its notice promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Literal, cast

from asgiref.sync import sync_to_async

from . import degrade, logs, pipeline
from .errors import LLMError
from .jobs import inline_jobs
from .llm import TextCallback
from .loops import ThreadSteps, releasing, shared_db_executor, sync_caller_waits
from .types import TurnResult
from .unavailable import is_unavailable

if TYPE_CHECKING:
    from .agent import Agent

ORDER_WAIT_SECONDS = 30.0
ORDER_POLL_SECONDS = 0.02


def sync_caller(executor: Executor | None = None, *, last: bool = False) -> Callable[..., Awaitable[Any]]:
    """How the runner calls the pipeline's synchronous (database) steps, off the event loop.

    On a shared event loop (``process_message``) on the process's pool of database threads
    (``agentflow.loops.shared_db_executor``: concurrent turns do not queue behind one thread); on a
    loop of its own (a Celery worker thread) on ``executor``: ``agentflow.loops.ThreadSteps`` runs
    each step on the loop's own thread, the loop paused; another executor (a one-thread
    ``agentflow.loops.thread_db_executor``) on its thread. ``last``: the caller for the turn's last
    step (``ThreadSteps.run_last``: the thread keeps its connection for the task's next read).
    """
    if isinstance(executor, ThreadSteps):
        return executor.run_last if last else executor.run

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if executor is None and sync_caller_waits():  # stay in the sync caller's thread and transaction
            return await sync_to_async(fn)(*args, **kwargs)
        context = contextvars.copy_context()
        on: Executor
        if executor is None:  # a shared thread: it gives the connection back, holding none while idle
            on, step = shared_db_executor(), releasing(fn)
        else:
            on, step = executor, fn
        return await asyncio.get_running_loop().run_in_executor(
            on, functools.partial(context.run, step, *args, **kwargs)
        )

    return call


async def run_step(
    call: Callable[..., Awaitable[Any]], agent: Agent, step: Any, *, on_earlier: str, **kwargs: Any
) -> Any:
    """Run a synchronous pipeline step, waiting for the user's earlier message."""
    deadline = time.monotonic() + ORDER_WAIT_SECONDS
    while True:
        try:
            return await call(step, agent, **kwargs)
        except pipeline.EarlierMessagePending:
            if on_earlier != "wait" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(ORDER_POLL_SECONDS)


@logs.turn_logging
async def run_turn(
    agent: Agent,
    message_id: Any,
    *,
    on_text: TextCallback | None = None,
    on_earlier: Literal["wait", "raise"] = "wait",
    final_attempt: bool = True,
    jobs_inline: bool | None = None,
    db_executor: Executor | None = None,
    prepared: pipeline.Prepared | None = None,
) -> TurnResult:
    """Run (or re-read) the turn of stored user message ``message_id`` with ``agent``.

    Args:
        agent: the message's agent (``AgentUnavailable`` if the message belongs to another).
        message_id: the stored user message.
        on_text: called with each piece of the reply's text as it is written (streaming).
        on_earlier: ``"wait"`` for the user's earlier undecided message here, or ``"raise"``
            ``pipeline.EarlierMessagePending`` for the caller to retry later.
        final_attempt: False when the caller retries transient LLM errors itself.
        jobs_inline: run follow-up jobs (memory writing) in this process; by default when the
            agent was built by a script of this process.
        db_executor: where the database steps run when the caller's event loop is its own (a
            Celery worker thread); by default, ``sync_to_async``.
        prepared: the turn's first ``pipeline.prepare``, already run by the caller
            (``accept_and_run_turn``); None runs it here.

    Returns:
        The turn's result; a turn that is done (or held by another worker) is re-read, not re-run.

    Raises:
        LLMError: the LLM failed (the message is ``failed``, or ``pending`` again if not final).
        AgentUnavailable, NotFound, InvalidInput: the message cannot be run by this agent.
    """
    call = sync_caller(db_executor)
    with inline_jobs(agent.runs_jobs_inline if jobs_inline is None else jobs_inline):
        if prepared is None:
            prepared = await run_step(
                call, agent, pipeline.prepare, on_earlier=on_earlier, message_id=message_id
            )
        if prepared.judgement is not None:  # the thread scorer is unsure: the LLM places the message
            verdict = {} if degrade.breaker_is_open(agent) else await agent.judge_thread(prepared.judgement)
            prepared = await run_step(
                call,
                agent,
                pipeline.prepare,
                on_earlier=on_earlier,
                message_id=message_id,
                verdict=verdict,
                judgement=prepared.judgement,
            )
        if prepared.result is not None:
            return cast(TurnResult, prepared.result)
        logs.turn_bind(prepared.ctx)
        try:
            if not prepared.held_by_human and degrade.breaker_is_open(agent):
                outcome = await _fallback(agent, degrade.CIRCUIT_OPEN_REASON, on_text)
            else:
                if agent.intent_unsure(prepared):  # the LLM decides the intent
                    intent = await agent.judge_intent(prepared)
                    if intent:
                        prepared = await call(pipeline.reclassify, agent, prepared, **intent)
                outcome = await agent.respond(prepared, on_text=on_text)
                if outcome.model and not outcome.offline:  # the LLM answered: close the breaker
                    degrade.breaker_success(agent)
                degrade.offline_escalation(agent, outcome)
        except LLMError as exc:
            opened = exc.transient and degrade.breaker_failure(agent)
            if exc.transient and not final_attempt and not opened:
                await call(pipeline.release, prepared)
                raise
            if not (exc.transient and agent.config.fallback_config.enabled):
                await call(pipeline.fail, prepared, exc, agent=agent.name)
                raise
            outcome = await _fallback(agent, str(exc), on_text)
        except BaseException as exc:
            if is_unavailable(exc):
                # PostgreSQL or Redis went away mid-turn: give the claim back (if the database lets us)
                # for the caller to retry the turn once it returns; never ``failed`` for a blip.
                with contextlib.suppress(Exception):
                    await call(pipeline.release, prepared)
                raise
            # Any other failure (handler, middleware, cancellation) marks the turn failed so a resend
            # retries it at once; otherwise the claim would block the message for STALE_CLAIM.
            await call(pipeline.fail, prepared, exc, agent=agent.name)
            raise
        return await sync_caller(db_executor, last=True)(pipeline.finish, agent, prepared, outcome)


async def accept_and_run_turn(
    agent: Agent,
    *,
    user_id: str,
    message: str,
    client_message_id: str | None = None,
    on_text: TextCallback | None = None,
) -> TurnResult:
    """Store a user message and run its turn (``Agent.process_message``), as ``pipeline.accept``
    then ``run_turn``, with the store and the turn's first ``prepare`` in one database step
    (``pipeline.accept_and_prepare``): one hand-off to a database thread, and one pool checkout
    with its health check, fewer a turn. The rules are ``run_turn``'s: when the user's earlier
    message is still undecided, the first ``prepare`` runs there again, waiting for it.
    """
    with _turn_counted() as alone:
        with inline_jobs(agent.runs_jobs_inline):  # the placement's memory jobs, as inside run_turn
            received, prepared = await sync_caller()(
                pipeline.accept_and_prepare,
                agent,
                user_id=user_id,
                message=message,
                client_message_id=client_message_id,
                embed_ahead=alone,
            )
        return await run_turn(agent, received.message.pk, on_text=on_text, prepared=prepared)


# The in-process turns this process is running (``accept_and_run_turn``), on any event loop.
_turns_running = 0
_turns_lock = threading.Lock()


@contextlib.contextmanager
def _turn_counted() -> Iterator[bool]:
    """Count a turn while it runs; yields whether it is the only one (``pipeline.embedding_ahead``).

    Alone, a turn's embedding can overlap the storing of its message on a spare core. With other
    turns running, each core has work already: a second thread would only add its hand-offs
    (measured: B, 100 users, ~15 % more CPU a turn with it; A, one user, ~6 % more turns a second).
    """
    global _turns_running
    with _turns_lock:
        _turns_running += 1
        alone = _turns_running == 1
    try:
        yield alone
    finally:
        with _turns_lock:
            _turns_running -= 1


async def _fallback(agent: Agent, reason: str, on_text: TextCallback | None) -> pipeline.Outcome:
    """The fallback reply (the LLM is down), streamed like any reply."""
    outcome = degrade.fallback_outcome(agent, reason)
    if on_text is not None:
        await on_text(outcome.text)
    return outcome
