"""The log of answered requests that tests read through ``/_fake/requests``.

A 200 answer is a billed call, so tests count calls (and tokens) here. An
entry is written when the exchange ends, whatever way it ends: answered,
failed, or abandoned by the client.
"""

from __future__ import annotations

import time
from collections import deque

import msgspec

from modelyard.fake.conversation import Reply
from modelyard.fake.settings import Fault

CLIENT_CLOSED = 499
"""Status logged when the client went away before any response was sent (nginx's code)."""

_LIMIT = 100_000  # enough for any test; a long benchmark keeps only the latest entries


class LogEntry(msgspec.Struct, frozen=True):
    """One exchange as the client saw it; status is the HTTP status sent.

    Token counts are normalized whatever the wire format: prompt_tokens include
    cached_tokens (read) and cache_write_tokens (written), completion_tokens
    include reasoning_tokens.
    """

    request_id: str
    provider: str
    path: str
    model: str | None
    status: int
    fault: Fault | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    stream: bool
    at: float  # when the exchange ended
    cache_write_tokens: int = 0
    # Which conversation was asked (a digest of its turns): tests count how
    # often the same prompt reached the provider.
    prompt_digest: str = ""
    # When the request arrived: what a provider's own rate limits count.
    received_at: float = 0.0


class Exchange:
    """What is known so far about one request, filled in as its handler goes."""

    __slots__ = (
        "fault",
        "model",
        "path",
        "prompt_digest",
        "provider",
        "received_at",
        "reply",
        "request_id",
        "status",
        "stream",
    )

    def __init__(self, request_id: str, provider: str, path: str) -> None:
        self.request_id = request_id
        self.provider = provider
        self.path = path
        self.model: str | None = None
        self.status = CLIENT_CLOSED
        self.fault: Fault | None = None
        self.stream = False
        self.reply: Reply | None = None
        self.prompt_digest = ""
        self.received_at = time.time()

    def entry(self) -> LogEntry:
        """The log entry for the exchange as it stands now."""
        reply = self.reply
        return LogEntry(
            request_id=self.request_id,
            provider=self.provider,
            path=self.path,
            model=self.model,
            status=self.status,
            fault=self.fault,
            prompt_tokens=reply.prompt_tokens if reply else 0,
            completion_tokens=reply.completion_tokens if reply else 0,
            cached_tokens=reply.cached_tokens if reply else 0,
            reasoning_tokens=reply.reasoning_tokens if reply else 0,
            stream=self.stream,
            at=time.time(),
            cache_write_tokens=reply.cache_write_tokens if reply else 0,
            prompt_digest=self.prompt_digest,
            received_at=self.received_at,
        )


class RequestLog:
    """The latest entries, oldest first, bounded so a long benchmark cannot exhaust memory."""

    def __init__(self, limit: int = _LIMIT) -> None:
        self._entries: deque[LogEntry] = deque(maxlen=limit)

    def record(self, entry: LogEntry) -> None:
        """Append entry, dropping the oldest past the limit."""
        self._entries.append(entry)

    def entries(self) -> list[LogEntry]:
        """A snapshot of the entries, oldest first."""
        return list(self._entries)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
