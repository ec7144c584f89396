"""The turn pipeline's database steps: accept, prepare, finish.

A turn is: session -> user message stored (accept) -> thread decision -> intent -> memory lookup
(prepare) -> reply (the agent's async ``respond``: middleware, handler, LLM with tools) -> reply
stored (finish). Each step persists in PostgreSQL, so any process can pick a turn up by the
message id; the steps here are synchronous and run in the caller's thread (a Celery worker thread,
or a ``sync_to_async`` thread for ``process_message``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from django.db import transaction
from django.utils import timezone

from conversations import selectors as conv_selectors
from conversations import services as conv_services
from conversations import turns as conv_turns
from conversations.agents import AgentSettings, message_accept
from conversations.models import Message, Thread
from conversations.summaries import extractive_summary
from conversations.thread_detection import Candidate, ThreadDecision, decide_thread, shift_stage
from conversations.thread_features import ThreadState
from intents.rules import CLARIFY, HANDOFF, confidence_action
from intents.store import IntentSnapshot, fingerprint_annotations, fingerprint_of
from memory.selectors import memories_exist_annotations, memory_search
from memory.services import memories_use_writes
from memory.writing import PREFERENCE

from . import limits, metrics
from .conf import conf
from .context import TurnContext
from .errors import AgentUnavailable, InvalidInput, NotFound
from .integrations.settings import slack_settings
from .jobs import queue_on_commit
from .prepared import PreparedQuery
from .types import Classification, IntentCategory, IntentScore, ThreadEvent
from .validation import clean_message

if TYPE_CHECKING:
    from .agent import Agent

logger = logging.getLogger("agentflow.turn")

NOTIFY_TASK = "agentflow.notify_slack"  # conversations.notifications
STALE_CLAIM = limits.STALE_CLAIM  # longer than a turn may run (agentflow.limits)
# Messages of one user are placed in threads in the order they arrived; an earlier one younger than
# this that is still undecided makes a later one wait (an older one is presumed lost).
ORDER_WINDOW = timedelta(minutes=2)


class EarlierMessagePending(Exception):
    """An earlier message of the same user has not been placed yet: try this one again shortly."""


@dataclass
class Prepared:
    """A turn after ``prepare``: either already finished/held elsewhere, or ready for a reply."""

    message_id: str
    result: dict[str, Any] | None = None  # set when there is nothing left to do
    judgement: Judgement | None = None  # set when the LLM should place the message first
    message: Message | None = None
    ctx: TurnContext | None = None
    category: IntentCategory | None = None
    threshold: float = 0.0
    needs_human: bool = False
    clarify: bool = False  # below the threshold, and the category asks rather than hands off
    human_reason: str = ""
    started: float = field(default_factory=time.perf_counter)
    held_by_human: bool = False  # a human holds the thread: the bot stays silent this turn
    # The agent's intent categories by name, as of this turn (read once, in prepare).
    by_name: dict[str, IntentCategory] = field(default_factory=dict)


@dataclass
class Outcome:
    """The reply a turn produced, before it is stored."""

    text: str
    handled_by: str
    model: str = ""
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    llm_latency_ms: float | None = None
    offline: bool = False
    escalated: bool = False
    escalation_reason: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    confidence: float | None = None  # the reply's own confidence (intents.rules.reply_confidence)
    confidence_parts: dict[str, float] = field(default_factory=dict)


def accept(
    agent: Agent, *, user_id: str, message: str, client_message_id: str | None = None
) -> conv_services.Received:
    """Validate and store the user's message (pending). Raises InvalidInput / RateLimited."""
    limits = AgentSettings.of(id=agent.record_id, name=agent.name, version=agent.version, config=agent.config)
    return message_accept(
        limits=limits, user_id=user_id, message=message, client_message_id=client_message_id
    )


@dataclass(frozen=True)
class EmbeddingAhead:
    """A message's embedding, begun on another thread while the message is being stored.

    ``prepare`` uses it when ``text`` is the stored content (it always is but for a resend of an
    earlier message with other text), and embeds the stored content itself otherwise.
    """

    text: str
    vector: Future[np.ndarray]


