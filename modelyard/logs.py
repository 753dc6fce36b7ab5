"""Structured logs: JSON off a terminal, job and trace ids on every line,
prompts and secrets redacted by a processor rather than by call-site care.

Standard-library records from asyncpg, aio-pika, asyncio and aiohttp go
through the same processors, so the stream stays one event per line."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.typing import Processor

from schemas.jobs import KEY_REDACTED, VIRTUAL_KEY

REDACTED = "[redacted]"

# Conversation text: hidden unless the config's `log_prompts` policy allows it.
PROMPT_KEYS = frozenset({"messages", "prompt", "content", "completion", "response", "body"})
# Credentials: always hidden, whatever the policy says.
SECRET_KEYS = frozenset({"api_key", "authorization", "x-api-key", "api-key", "password", "headers"})


class Redactor:
    """A structlog processor that replaces sensitive values before rendering."""

    def __init__(self, log_prompts: bool) -> None:
        self.hidden = SECRET_KEYS if log_prompts else SECRET_KEYS | PROMPT_KEYS

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Hide every hidden key, at the top level of the event, and any
        virtual key inside a text value (an error echoing a request, say)."""
        for key in self.hidden.intersection(event_dict):
            event_dict[key] = REDACTED
        for key, value in event_dict.items():
            if isinstance(value, str) and "my-" in value:
                event_dict[key] = VIRTUAL_KEY.sub(KEY_REDACTED, value)
        return event_dict


def configure(level: str = "info", *, log_prompts: bool = False, json: bool | None = None) -> None:
    """Set up logging for this process (call once, at start-up).

    structlog events and standard-library records (asyncpg, aio-pika, asyncio,
    aiohttp) leave through one handler on stderr with the same processors, so
    every line is one rendered event and every record is redacted.
    """
    as_json = not sys.stderr.isatty() if json is None else json
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared = _shared_processors(as_json=as_json, log_prompts=log_prompts)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # A foreign record's `extra=` becomes event keys first, so the Redactor sees them.
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _renderer(as_json)],
    )
    _route_root_logger(formatter, numeric_level)
    # `warnings.warn` output would otherwise be raw text lines in the stream.
    logging.captureWarnings(True)


def _shared_processors(*, as_json: bool, log_prompts: bool) -> list[Processor]:
    """Processors every event runs, whether structlog or the standard library emitted it."""
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if as_json:
        # The traceback becomes the `exception` string field of the one JSON object;
        # on a terminal the console renderer prints it pretty from `exc_info` instead.
        processors.append(structlog.processors.format_exc_info)
    # Last, so nothing added above escapes it.
    processors.append(Redactor(log_prompts))
    return processors


def _renderer(as_json: bool) -> Processor:
    if as_json:
        return structlog.processors.JSONRenderer()
    # Tracebacks without local variables: a frame's locals can hold keys and prompts,
    # which the Redactor never sees.
    return structlog.dev.ConsoleRenderer(
        exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
    )


def _route_root_logger(formatter: logging.Formatter, level: int) -> None:
    """Make `formatter` on stderr the root logger's only handler.

    Handlers set up earlier (by `basicConfig` or a library) are dropped, not
    closed: they would print each record a second time, as plain text.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
