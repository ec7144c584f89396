"""Structured logs: a real turn's JSON log line, its ids, and no message text unless configured."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import AsyncClient

from agentflow.logs import JsonFormatter, logging_config
from agentflow.testing.fake_anthropic import FakeReply
from conversations.models import Message
from tests.test_settings_env import BASE_DIR, manage_check

SECRET = "my card number is 4111 and my name is Zed"


@pytest.fixture
def json_lines() -> Iterator[Any]:
    """The ``agentflow`` loggers' records, formatted as the JSON format would write them."""

    class Capture:
        def __init__(self) -> None:
            self.stream = io.StringIO()
            self.handler = logging.StreamHandler(self.stream)
            self.handler.setFormatter(JsonFormatter())

        def lines(self) -> list[dict[str, Any]]:
            return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]

    capture = Capture()
    logger = logging.getLogger("agentflow")
    logger.addHandler(capture.handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield capture
    logger.removeHandler(capture.handler)
    logger.setLevel(level)


async def _turn(client: AsyncClient, api_key: str, **headers: str) -> Any:
    response = await client.post(
        "/api/users/log-alice/messages",
        {"message": SECRET},
        content_type="application/json",
        headers={"X-API-Key": api_key, **headers},
    )
    assert response.status_code == 200, response.content
    return response


@pytest.mark.django_db(transaction=True)
@pytest.mark.integration
async def test_a_turn_logs_one_json_line_with_its_ids_and_no_message_text(
    celery_worker, api_key, fake_llm, json_lines
):
    fake_llm.enqueue(FakeReply(text="Your reply, with private words in it."))
    response = await _turn(AsyncClient(), api_key, **{"X-Request-ID": "req-abc.123"})
    body = response.json()
    assert response["X-Request-ID"] == "req-abc.123"

    turns = [line for line in json_lines.lines() if line["event"].startswith("turn ")]
    assert len(turns) == 1
    line = turns[0]
    user_message = await Message.objects.aget(pk=body["message_id"])
    fields = ("level", "logger", "agent", "message_id", "user_id", "session_id", "thread_id")
    assert {k: line[k] for k in fields} == {
        "level": "info",
        "logger": "agentflow.turn",
        "agent": "agentflow",
        "message_id": body["message_id"],
        "user_id": "log-alice",
        "session_id": str(user_message.session_id),
        "thread_id": body["thread_id"],
    }
    assert (line["request_id"], line["task"]) == ("req-abc.123", "agentflow.process_turn")
    assert len(line["task_id"]) == 36
    assert (line["thread_event"], line["handled_by"], line["escalated"]) == ("NEW_TOPIC", "llm", False)
    assert (line["input_tokens"], line["output_tokens"]) == (
        body["usage"]["input_tokens"],
        body["usage"]["output_tokens"],
    )
    assert line["timestamp"].endswith("Z")
    raw = json.dumps(turns)
    assert "text" not in line and "reply" not in line
    assert "4111" not in raw and "Zed" not in raw and "private words" not in raw


@pytest.mark.django_db(transaction=True)
@pytest.mark.integration
async def test_message_text_is_logged_only_when_the_setting_says_so(
    celery_worker, api_key, fake_llm, json_lines, settings
):
    settings.AGENTFLOW = {**settings.AGENTFLOW, "LOGS": {"FORMAT": "json", "MESSAGE_TEXT": True}}
    json_lines.handler.setFormatter(JsonFormatter(message_text=True))
    fake_llm.enqueue(FakeReply(text="Here it is."))
    response = await _turn(AsyncClient(), api_key, **{"X-Request-ID": "x" * 65})  # too long: replaced
    request_id = response["X-Request-ID"]
    assert len(request_id) == 32 and request_id != "x" * 65
    (line,) = [line for line in json_lines.lines() if line["event"].startswith("turn ")]
    assert (line["text"], line["reply"], line["request_id"]) == (SECRET, "Here it is.", request_id)


def test_the_formatter_drops_text_fields_unless_asked() -> None:
    record = logging.LogRecord("agentflow.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.text = "private"
    record.reply = "private too"
    record.kept = 7
    plain = json.loads(JsonFormatter().format(record))
    assert (plain["event"], plain["kept"], "text" in plain, "reply" in plain) == (
        "hello world",
        7,
        False,
        False,
    )
    full = json.loads(JsonFormatter(message_text=True).format(record))
    assert (full["text"], full["reply"]) == ("private", "private too")


def test_logging_config_is_valid_for_both_formats_and_refuses_others() -> None:
    for fmt in ("text", "json"):
        config = logging_config(format=fmt)  # type: ignore[arg-type]
        logging.config.dictConfig(config)  # what Django does with LOGGING
        assert config["handlers"]["console"]["formatter"] == fmt
    with pytest.raises(ValueError, match="'text' or 'json'"):
        logging_config(format="xml")  # type: ignore[arg-type]
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)  # put the suite's own configuration back


def test_celerys_task_lines_are_off_unless_asked_for_and_its_errors_stay() -> None:
    try:
        for task_lines in (False, True):
            logging.config.dictConfig(logging_config(task_lines=task_lines))
            for name in ("celery.app.trace", "celery.worker.strategy"):  # "succeeded", "received"
                assert logging.getLogger(name).isEnabledFor(logging.INFO) is task_lines
                assert logging.getLogger(name).isEnabledFor(logging.ERROR)  # a task that raised
            assert logging.getLogger("celery.worker.consumer").isEnabledFor(logging.INFO)  # start-up lines
            assert logging.getLogger("agentflow.turn").isEnabledFor(logging.INFO)  # the turn's own line
    finally:
        from django.conf import settings

        logging.config.dictConfig(settings.LOGGING)


@pytest.mark.parametrize(("value", "levels"), [(None, {"WARNING"}), ("true", set())])
def test_agentflow_log_task_lines_sets_celerys_task_loggers(value: str | None, levels: set[str]) -> None:
    env = {**os.environ, "AGENTFLOW_SKIP_DOTENV": "1", "DJANGO_SETTINGS_MODULE": "agentflow_project.settings"}
    env.pop("AGENTFLOW_LOG_TASK_LINES", None)
    if value is not None:
        env["AGENTFLOW_LOG_TASK_LINES"] = value
    code = (
        "import json, agentflow_project.settings as s; loggers = s.LOGGING['loggers'];"
        "print(json.dumps([loggers.get(n, {}).get('level') for n in ('celery.app.trace', 'celery.worker.strategy')]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) - {None} == levels


@pytest.mark.parametrize("value", ["xml", "JSONL"])
def test_a_bad_log_format_stops_the_project_at_start(value: str) -> None:
    result = manage_check(AGENTFLOW_LOG_FORMAT=value)
    assert result.returncode != 0
    assert "AGENTFLOW_LOG_FORMAT must be text or json" in result.stderr


def test_json_log_format_starts_the_project() -> None:
    result = manage_check(AGENTFLOW_LOG_FORMAT="json")
    assert result.returncode == 0, result.stderr