# One thread, used only while idle, and only by a process's lone in-process turn
# (``runner.accept_and_run_turn``): its embedding (3-6 ms, run without the GIL) overlaps the storing
# of its message (a commit and its round trips) on a spare core. Otherwise a turn embeds on its own
# thread as before: with other turns running each core has work already.
_ahead_pool: ThreadPoolExecutor | None = None
_ahead_idle = threading.Semaphore(1)
_ahead_lock = threading.Lock()


def _ahead_reset() -> None:  # a forked child has none of its parent's threads
    global _ahead_pool, _ahead_idle
    _ahead_pool, _ahead_idle = None, threading.Semaphore(1)


os.register_at_fork(after_in_child=_ahead_reset)


def embedding_ahead(agent: Agent, message: object) -> EmbeddingAhead | None:
    """Begin embedding the text ``message`` will be stored as, if the ahead thread is idle; else None."""
    try:
        text = clean_message(message, max_chars=agent.config.input_config.max_message_chars)
    except InvalidInput:
        return None  # refused by ``accept`` in a moment; nothing to embed
    if not _ahead_idle.acquire(blocking=False):
        return None
    global _ahead_pool
    try:
        with _ahead_lock:
            if _ahead_pool is None:
                _ahead_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentflow-embed")
            vector = _ahead_pool.submit(_embed_released, agent.embedder, text)
    except BaseException:
        _ahead_idle.release()
        raise
    return EmbeddingAhead(text=text, vector=vector)


def _embed_released(embedder: Any, text: str) -> np.ndarray:
    try:
        return embedder.embed_one(text)
    finally:
        _ahead_idle.release()


def accept_and_prepare(
    agent: Agent,
    *,
    user_id: str,
    message: str,
    client_message_id: str | None = None,
    embed_ahead: bool = False,
) -> tuple[conv_services.Received, Prepared | None]:
    """``accept``, then the turn's first ``prepare``, in one database step of the caller's.

    ``Agent.process_message`` runs both on one thread, one after the other, as it ran them in two
    steps: one hand-off to a database thread and one pool checkout a turn fewer. The message is
    stored (and committed) by ``accept`` either way. The prepared turn is None when an earlier
    message of the user is still undecided (the runner then waits for it, as for any turn). The
    message's embedding begins on another thread first when ``embed_ahead`` (the caller runs no
    other turn) and that thread is idle (``embedding_ahead``).
    """
    import structlog

    ahead = embedding_ahead(agent, message) if embed_ahead else None
    received = accept(agent, user_id=user_id, message=message, client_message_id=client_message_id)
    try:
        # The turn's log fields while it prepares, as ``run_turn`` binds them (taken off after).
        with structlog.contextvars.bound_contextvars(agent=agent.name, message_id=str(received.message.pk)):
            return received, prepare(agent, message_id=received.message.pk, ahead=ahead)
    except EarlierMessagePending:
        return received, None


def _history_for_llm(messages: list[conv_selectors.HistoryMessage]) -> list[dict[str, str]]:
    """Thread messages as Anthropic turns: alternating roles, starting with the user."""
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.role == Message.Role.SYSTEM:
            continue
        role = "user" if m.role == Message.Role.USER else "assistant"
        text = f"[Human agent] {m.content}" if m.role == Message.Role.HUMAN_AGENT else m.content
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        elif turns or role == "user":
            turns.append({"role": role, "content": text})
    return turns


def _earlier_pending(message: Message) -> bool:
    # A stuck earlier message (pending past the grace period, or under a stale claim) never blocks:
    # the recovery sweep answers it, later ones go on meanwhile.
    now = timezone.now()
    return conv_selectors.earlier_undecided_exists(
        user=message.user,
        before=message.created_at,
        since=message.created_at - ORDER_WINDOW,
        pending_since=now - limits.PENDING_GRACE,
        claimed_since=now - STALE_CLAIM,
    )


