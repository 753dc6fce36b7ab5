"""Structured logs: JSON off a terminal, job and trace ids on every line,
prompts and secrets redacted by a processor rather than by call-site care."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

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
        """Hide every hidden key, at the top level of the event."""
        for key in self.hidden.intersection(event_dict):
            event_dict[key] = REDACTED
        return event_dict


def configure(level: str = "info", *, log_prompts: bool = False, json: bool | None = None) -> None:
    """Set up structlog for this process (call once, at start-up)."""
    as_json = not sys.stderr.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            Redactor(log_prompts),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
