"""The one thin HTTP call behind every adapter."""

from __future__ import annotations

import aiohttp

from schemas.errors import ErrorKind, JobError, job_error
from workers.providers.base import HttpRequest, HttpResponse


def new_session(concurrency: int) -> aiohttp.ClientSession:
    """A pooled session sized to the worker's concurrency."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, ttl_dns_cache=300)
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
        return job_error(ErrorKind.SERVER_ERROR, f"provider unreachable: {type(exc).__name__}: {exc}")