def _candidate(thread: Thread, session_id: Any) -> Candidate:
    topic = np.asarray(thread.topic_embedding, dtype=np.float32)
    state = ThreadState(
        opening=np.asarray(
            thread.opening_embedding if thread.opening_embedding is not None else topic, np.float32
        ),
        last_user=np.asarray(
            thread.last_user_embedding if thread.last_user_embedding is not None else topic, np.float32
        ),
        centroid=topic,
        vocabulary=set(thread.vocabulary),
        last_assistant_text=thread.last_assistant_text,
        user_turns=thread.topic_weight,
    )
    return Candidate(
        thread.pk,
        state,
        thread.last_activity_at,
        resolved=thread.status == Thread.Status.RESOLVED,
        current_session=thread.session_id == session_id,
    )


@dataclass(frozen=True)
class Judgement:
    """A thread decision the scorer is unsure of, to be put to the LLM before it is stored."""

    message: str
    decision: ThreadDecision
    options: tuple[dict[str, Any], ...]  # {"label", "thread_id", "topic", "status", "active"}
    embedding: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0, np.float32))


SCORER_REASONS = ("scorer:", "resolution of", "new for the active thread")


def _may_judge(agent: Agent) -> bool:
    """An LLM may place the thread decisions of this agent (online, ``llm_thread_judgement`` on)."""
    return not agent.offline and agent.config.session_config.llm_thread_judgement


def _unsure(agent: Agent, decision: ThreadDecision) -> bool:
    """The decision is in an uncertain band: the scorer decided and one of its probabilities is within
    the margin of its threshold, or the second stage for unmarked shifts read the message (a thread it
    opened, or a continuation it did not open) and its P is within the margin of the stage's threshold.
    """
    cfg = agent.config.session_config
    signals = decision.signals
    if not _may_judge(agent) or "p_new_topic" not in signals:
        return False
    # Only the stage's two decisions carry its P (decide_thread); the gate settles no message within the
    # margin when a judgement may follow (decide_and_place passes the margin), so a bound
    # (p_shift_stage_max) is always below the band.
    p_stage = signals.get("p_shift_stage")
    if p_stage is not None and abs(p_stage - shift_stage().threshold) < cfg.judgement_margin:
        return True
    if not str(signals.get("reason", "")).startswith(SCORER_REASONS):
        return False
    model = agent.thread_model
    return (
        abs(signals["p_new_topic"] - model.new_topic.threshold) < cfg.judgement_margin
        or abs(signals["p_resolution"] - model.resolution.threshold) < cfg.judgement_margin
    )


def _apply_verdict(
    decision: ThreadDecision, verdict: dict[str, Any], threads: list[Thread]
) -> ThreadDecision:
    """The LLM's placement if it names a real option; otherwise the scorer's, marked as such."""
    by_id = {str(t.pk): t.pk for t in threads}
    event, target = verdict.get("event"), verdict.get("thread_id")
    cheap = {"event": decision.event, "thread_id": str(decision.thread_id) if decision.thread_id else None}
    valid = event == ThreadEvent.NEW_TOPIC or (event in ThreadEvent.ALL and target in by_id)
    if not valid:
        return ThreadDecision(
            decision.event,
            decision.thread_id,
            decision.confidence,
            {**decision.signals, "llm_judgement": verdict or "unavailable"},
        )
    return ThreadDecision(
        str(event),
        None if event == ThreadEvent.NEW_TOPIC else by_id[str(target)],
        float(verdict.get("confidence") or 0.8),
        {**decision.signals, "reason": "LLM judgement", "scorer_decision": cheap, "llm_judgement": verdict},
    )


