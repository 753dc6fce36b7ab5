"""The response headers Anthropic sends: request id, organization, rate-limit state, retry hints."""

from __future__ import annotations

import math
import time

from modelyard.fake.limits import RateLimits

ORGANIZATION_ID = "1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed"


def common(request_id: str, limits: RateLimits) -> dict[str, str]:
    """Headers every answer carries, errors included; resets are RFC 3339 times."""
    now = time.time()
    return {
        "request-id": request_id,
        "anthropic-organization-id": ORGANIZATION_ID,
        "anthropic-ratelimit-requests-limit": str(limits.requests.limit),
        "anthropic-ratelimit-requests-remaining": str(limits.requests.remaining()),
        "anthropic-ratelimit-requests-reset": _rfc3339(now + limits.requests.reset_s()),
        "anthropic-ratelimit-tokens-limit": str(limits.tokens.limit),
        "anthropic-ratelimit-tokens-remaining": str(limits.tokens.remaining()),
        "anthropic-ratelimit-tokens-reset": _rfc3339(now + limits.tokens.reset_s()),
    }


def retry_after(seconds: float) -> dict[str, str]:
    """``retry-after`` in whole seconds, and no requests left until then."""
    return {
        "retry-after": str(math.ceil(seconds)),
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": _rfc3339(time.time() + seconds),
    }


def _rfc3339(at: float) -> str:
    """A UTC time the way Anthropic writes it: 2025-01-01T00:00:07Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(at)))
