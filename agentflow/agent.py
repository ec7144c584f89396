"""The built agent: immutable, safe to share between coroutines and threads."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from types import MappingProxyType
from typing import Any

from asgiref.sync import sync_to_async

from . import pipeline
from .config import AgentFrameworkConfig
from .context import Handler, HandlerResult, Middleware, TurnContext, turn_scope
from .embeddings import Embedder
from .errors import LLMError
from .llm import LLMBackend, TextCallback
from .loops import releasing, shared_db_executor, sync_caller_waits
from .tools import ToolSource, tools_or_unavailable
from .types import Classification, IntentCategory, TurnResult

logger = logging.getLogger("agentflow.agent")

HANDOFF_NOTICE = (
    "I'm handing this conversation to a member of our team so you get the right answer. "
    "A human agent will reply here shortly."
)
OFFLINE_PREFIX = "[Offline mode] "
NO_ANSWER_NOTICE = (
    "I couldn't complete an answer this time. Would you like a member of our team to take over?"
)


class Agent:
    """Processes user messages: threads, intents, memory, handlers, the LLM, hand-off.

    Made by ``AgentFrameworkBuilder.build()``; not meant to be constructed directly.
    """

    def __init__(
        self,
        *,
        config: AgentFrameworkConfig,
        intents: Any,
        handlers: Mapping[str, Handler],
        middleware: tuple[Middleware, ...],
        llm: LLMBackend,
        tools: ToolSource | None,
        embedder: Embedder,
        thread_model: Any,
        record_id: int,
        version: int = 1,
        fingerprint: str = "",
        shape: tuple[Any, ...] = (),
        config_sources: Mapping[str, str] | None = None,
        runs_jobs_inline: bool = False,
    ) -> None:
        self.config = config
        self.config_sources = MappingProxyType(dict(config_sources or {}))
        self.record_id = record_id  # conversations.models.Agent: the record every process rebuilds it from
        self.version = version
        self.fingerprint = (
            fingerprint  # of the code-side definition (categories, handlers, middleware, tools)
        )
        self.shape = shape  # category names, handlers, middleware, tools: what tells two agents apart
        # intents.store.IntentStore: the agent's categories in the database, kept fresh
        self.intents = intents
        self.handlers = MappingProxyType(dict(handlers))
        self.middleware = middleware
        self.llm = llm
        self.tools = tools
        self.embedder = embedder
        self.thread_model = thread_model
        # Built by a script (not resolved through the registry): its follow-up jobs (memory writing)
        # run in this process, with this agent, instead of waiting for a worker that may not exist.
        self.runs_jobs_inline = runs_jobs_inline

    @property
    def name(self) -> str:
        """The agent's stable name (``config.name``): its record, URLs and chat tokens use it."""
        return self.config.name

    def describe(self) -> dict[str, Any]:
        """The effective configuration and where each value comes from.

        Returns:
            ``{"name", "version", "offline", "config", "sources", "categories", "handlers",
            "middleware", "tools"}``: ``sources`` maps each explicitly set setting to its source
            (``yaml:<path>``, ``dict``, ``env:<VAR>``, ``code``; absent means the default);
            ``categories`` lists each intent category with its effective threshold and its source
            (``code``, ``staff`` or ``default``). See docs/configuration.md for the precedence.
        """
        from intents.selectors import intent_threshold_sources

        return {
            "name": self.name,
            "version": self.version,
            "offline": self.offline,
            "config": self.config.model_dump(mode="json", exclude={"tools_config"}),
            "sources": dict(self.config_sources),
            "categories": intent_threshold_sources(
                agent_id=self.record_id, default=self.config.confidence_config.default_threshold
            ),
            "handlers": sorted(self.handlers),
            "middleware": [type(mw).__name__ for mw in self.middleware],
            "tools": self.tools is not None,
        }

    @property
    def offline(self) -> bool:
        """True when no LLM is reachable (no API key): replies say so and offer a human."""
        return self.llm.offline

    @property
    def categories(self) -> tuple[IntentCategory, ...]:
        """The active intent categories (the database's, as of now)."""
        return self.intents.current().categories

    @property
    def classifier(self) -> Any:
        return self.intents.current().classifier

    def category(self, name: str | None) -> IntentCategory | None:
        return self.intents.current().by_name.get(name) if name else None

    # --- public API -------------------------------------------------------------------------

    async def process_message(
        self,
        *,
        user_id: str,
        message: str,
        client_message_id: str | None = None,
        on_text: Callable[[str], Any] | None = None,
    ) -> TurnResult:
        """Run one turn for one user and return its result.

        Args:
            on_text: called with each piece of the reply's text as the LLM writes it (a plain or an
                async function), for callers that show the reply as it comes; ``stream_message``
                gives the same as events.

        Returns:
            A dict with ``content``, ``session_id``, ``thread_id``, ``thread_event``, ``intent``,
            ``confidence``, ``escalated``, ``usage``, ``offline`` and more (see ``TurnResult``).

        Raises:
            InvalidInput: empty, oversized or malformed input; nothing was stored.
            RateLimited: the user exceeded ``rate_limit_config``; nothing was stored.
            LLMError: the LLM failed and no fallback reply applies (a non-transient error, or
                ``fallback_config.enabled`` false); the message is stored with status ``failed``.
        """
        from .runner import accept_and_run_turn

        return await accept_and_run_turn(
            self,
            user_id=user_id,
            message=message,
            client_message_id=client_message_id,
            on_text=_awaitable(on_text),
        )

    async def stream_message(
        self, *, user_id: str, message: str, client_message_id: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Run one turn and yield its events as they happen, the same the WebSocket sends::

            async for event in agent.stream_message(user_id="alice", message="My login is broken"):
                if event["type"] == "delta":
                    print(event["text"], end="", flush=True)

        Yields:
            ``{"type": "ack", "message_id", "client_message_id", "duplicate"}`` once the message is
            stored; ``{"type": "delta", "message_id", "seq", "text"}`` for each piece of the reply
            as it is written (none when the reply is not streamed: a hand-off, a handler, a reply
            the Confidence Evaluator withholds); ``{"type": "thread", "event", "thread_id",
            "status", "topic"}`` when the turn opened, returned to or resolved a thread; last
            ``{"type": "turn", ...}``, the turn result of ``process_message``.

        Raises:
            As ``process_message``, after the events so far. Leaving the loop early cancels the turn
            (the message is then ``failed``, and resending its ``client_message_id`` retries it).
        """
        received = await _db(pipeline.accept)(
            self, user_id=user_id, message=message, client_message_id=client_message_id
        )
        message_id = str(received.message.pk)
        yield {
            "type": "ack",
            "message_id": message_id,
            "client_message_id": client_message_id,
            "duplicate": not received.created,
        }
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        async def on_text(text: str) -> None:
            pieces.put_nowait(text)

        turn = asyncio.ensure_future(self.run_turn(received.message.pk, on_text=on_text))
        turn.add_done_callback(lambda _: pieces.put_nowait(None))
        seq = 0
        try:
            while (text := await pieces.get()) is not None:
                yield {"type": "delta", "message_id": message_id, "seq": seq, "text": text}
                seq += 1
        finally:
            if not turn.done():
                turn.cancel()
        result = turn.result()
        from conversations.selectors import thread_change_shown

        thread = await sync_to_async(thread_change_shown)(result=dict(result))
        if thread is not None:
            yield {"type": "thread", **thread}
        yield {"type": "turn", **result}

    async def run_turn(self, message_id: Any, *, on_text: TextCallback | None = None) -> TurnResult:
        """Run (or re-read) the turn of a stored user message (``agentflow.runner.run_turn``).

        Messages of one user are placed in the order they arrived: if an earlier one is still
        undecided, this one waits for it (up to ``runner.ORDER_WAIT_SECONDS``).
        """
        from .runner import run_turn

        return await run_turn(self, message_id, on_text=on_text)

    async def detect_thread(self, *, user_id: str, message: str) -> dict[str, Any]:
        """Store a user message and place it in a thread, without replying.

        The thread step of ``process_message`` on its own: for evaluation and for importing past
        conversations. Returns ``thread_id``, ``thread_event``, ``thread_confidence``, the
        ``signals`` behind the decision and its timings (``embedding_ms``, ``decision_ms``).
        """
        from .runner import run_step, sync_caller

        received = await _db(pipeline.accept)(self, user_id=user_id, message=message)
        return await run_step(
            sync_caller(), self, pipeline.place, on_earlier="wait", message_id=received.message.pk
        )

    async def record_message(self, *, user_id: str, content: str, role: str = "assistant") -> dict[str, Any]:
        """Append an assistant (or ``human_agent``) message to the user's most recent thread.

        It becomes context for the next thread decision, as a reply would.
        """
        return await _db(pipeline.record)(self, user_id=user_id, content=content, role=role)

    async def judge_thread(self, judgement: pipeline.Judgement) -> dict[str, Any]:
        """Ask the LLM where a message belongs when the thread scorer is unsure.

        Structured output through a forced tool call. Returns ``{"event", "thread_id", "label",
        "confidence"}``, or ``{}`` when the LLM fails or answers off-script (the scorer's decision
        then stands).
        """
        listing = "\n".join(
            f"{o['label']}: {o['topic']!r} ({o['status']}{', the active thread' if o['active'] else ''})"
            for o in judgement.options
        )
        prompt = (
            f"Threads of this user's conversation, most recent first:\n{listing}\n\n"
            f"New user message: {judgement.message!r}\n\n"
            "FOLLOW_UP: it continues the active thread. RETURN: it goes back to an earlier thread. "
            "RESOLUTION: the user says the issue of a thread is solved. NEW_TOPIC: anything new."
        )
        tool = {
            "name": "place_message",
            "description": "Say which thread the new message belongs to.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "event": {"type": "string", "enum": ["FOLLOW_UP", "RETURN", "RESOLUTION", "NEW_TOPIC"]},
                    "thread": {
                        "type": "string",
                        "description": "The thread label (T1, T2...); omit for NEW_TOPIC.",
                    },
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["event"],
            },
        }
        data = await self._structured(
            system="You route chat messages to conversation threads.",
            prompt=prompt,
            tool=tool,
            what="thread judgement",
        )
        if not data:
            return {}
        labels = {o["label"]: o["thread_id"] for o in judgement.options}
        event, label = data.get("event"), data.get("thread")
        if event not in ("FOLLOW_UP", "RETURN", "RESOLUTION", "NEW_TOPIC"):
            return {}
        if event != "NEW_TOPIC" and label not in labels:
            return {}
        confidence = data.get("confidence")
        return {
            "event": event,
            "thread_id": labels.get(label) if event != "NEW_TOPIC" else None,
            "label": label,
            "confidence": confidence
            if isinstance(confidence, (int, float)) and 0 <= confidence <= 1
            else None,
        }

    def intent_unsure(self, prepared: pipeline.Prepared) -> bool:
        """The classifier fell below the threshold (or found nothing), and an LLM may decide."""
        ctx = prepared.ctx
        if (
            ctx is None
            or prepared.held_by_human
            or self.offline
            or not self.config.confidence_config.llm_intent_judgement
        ):
            return False
        if ctx.thread_event == "RESOLUTION":
            return False
        low = (prepared.needs_human or prepared.clarify) and prepared.human_reason.startswith("confidence")
        return low or (ctx.intent is None and bool(ctx.classification.runners_up))

    async def judge_intent(self, prepared: pipeline.Prepared) -> dict[str, Any]:
        """Ask the LLM which intent a message has, among the classifier's candidates (forced tool call).

        Returns ``{"intent", "confidence", "source"}`` for ``pipeline.reclassify``, or ``{}`` to keep
        the classifier's decision (the LLM said none fits, failed, or answered off-script).
        """
        ctx = prepared.ctx
        assert ctx is not None
        names = [n for n in [ctx.intent, *(s.name for s in ctx.classification.runners_up)] if n]
        by_name = prepared.by_name
        options = [by_name[n] for n in dict.fromkeys(names) if n in by_name]
        if not options:
            return {}
        listing = "\n".join(f"- {c.name}: {c.description or c.name}" for c in options)
        tool = {
            "name": "choose_intent",
            "description": "Say which intent the user's message has, or NONE if none fits.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "intent": {"type": "string", "enum": [*(c.name for c in options), "NONE"]},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["intent", "confidence"],
            },
        }
        data = await self._structured(
            system="You classify support messages into intents.",
            prompt=f"Intents:\n{listing}\n\nMessage: {ctx.message!r}",
            tool=tool,
            what="intent judgement",
        )
        if not data:
            return {}
        intent, confidence = data.get("intent"), data.get("confidence")
        if intent not in {c.name for c in options} or not isinstance(confidence, (int, float)):
            return {}
        return {"intent": intent, "confidence": float(min(max(confidence, 0.0), 1.0)), "source": "llm"}

    async def _structured(
        self, *, system: str, prompt: str, tool: dict[str, Any], what: str
    ) -> dict[str, Any]:
        """One forced tool call (structured output): the tool's input, or ``{}`` if the LLM failed."""
        config = self.config.llm_config.model_copy(
            update={"max_tokens": 200, "temperature": 0.0, "max_retries": 1}
        )
        try:
            reply = await self.llm.generate(
                system=system,
                messages=[{"role": "user", "content": prompt}],
                config=config,
                tools=[tool],
                tool_choice={"type": "tool", "name": tool["name"]},
            )
        except LLMError as exc:
            logger.warning("%s unavailable: %s", what, exc)
            return {}
        calls = [c for c in reply.tool_calls if c.get("name") == tool["name"]]
        return (calls[0].get("input") or {}) if calls else {}

    async def classify(self, text: str) -> Classification:
        """Classify a text against the agent's intent categories (no storage, no LLM)."""
        embedding = await asyncio.to_thread(self.embedder.embed_one, text)
        classifier = await sync_to_async(lambda: self.classifier)()
        return classifier.classify(embedding)

    # --- steps the transports compose ---------------------------------------------------------

    async def respond(
        self, prepared: pipeline.Prepared, *, on_text: TextCallback | None = None
    ) -> pipeline.Outcome:
        """Produce the reply: middleware, then hand-off, a handler, or the LLM (with tools)."""
        ctx = prepared.ctx
        assert ctx is not None
        if prepared.held_by_human:
            # A human holds the thread: the bot stays silent (no middleware, handler or LLM).
            return pipeline.Outcome("", "human", escalated=True, escalation_reason=prepared.human_reason)
        for mw in self.middleware:
            before = getattr(mw, "before_turn", None)
            if before is not None:
                await before(ctx)
        handled_by = "middleware" if ctx.reply is not None else ""
        if (
            ctx.reply is None
            and not prepared.needs_human
            and not prepared.clarify
            and ctx.intent in self.handlers
        ):
            await self._run_handler(ctx)
            handled_by = f"handler:{ctx.intent}"
        escalated = prepared.needs_human or ctx.escalate
        reason = prepared.human_reason or ctx.escalation_reason
        outcome: pipeline.Outcome
        if ctx.reply is not None:
            outcome = pipeline.Outcome(ctx.reply, handled_by, escalated=escalated, escalation_reason=reason)
        elif escalated:
            outcome = pipeline.Outcome(HANDOFF_NOTICE, "handoff", escalated=True, escalation_reason=reason)
        elif prepared.clarify:
            from intents.rules import clarifying_question

            outcome = pipeline.Outcome(clarifying_question(ctx.classification, prepared.by_name), "clarify")
        else:
            gate = self._confidence_gate(prepared, ctx, on_text)
            outcome = await self._llm_reply(prepared, ctx, gate.feed if gate is not None else on_text)
            if gate is not None:
                await gate.close()
            streamed = on_text is not None and (gate is None or gate.opened)
            outcome = await self._judge_reply(prepared, outcome, streamed=streamed)
            if on_text is not None and not streamed:
                await on_text(outcome.text)  # judged whole: the reply (or what replaces it) in one piece
        outcome.offline = self.offline
        if self.offline and not outcome.text.startswith(OFFLINE_PREFIX):
            outcome.text = OFFLINE_PREFIX + outcome.text
        for mw in reversed(self.middleware):
            after = getattr(mw, "after_turn", None)
            if after is not None:
                outcome.text = await after(ctx, outcome.text)
        return outcome

    async def _run_handler(self, ctx: TurnContext) -> None:
        assert ctx.intent is not None
        result = await self.handlers[ctx.intent](ctx)
        if isinstance(result, str):
            ctx.reply = result
        elif isinstance(result, HandlerResult):
            if result.system_addition:
                ctx.system_additions.append(result.system_addition)
            if result.reply is not None:
                ctx.reply = result.reply
            if result.escalate:
                ctx.escalate = True
                ctx.escalation_reason = result.reason or f"handler for {ctx.intent} asked for a human"
        elif result is not None:
            raise TypeError(
                f"handler for {ctx.intent} returned {type(result).__name__}; expected str, HandlerResult or None"
            )

    def system_prompt(self, prepared: pipeline.Prepared, ctx: TurnContext) -> str:
        parts = [self.config.llm_config.system_prompt]
        if prepared.category is not None and prepared.category.system_prompt:
            parts.append(prepared.category.system_prompt)
        if ctx.intent:
            parts.append(f"The user's request was classified as {ctx.intent}.")
        if ctx.thread_event == "RESOLUTION":
            parts.append("The user says their issue is resolved: acknowledge it briefly.")
        if ctx.thread_summary:
            parts.append("Earlier in this conversation thread (summary):\n" + ctx.thread_summary)
        if ctx.memories:
            from memory.reference import memories_reference_block  # quoted data, never instructions

            parts.append(memories_reference_block(ctx.memories))
        if self._wants_self_assessment(prepared):
            from intents.rules import SELF_ASSESSMENT_INSTRUCTION

            parts.append(SELF_ASSESSMENT_INSTRUCTION)
        parts.extend(ctx.system_additions)
        return "\n\n".join(parts)

    def _confidence_gate(
        self, prepared: pipeline.Prepared, ctx: TurnContext, on_text: TextCallback | None
    ) -> _ConfidenceGate | None:
        """A gate on the stream when the Confidence Evaluator will judge this reply (None otherwise)."""
        from intents.rules import reply_confidence

        if on_text is None or prepared.category is None or ctx.thread_event == "RESOLUTION":
            return None
        retrieval = max((m["similarity"] for m in ctx.memories), default=None)

        def decide(self_assessment: float | None) -> bool:
            score, _ = reply_confidence(
                classification=ctx.confidence, self_assessment=self_assessment, retrieval=retrieval
            )
            return score >= prepared.threshold

        return _ConfidenceGate(on_text, decide)

    def _wants_self_assessment(self, prepared: pipeline.Prepared) -> bool:
        ctx = prepared.ctx
        return (
            not self.offline
            and self.config.confidence_config.llm_self_assessment
            and prepared.category is not None
            and ctx is not None
            and ctx.thread_event != "RESOLUTION"
        )

    async def _judge_reply(
        self, prepared: pipeline.Prepared, outcome: pipeline.Outcome, *, streamed: bool
    ) -> pipeline.Outcome:
        """The Confidence Evaluator: score the reply; below the threshold, a human or a question instead.

        A streamed reply has already reached the user, so it is scored but never withheld.
        """
        from intents.rules import clarifying_question, reply_confidence, split_self_assessment

        ctx = prepared.ctx
        assert ctx is not None
        outcome.text, self_assessment = split_self_assessment(outcome.text)
        if prepared.category is None or ctx.thread_event == "RESOLUTION":
            return outcome
        retrieval = max((m["similarity"] for m in ctx.memories), default=None)
        score, parts = reply_confidence(
            classification=ctx.confidence, self_assessment=self_assessment, retrieval=retrieval
        )
        outcome.confidence, outcome.confidence_parts = score, parts
        if streamed or score >= prepared.threshold:
            return outcome
        draft = outcome.text
        reason = f"reply confidence {score:.2f} below the {ctx.intent} threshold {prepared.threshold:.2f}"
        if prepared.category.on_low_confidence == "clarify":
            outcome.text, outcome.handled_by = (
                clarifying_question(ctx.classification, prepared.by_name),
                "clarify",
            )
        else:
            outcome.text, outcome.handled_by, outcome.escalated = HANDOFF_NOTICE, "handoff", True
            outcome.escalation_reason = f"{reason}; withheld draft: {draft[:300]}"
        outcome.confidence_parts = {**parts, "withheld": 1.0}
        return outcome

    async def _llm_reply(
        self, prepared: pipeline.Prepared, ctx: TurnContext, on_text: TextCallback | None
    ) -> pipeline.Outcome:
        cfg = self.config.llm_config
        messages: list[dict[str, Any]] = [*ctx.history, {"role": "user", "content": ctx.message}]
        if messages[0]["role"] != "user":
            messages = messages[1:]
        tools, missing = (None, None)
        if self.tools is not None and not self.offline:
            tools, missing = await tools_or_unavailable(self.tools)  # unreachable: the turn runs without
        system = self.system_prompt(prepared, ctx)
        usage = {"input_tokens": 0, "output_tokens": 0}
        calls: list[dict[str, Any]] = [missing] if missing is not None else []
        texts: list[str] = []  # the text of every round: what a streaming client was shown
        llm_ms = 0.0
        for round_ in range(cfg.max_tool_rounds + 1):
            reply = await self.llm.generate(
                system=system, messages=messages, config=cfg, tools=tools, on_text=on_text
            )
            texts.append(reply.text)
            llm_ms += reply.latency_ms
            usage["input_tokens"] += reply.usage.get("input_tokens", 0)
            usage["output_tokens"] += reply.usage.get("output_tokens", 0)
            if reply.stop_reason != "tool_use" or not reply.tool_calls or self.tools is None:
                break
            if round_ == cfg.max_tool_rounds:
                break
            messages.append({"role": "assistant", "content": reply.content})
            results = []
            for call in reply.tool_calls:
                with turn_scope(ctx):  # a tool that records what it did knows whose turn it was
                    text, is_error = await self.tools.call_tool(call["name"], call.get("input") or {})
                calls.append({"name": call["name"], "input": call.get("input") or {}, "is_error": is_error})
                results.append(
                    {"type": "tool_result", "tool_use_id": call["id"], "content": text, "is_error": is_error}
                )
            messages.append({"role": "user", "content": results})
        text = "".join(texts)
        if not text.strip():
            # The model ended on a tool call (max_tool_rounds reached) or said nothing. An empty reply
            # would reach the user as a blank bubble and be rejected as history on the thread's next turn.
            text = NO_ANSWER_NOTICE
            if on_text is not None:
                await on_text(text)
        return pipeline.Outcome(
            text=text,
            handled_by="offline" if reply.offline else "llm",
            model=reply.model,
            usage=usage,
            # Offline, no model ran: no latency to record (None, not a 0.0 that would skew the figures).
            llm_latency_ms=None if reply.offline else round(llm_ms, 2),
            tool_calls=calls,
        )


class _ConfidenceGate:
    """Streams a reply the Confidence Evaluator scores, only once it is known not to be withheld.

    The model is asked to write its ``<confidence>`` tag first. The gate holds the stream until
    that tag is read (or plainly absent), scores the reply with ``decide`` and then either opens
    (the tag is dropped and the text flows on) or stays shut (the reply may be withheld: it is
    judged whole afterwards). An open gate still holds back a trailing tag and drops it.
    """

    PROBE_CHARS = 64  # no tag within this much text: the model gave none up front

    def __init__(self, send: TextCallback, decide: Callable[[float | None], bool]) -> None:
        self._send, self._decide = send, decide
        self._pending = ""
        self.state = "deciding"  # then "open" or "shut"

    @property
    def opened(self) -> bool:
        return self.state == "open"

    async def feed(self, delta: str) -> None:
        self._pending += delta
        if self.state == "deciding":
            self._try_decide(final=False)
        if self.state == "open":
            await self._flow()

    def _try_decide(self, *, final: bool) -> None:
        from intents.rules import LEADING_SELF_ASSESSMENT

        head = self._pending.lstrip()
        match = LEADING_SELF_ASSESSMENT.match(self._pending)
        if match is not None and (final or len(self._pending) > match.end()):
            value: float | None = min(1.0, float(match.group(1)))
            self._pending = self._pending[match.end() :]
        elif final or len(head) > self.PROBE_CHARS or not "<confidence>".startswith(head[:12].lower()):
            value = None  # no leading tag: score on what is known (a trailing tag counts in the judgement)
        else:
            return
        self.state = "open" if self._decide(value) else "shut"

    async def _flow(self) -> None:
        cut = self._pending.find("<")
        safe = (self._pending if cut < 0 else self._pending[:cut]).rstrip()  # whitespace may precede a tag
        if safe:
            await self._send(safe)
            self._pending = self._pending[len(safe) :]
        if len(self._pending) > self.PROBE_CHARS and not self._pending.lower().startswith("<confidence"):
            await self._send(self._pending)  # a "<" that opens no tag
            self._pending = ""

    async def close(self) -> None:
        from intents.rules import split_self_assessment

        if self.state == "deciding":
            self._try_decide(final=True)
        if self.state == "open":
            rest, _ = split_self_assessment(self._pending)
            if rest:
                await self._send(rest)
        self._pending = ""


def _db(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a coroutine function on the process's database threads (``loops.shared_db_executor``):
    concurrent in-process turns do not queue behind ``sync_to_async``'s one thread-sensitive thread;
    the thread gives its pooled connection back after the call (``loops.releasing``)."""
    if sync_caller_waits():  # a sync caller's thread (and transaction), or a request's context
        return sync_to_async(fn)
    return sync_to_async(releasing(fn), thread_sensitive=False, executor=shared_db_executor())


def _awaitable(callback: Callable[[str], Any] | None) -> TextCallback | None:
    """``on_text`` as the runner wants it: a plain function is called inline, an async one awaited."""
    if callback is None or inspect.iscoroutinefunction(callback):
        return callback

    async def call(text: str) -> None:
        callback(text)

    return call