def decide_and_place(
    agent: Agent,
    message: Message,
    embedding: np.ndarray,
    *,
    verdict: dict[str, Any] | None = None,
    allow_judgement: bool = False,
    remember: bool = True,
    decision: ThreadDecision | None = None,
    classifier: Any = None,
    claim: bool = False,
) -> Judgement | None:
    """Thread decision + intent, stored on the message. Call under the user's lock.

    With ``allow_judgement``, an unsure decision is not stored but returned as a ``Judgement`` for
    the LLM; the caller comes back with its ``verdict`` (``{}`` when there is none) and the
    judgement's ``decision``, which is reused rather than scored again. With ``claim``, the
    message's placement also claims it for this turn (one write).
    """
    now = timezone.now()
    user = message.user
    cfg = agent.config.session_config
    inactivity = timedelta(minutes=cfg.thread_inactivity_threshold)
    candidates = conv_selectors.thread_candidates(user=user)  # read once: dormancy and the decision
    conv_services.threads_mark_dormant(user=user, idle=inactivity, now=now, threads=candidates)
    threads = [t for t in candidates if t.topic_embedding is not None]
    if decision is None or (
        decision.thread_id is not None and decision.thread_id not in {t.pk for t in threads}
    ):
        started = time.perf_counter()
        with metrics.stage_timer(agent.name, "thread"):
            decision = decide_thread(
                text=message.content,
                embedding=embedding,
                candidates=[_candidate(t, message.session_id) for t in threads],
                now=now,
                inactivity=inactivity,
                model=agent.thread_model,
                embed_reply=agent.embedder.embed_one if cfg.shift_stage else None,
                # the stage's P near its threshold may be judged: the gate must not settle it on a bound
                stage_margin=cfg.judgement_margin if allow_judgement and _may_judge(agent) else 0.0,
            )
        decision.signals["decision_ms"] = round((time.perf_counter() - started) * 1000, 3)
    if verdict is not None:
        decision = _apply_verdict(decision, verdict, threads)
    elif allow_judgement and _unsure(agent, decision):
        options = tuple(
            {
                "label": f"T{i + 1}",
                "thread_id": str(t.pk),
                "topic": t.topic,
                "status": t.status,
                "active": i == 0,
            }
            for i, t in enumerate(threads[:6])
        )
        return Judgement(message.content, decision, options, embedding)
    with metrics.stage_timer(agent.name, "classify"):
        classification = (classifier or agent.classifier).classify(embedding)
    target = None if decision.thread_id is None else next(t for t in threads if t.pk == decision.thread_id)
    thread = conv_turns.message_place(
        message=message,
        event=decision.event,
        thread=target,
        confidence=decision.confidence,
        signals=decision.signals,
        intent=classification.intent,
        intent_confidence=classification.confidence,
        candidates=[{"intent": s.name, "confidence": s.confidence} for s in classification.runners_up],
        embedding=embedding,
        now=now,
        claim=claim,
    )
    if remember and agent.config.memory_config.enabled:
        if decision.event == ThreadEvent.RESOLUTION:
            queue_on_commit("memory.remember_resolution", str(thread.pk))
        if PREFERENCE.search(message.content):
            # The message's vector goes with an in-process job: a statement that is the whole
            # message is not embedded again (memory.tasks.remember_preference).
            queue_on_commit(
                "memory.remember_preference",
                str(message.pk),
                handoff={
                    "message_vector": (agent.embedder, str(message.pk), message.content, embedding.copy())
                },
            )
    return None


def _locked_turn_message(*, message_id: Any, pending_since: Any, claimed_since: Any) -> Any:
    return conv_turns.message_for_turn_rows(
        message_id=message_id,
        lock=True,
        annotations={
            **fingerprint_annotations(agent_ref="user__agent_id"),
            # Whether the memory search can find anything (prepare skips it otherwise).
            **memories_exist_annotations(user_ref="user_id", agent_ref="user__agent_id"),
            # A stuck earlier message (pending past the grace period, or under a stale claim) never
            # blocks: the recovery sweep answers it, later ones go on meanwhile.
            "earlier_undecided": conv_selectors.earlier_undecided_annotation(
                window=ORDER_WINDOW, pending_since=pending_since, claimed_since=claimed_since
            ),
        },
    )


# The turn's first statement, compiled once per connection (it was the costliest query to build).
_LOCKED_TURN_MESSAGE = PreparedQuery(_locked_turn_message)


def _message_of(agent: Agent, message_id: Any, *, lock: bool = False) -> Message:
    """The user message of a turn, checked to belong to ``agent`` (never run with another's settings).

    ``lock``: under the message's and its user's row locks, with the agent's intent-category
    fingerprint (``categories_n``, ``categories_changed``) read in the same statement.
    """
    try:
        if lock:
            now = timezone.now()
            rows = _LOCKED_TURN_MESSAGE.run(
                message_id=Message._meta.pk.to_python(message_id),
                pending_since=now - limits.PENDING_GRACE,
                claimed_since=now - STALE_CLAIM,
            )
            if not rows:
                raise Message.DoesNotExist
            message = rows[0]
        else:
            message = conv_turns.message_for_turn(message_id=message_id)
    except (Message.DoesNotExist, ValueError, TypeError):
        raise NotFound(f"message {message_id} not found") from None
    if message.user.agent_id != agent.record_id:
        raise AgentUnavailable(
            f"message {message_id} belongs to agent {message.user.agent.name!r}, not {agent.name!r}"
        )
    return message


