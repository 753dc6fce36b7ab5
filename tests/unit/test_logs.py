"""Logs stay one JSON object per line whatever emitted them: structlog, or a
library logging through the standard library (asyncpg, aio-pika, asyncio).

The tests share one run of a fresh interpreter: `configure` changes process-wide
state (the root logger, structlog's defaults) that other tests must not see.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from modelyard.logs import REDACTED

EMIT = """
import logging
import warnings

import structlog

from modelyard import logs

logging.basicConfig()  # a handler set up earlier must not print records a second time
logs.configure("info", json=True)

try:
    raise ConnectionResetError("pool lost its socket")
except ConnectionResetError:
    logging.getLogger("asyncpg").error(
        "connection failed", exc_info=True, extra={"api_key": "sk-123", "host": "db"}
    )
logging.getLogger("x").warning("hi %s", "there")
logging.getLogger("x").debug("below the level")

log = structlog.get_logger("modelyard.worker")
log.debug("below the level")
with structlog.contextvars.bound_contextvars(job_id="j1"):
    try:
        raise ValueError("provider said no")
    except ValueError:
        log.exception("job failed", api_key="sk-123")

warnings.warn("deprecated thing", UserWarning, stacklevel=1)
"""


Emitted = tuple[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def emitted() -> Emitted:
    """Run EMIT once in a fresh interpreter: its raw stderr and each line parsed."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EMIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done.stderr, [json.loads(line) for line in lines]


def by_event(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (event,) = [e for e in events if e["event"] == name]
    return event


def test_every_line_is_one_json_object_and_nothing_is_printed_twice(emitted: Emitted) -> None:
    _, events = emitted

    assert [e["event"] for e in events[:3]] == ["connection failed", "hi there", "job failed"]
    assert len(events) == 4
    assert "deprecated thing" in events[3]["event"]


def test_stdlib_record_carries_level_logger_time_and_formatted_message(emitted: Emitted) -> None:
    _, events = emitted
    event = by_event(events, "hi there")

    assert {k: event[k] for k in ("level", "logger")} == {"level": "warning", "logger": "x"}
    assert event["timestamp"].endswith("Z")


def test_stdlib_traceback_is_a_field_of_the_json_object(emitted: Emitted) -> None:
    _, events = emitted
    event = by_event(events, "connection failed")

    assert (event["level"], event["logger"], event["host"]) == ("error", "asyncpg", "db")
    assert "Traceback (most recent call last)" in event["exception"]
    assert "ConnectionResetError: pool lost its socket" in event["exception"]


def test_structlog_exception_is_a_field_with_context_and_logger_name(emitted: Emitted) -> None:
    _, events = emitted
    event = by_event(events, "job failed")

    assert (event["level"], event["logger"], event["job_id"]) == (
        "error",
        "modelyard.worker",
        "j1",
    )
    assert "ValueError: provider said no" in event["exception"]


def test_secrets_are_redacted_on_both_paths(emitted: Emitted) -> None:
    stderr, events = emitted

    assert by_event(events, "connection failed")["api_key"] == REDACTED
    assert by_event(events, "job failed")["api_key"] == REDACTED
    assert "sk-123" not in stderr
