"""The response headers OpenAI sends: request id, timing, rate-limit state, retry hints."""

from __future__ import annotations

import math

from modelyard.fake.limits import RateLimits

VERSION = "2020-10-01"


def common(request_id: str, processing_ms: int, limits: RateLimits) -> dict[str, str]:
    """Headers every answer carries, errors included."""
    return {
        "x-request-id": request_id,
        "openai-processing-ms": str(processing_ms),
        "openai-version": VERSION,
        "x-ratelimit-limit-requests": str(limits.requests.limit),
        "x-ratelimit-limit-tokens": str(limits.tokens.limit),
        "x-ratelimit-remaining-requests": str(limits.requests.remaining()),
        "x-ratelimit-remaining-tokens": str(limits.tokens.remaining()),
        "x-ratelimit-reset-requests": format_duration(limits.requests.reset_s()),
        "x-ratelimit-reset-tokens": format_duration(limits.tokens.reset_s()),
    }


def retry_after(seconds: float) -> dict[str, str]:
    """``retry-after`` in whole seconds (as HTTP wants) and ``retry-after-ms`` exactly."""
    return {"retry-after": str(math.ceil(seconds)), "retry-after-ms": str(round(seconds * 1000))}


def format_duration(seconds: float) -> str:
    """A duration the way OpenAI writes it: 0s, 6ms, 1.5s, 2m3s."""
    if seconds < 0.0005:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{text}" if minutes else text