def prepare(
    agent: Agent,
    *,
    message_id: Any,
    verdict: dict[str, Any] | None = None,
    judgement: Judgement | None = None,
    ahead: EmbeddingAhead | None = None,
) -> Prepared:
    """Claim a stored user message and work out its thread, intent, history and memories.

    Idempotent: a finished turn returns its result; a turn another worker holds returns its state.
    When the thread scorer is unsure (and an LLM is available), nothing is placed yet: the result
    carries a ``judgement`` for ``Agent.judge_thread``; call again with its ``verdict`` and the
    ``judgement`` (its embedding and scores are reused). ``ahead``: the message's embedding begun
    before it was stored (``accept_and_prepare``), used if it is of the stored text.
    """
    # One transaction: the message and its user are row-locked (the claim and the user's lock, so
    # double-texted messages are placed in order), placed and claimed in one write, and read for the
    # reply. A turn that cannot go on (done, held elsewhere, an earlier message pending, the LLM to
    # judge the thread first) leaves the message as it was.
    with transaction.atomic():
        message = _message_of(agent, message_id, lock=True)
        key = str(message.pk)
        now = timezone.now()
        if message.status == Message.Status.DONE or not conv_turns.message_claimable(
            message=message, now=now, stale_after=STALE_CLAIM
        ):
            return Prepared(key, result=conv_selectors.turn_result(message=message))
        if message.thread_id is not None:  # placed by an earlier attempt: claim it, keep its place
            conv_turns.message_claim_locked(message=message, now=now)
            return _prepared(agent, message, embedding=None, snapshot=None, fresh_thread=False)
        if message.earlier_undecided:  # type: ignore[attr-defined]  # read with the message
            raise EarlierMessagePending(
                f"an earlier message of user {message.user.external_id} is still pending"
            )
        started = time.perf_counter()
        if judgement is not None and judgement.embedding.size:
            embedding = judgement.embedding
        elif ahead is not None and ahead.text == message.content:
            with metrics.stage_timer(agent.name, "embed"):
                embedding = ahead.vector.result()
        else:
            with metrics.stage_timer(agent.name, "embed"):
                embedding = agent.embedder.embed_one(message.content)
        # The agent's categories as of this turn: read once, with the message.
        snapshot = agent.intents.current(fingerprint=fingerprint_of(message))
        unsure = decide_and_place(
            agent,
            message,
            embedding,
            verdict=verdict,
            allow_judgement=verdict is None,
            decision=judgement.decision if judgement is not None else None,
            classifier=snapshot.classifier,
            claim=True,
        )
        if unsure is not None:
            return Prepared(key, judgement=unsure)
        return _prepared(
            agent,
            message,
            embedding=embedding,
            snapshot=snapshot,
            fresh_thread=message.thread_event == ThreadEvent.NEW_TOPIC,
            started=started,
        )


