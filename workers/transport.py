"""The one thin HTTP call behind every adapter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from schemas.errors import ErrorKind, JobError, job_error
from workers.providers.base import HttpRequest, HttpResponse


def new_session(concurrency: int) -> aiohttp.ClientSession:
    """A pooled session sized to the worker's concurrency."""
    connector = aiohttp.TCPConnector(
        limit=concurrency, limit_per_host=concurrency, ttl_dns_cache=300
    )
    return aiohttp.ClientSession(connector=connector, auto_decompress=True)


async def send(
    session: aiohttp.ClientSession, request: HttpRequest, timeout_s: float
) -> HttpResponse | JobError:
    """Make the call; network failures come back as typed, retryable errors."""
    try:
        async with session.request(
            request.method,
            request.url,
            data=request.body,
            headers=request.headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            body = await response.read()
            headers = {k.lower(): v for k, v in response.headers.items()}
            return HttpResponse(status=response.status, headers=headers, body=body)
    except TimeoutError:
        return job_error(ErrorKind.TIMEOUT, f"provider did not answer within {timeout_s:g}s")
    except aiohttp.ClientError as exc:
        # Connection refused/reset, DNS, TLS: the provider was not reached or
        # dropped us; another try (or another deployment) may well work.
        return job_error(
            ErrorKind.SERVER_ERROR, f"provider unreachable: {type(exc).__name__}: {exc}"
        )


class EventStream:
    """An open streamed response: its headers and its SSE events, in order.

    A read that fails midway ends the events and leaves the typed error in
    `error`, for the worker to report after what did arrive."""

    def __init__(self, response: aiohttp.ClientResponse, idle_timeout_s: float) -> None:
        self.headers = {k.lower(): v for k, v in response.headers.items()}
        self.error: JobError | None = None
        self._response = response
        self._idle_timeout_s = idle_timeout_s

    async def events(self) -> AsyncIterator[tuple[str | None, str]]:
        """`(event name, data)` per SSE event; comments and ids are skipped."""
        event: str | None = None
        data: list[str] = []
        try:
            async for raw in self._response.content:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if data:
                        yield event, "\n".join(data)
                    event, data = None, []
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif line.startswith("event:"):
                    event = line[6:].strip()
        except TimeoutError:
            self.error = job_error(
                ErrorKind.TIMEOUT, f"provider went quiet for {self._idle_timeout_s:g}s"
            )
        except aiohttp.ClientError as exc:
            self.error = job_error(
                ErrorKind.SERVER_ERROR, f"stream broke off: {type(exc).__name__}"
            )
        if data and self.error is None:  # a last event without its blank line
            yield event, "\n".join(data)


async def _whole(response: aiohttp.ClientResponse, timeout_s: float) -> HttpResponse | JobError:
    """A non-200 answer to a streamed call, read whole (it is a short error body)."""
    try:
        body = await response.read()
    except TimeoutError:
        return job_error(ErrorKind.TIMEOUT, f"provider error body not read within {timeout_s:g}s")
    except aiohttp.ClientError as exc:
        return job_error(ErrorKind.SERVER_ERROR, f"provider error body lost: {type(exc).__name__}")
    headers = {k.lower(): v for k, v in response.headers.items()}
    return HttpResponse(status=response.status, headers=headers, body=body)


@asynccontextmanager
async def open_stream(
    session: aiohttp.ClientSession, request: HttpRequest, idle_timeout_s: float
) -> AsyncIterator[EventStream | HttpResponse | JobError]:
    """Start a streamed call. Yields the event stream for a 200, the whole
    response for any other status, or a typed error if the call failed.

    The timeout applies between reads, not to the whole answer: a long
    answer that keeps arriving is fine, a provider that goes quiet is not.
    """
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=idle_timeout_s, sock_read=idle_timeout_s
    )
    try:
        response = await session.request(
            request.method, request.url, data=request.body, headers=request.headers, timeout=timeout
        )
    except TimeoutError:
        yield job_error(ErrorKind.TIMEOUT, f"provider did not answer within {idle_timeout_s:g}s")
        return
    except aiohttp.ClientError as exc:
        yield job_error(
            ErrorKind.SERVER_ERROR, f"provider unreachable: {type(exc).__name__}: {exc}"
        )
        return
    try:
        if response.status == 200:
            yield EventStream(response, idle_timeout_s)
        else:
            yield await _whole(response, idle_timeout_s)
    finally:
        response.release()