def _prepared(
    agent: Agent,
    message: Message,
    *,
    embedding: np.ndarray | None,
    snapshot: IntentSnapshot | None,
    fresh_thread: bool,
    started: float | None = None,
) -> Prepared:
    """A claimed, placed message's turn: history, memories and the confidence rules.

    ``embedding``/``snapshot`` None (a retried turn): computed here. ``fresh_thread``: the message
    opened its thread just now, so there is no history to read.
    """
    key = str(message.pk)
    if started is None:
        started = time.perf_counter()
    if embedding is None:
        embedding = agent.embedder.embed_one(message.content)
    if snapshot is None:
        snapshot = agent.intents.current(fingerprint=fingerprint_of(message))
    thread: Thread = message.thread  # type: ignore[assignment]
    classification = Classification(
        message.intent or None,
        message.confidence or 0.0,
        tuple(IntentScore(c["intent"], c["confidence"]) for c in message.intent_candidates),
    )
    # Read with the thread candidates; a thread the message just opened has no escalation.
    held = False if fresh_thread else getattr(thread, "held_by_human", None)
    if held is None:
        held = conv_selectors.thread_held_by_human(thread=thread)
    if held:
        return _held(agent, message, thread, classification, started, snapshot.by_name)
    window = agent.config.llm_config.history_messages
    recent = (
        [] if fresh_thread else conv_selectors.thread_history(thread=thread, limit=window, before=message)
    )
    history = _history_for_llm(recent)
    summary = ""
    if len(recent) == window:  # the window is full: older messages get a running summary
        summary = extractive_summary(
            conv_selectors.thread_earlier_than_window(thread=thread, window=window, before=message)
        )
    mem_cfg = agent.config.memory_config
    memories: list[dict[str, Any]] = []
    # Read with the locked message: no memory of the user's own and no approved global one means
    # the search would return nothing (a message read another way has no such flags: searched).
    may_remember = getattr(message, "own_memories", True) or getattr(message, "shared_memories", True)
    if mem_cfg.enabled:
        # Timed either way: the stage's count stays one per turn, a skipped search counts ~0 s.
        with metrics.stage_timer(agent.name, "retrieve"):
            if may_remember:
                memories = memory_search(
                    user=message.user,
                    embedding=embedding,
                    limit=mem_cfg.top_k,
                    similarity_threshold=mem_cfg.similarity_threshold,
                )
    by_name = snapshot.by_name
    category = by_name.get(classification.intent) if classification.intent else None
    action = confidence_action(
        classification=classification,
        category=category,
        config=agent.config.confidence_config,
        thread_event=message.thread_event,
    )
    ctx = TurnContext(
        user_id=message.user.external_id,
        message=message.content,
        message_id=key,
        session_id=str(message.session_id),
        thread_id=str(thread.pk),
        thread_event=message.thread_event,
        classification=classification,
        config=agent.config,
        history=history,
        thread_summary=summary,
        memories=memories,
        tools=agent.tools,
    )
    return Prepared(
        key,
        message=message,
        ctx=ctx,
        category=category,
        threshold=action.threshold,
        needs_human=action.action == HANDOFF,
        clarify=action.action == CLARIFY,
        human_reason=action.reason,
        started=started,
        by_name=by_name,
    )


def reclassify(agent: Agent, prepared: Prepared, *, intent: str, confidence: float, source: str) -> Prepared:
    """Take another intent decision (the LLM's) for a prepared turn: store it, re-apply the rules."""
    assert prepared.ctx is not None and prepared.message is not None
    message = prepared.message
    old = prepared.ctx.classification
    runners = tuple(
        s
        for s in (IntentScore(old.intent or "", old.confidence), *old.runners_up)
        if s.name and s.name != intent
    )
    classification = Classification(intent, round(confidence, 4), runners[:3])
    conv_turns.message_reclassify(
        message=message,
        intent=intent,
        confidence=classification.confidence,
        candidates=[{"intent": s.name, "confidence": s.confidence} for s in runners[:3]],
        source=source,
    )
    category = prepared.by_name.get(intent)
    action = confidence_action(
        classification=classification,
        category=category,
        config=agent.config.confidence_config,
        thread_event=message.thread_event,
    )
    prepared.ctx.classification = classification
    prepared.category, prepared.threshold = category, action.threshold
    prepared.needs_human, prepared.clarify = action.action == HANDOFF, action.action == CLARIFY
    prepared.human_reason = action.reason
    return prepared


def place(agent: Agent, *, message_id: Any) -> dict[str, Any]:
    """The thread step alone: place a stored user message in a thread and finish it without a reply.

    For evaluation and for importing conversations. Returns the decision with its timings.
    """
    message = _message_of(agent, message_id)
    if not conv_services.message_claim(message_id=message.pk, now=timezone.now(), stale_after=STALE_CLAIM):
        raise NotFound(f"message {message_id} is already being processed or done")
    started = time.perf_counter()
    embedding = agent.embedder.embed_one(message.content)
    embedding_ms = (time.perf_counter() - started) * 1000
    with transaction.atomic():
        conv_services.user_lock(user=message.user)
        waiting = _earlier_pending(message)
        if not waiting:
            decide_and_place(agent, message, embedding, remember=False)
            conv_turns.message_mark_placed(message=message)
    if waiting:
        conv_services.message_release(message_id=message.pk)
        raise EarlierMessagePending(f"an earlier message of user {message.user.external_id} is still pending")
    return {
        "message_id": str(message.pk),
        "session_id": str(message.session_id),
        "thread_id": str(message.thread_id),
        "thread_event": message.thread_event,
        "thread_confidence": message.thread_confidence,
        "signals": message.thread_signals,
        "intent": message.intent or None,
        "confidence": message.confidence,
        "embedding_ms": round(embedding_ms, 3),
        "decision_ms": message.thread_signals.get("decision_ms", 0.0),
    }


def record(agent: Agent, *, user_id: str, content: str, role: str) -> dict[str, Any]:
    """Append an assistant or human-agent message to the user's most recent thread (imports, evaluation)."""
    from agentflow.validation import clean_user_id

    if role not in (Message.Role.ASSISTANT, Message.Role.HUMAN_AGENT):
        raise InvalidInput("role must be 'assistant' or 'human_agent'", field="role")
    text = clean_message(content, max_chars=agent.config.input_config.max_message_chars)
    user = conv_selectors.user_get(agent_id=agent.record_id, external_id=clean_user_id(user_id))
    threads = conv_selectors.thread_candidates(user=user, limit=1)
    if not threads:
        raise InvalidInput("the user has no thread to add this message to", field="user_id")
    thread = threads[0]
    stored = conv_turns.message_record(thread=thread, role=role, content=text)
    return {"message_id": str(stored.pk), "thread_id": str(thread.pk), "role": role}


def _held(
    agent: Agent,
    message: Message,
    thread: Thread,
    classification: Classification,
    started: float,
    by_name: dict[str, IntentCategory],
) -> Prepared:
    """A turn in a thread a human holds: no history, memories or reply; the human answers."""
    ctx = TurnContext(
        user_id=message.user.external_id,
        message=message.content,
        message_id=str(message.pk),
        session_id=str(message.session_id),
        thread_id=str(thread.pk),
        thread_event=message.thread_event,
        classification=classification,
        config=agent.config,
        history=[],
        thread_summary="",
        memories=[],
        tools=agent.tools,
    )
    return Prepared(
        str(message.pk),
        message=message,
        ctx=ctx,
        category=by_name.get(classification.intent) if classification.intent else None,
        by_name=by_name,
        needs_human=True,
        human_reason="a human holds this thread",
        started=started,
        held_by_human=True,
    )


def fail(prepared: Prepared, exc: BaseException, *, agent: str = "") -> None:
    """Mark a claimed turn failed (a resend, or the user's next message, is not blocked by it)."""
    conv_services.message_fail(message_id=prepared.message_id, error=str(exc) or type(exc).__name__)
    metrics.turn_count(agent=agent, intent=prepared.ctx.intent if prepared.ctx else None, outcome="failed")
    if prepared.ctx is not None:
        notify_slack(prepared.ctx.config, event="failure", message_id=prepared.message_id)


def notify_slack(config: Any, *, event: str, message_id: Any) -> None:
    """Queue the Slack notice of ``event`` about a user message, if ``slack_integration`` asks for it."""
    try:
        slack = slack_settings(config.tools_config)
    except Exception:  # checked when the agent was built; a notice never fails a turn
        logger.exception("slack_integration settings unreadable")
        return
    if slack is not None and event in slack.notify_on:
        queue_on_commit(NOTIFY_TASK, str(message_id), event)


def release(prepared: Prepared) -> None:
    """Give a claimed turn back (pending): its caller retries it shortly."""
    conv_services.message_release(message_id=prepared.message_id)


def finish(agent: Agent, prepared: Prepared, outcome: Outcome) -> dict[str, Any]:
    """Store the reply and mark the turn done. Running it twice stores one reply.

    An escalated turn opens the thread's escalation (the hand-off queue; idempotent). In a thread a
    human holds, no reply is stored: the user message is done, ``handled_by`` is ``human``.
    """
    assert prepared.ctx is not None
    with metrics.stage_timer(agent.name, "store"):
        result = _store(agent, prepared, outcome)
    ctx = prepared.ctx
    if outcome.model and not outcome.offline and outcome.llm_latency_ms is not None:  # the LLM answered
        metrics.stage_observe(agent.name, "llm", outcome.llm_latency_ms / 1000)
    metrics.stage_observe(agent.name, "total", time.perf_counter() - prepared.started)
    metrics.turn_count(
        agent=agent.name,
        intent=ctx.intent,
        outcome="human" if prepared.held_by_human else outcome.handled_by.split(":")[0],
        escalated=outcome.escalated and not prepared.held_by_human,
    )
    return result


def _store(agent: Agent, prepared: Prepared, outcome: Outcome) -> dict[str, Any]:
    assert prepared.ctx is not None
    ctx = prepared.ctx
    latency_ms = round((time.perf_counter() - prepared.started) * 1000, 2)
    message = prepared.message or _message_of(agent, prepared.message_id)
    reply: Message | None = None
    if prepared.held_by_human:
        conv_turns.turn_finish_held(
            message=message, handled_by=outcome.handled_by, reason=outcome.escalation_reason
        )
        # Handed back meanwhile, the message opened a new escalation; otherwise the job finds the
        # thread's escalation already announced and posts nothing.
        notify_slack(agent.config, event="escalation", message_id=message.pk)
        result = conv_selectors.turn_result(message=message)
        logger.info(
            "turn agent=%s user=%s thread=%s event=%s intent=%s held by a human latency_ms=%.1f",
            agent.name,
            ctx.user_id,
            ctx.thread_id,
            ctx.thread_event,
            ctx.intent,
            latency_ms,
            extra=_turn_fields(ctx, outcome, latency_ms),
        )
        return result
    reply = conv_turns.turn_finish(
        message=message,
        reply_fields={
            "content": outcome.text,
            "confidence": outcome.confidence if outcome.confidence is not None else message.confidence,
            "thread_signals": {"confidence": outcome.confidence_parts} if outcome.confidence_parts else {},
            "escalated": outcome.escalated,
            "offline": outcome.offline,
            "model": outcome.model,
            "usage": outcome.usage,
            "latency_ms": latency_ms,
            "llm_latency_ms": outcome.llm_latency_ms,
            "handled_by": outcome.handled_by,
            "memories_used": ctx.memories,
            "tool_calls": outcome.tool_calls,
        },
        escalation_reason=outcome.escalation_reason,
        # The memories the reply used are counted in the same statement as the reply.
        also=memories_use_writes(memory_ids=[m["id"] for m in ctx.memories], now=timezone.now()),
    )
    if outcome.escalated and reply is not None:
        notify_slack(agent.config, event="escalation", message_id=message.pk)
    result = conv_selectors.turn_result(message=message, reply=reply)
    logger.info(
        "turn agent=%s user=%s thread=%s event=%s intent=%s confidence=%.2f escalated=%s by=%s latency_ms=%.1f",
        agent.name,
        ctx.user_id,
        ctx.thread_id,
        ctx.thread_event,
        ctx.intent,
        ctx.confidence,
        outcome.escalated,
        outcome.handled_by,
        latency_ms,
        extra=_turn_fields(ctx, outcome, latency_ms),
    )
    return result


def _turn_fields(ctx: TurnContext, outcome: Outcome, latency_ms: float) -> dict[str, Any]:
    """The turn log line's fields for structured logs; the text only with ``AGENTFLOW_LOG_MESSAGE_TEXT``."""
    fields: dict[str, Any] = {
        "thread_event": ctx.thread_event,
        "intent": ctx.intent or "",
        "confidence": ctx.confidence,
        "escalated": outcome.escalated,
        "handled_by": outcome.handled_by,
        "latency_ms": latency_ms,
        "llm_latency_ms": outcome.llm_latency_ms,
        "input_tokens": outcome.usage.get("input_tokens", 0),
        "output_tokens": outcome.usage.get("output_tokens", 0),
    }
    if conf().LOGS.MESSAGE_TEXT:
        fields.update(text=ctx.message, reply=outcome.text)
    return fields
