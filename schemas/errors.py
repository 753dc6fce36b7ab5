"""One error taxonomy for every failure a job can meet.

Errors are values, not exceptions on the wire: a result carries a `JobError`
whose `kind` says what happened and whose `retryable` flag says whether trying
again (later, or on another deployment) can help. Adapters map each provider's
statuses and bodies into this taxonomy; nothing downstream inspects provider
specifics.
"""

from __future__ import annotations

import enum

import msgspec


class ErrorKind(enum.StrEnum):
    """What went wrong, independent of which provider it happened at."""

    INVALID_JOB = "invalid_job"
    UNKNOWN_MODEL = "unknown_model"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    CONTEXT_WINDOW_EXCEEDED = "context_window_exceeded"
    CONTENT_POLICY = "content_policy"
    AUTH = "auth"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    SERVER_ERROR = "server_error"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    # Refused at admission: each says what a person can do about it.
    UNAUTHORIZED = "unauthorized"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    MODEL_NOT_APPROVED = "model_not_approved"
    BUDGET_EXCEEDED = "budget_exceeded"


# Whether a kind is worth retrying by default. A single error may override it
# (OpenAI's `insufficient_quota` is a 429 that no amount of waiting fixes).
RETRYABLE: dict[ErrorKind, bool] = {
    ErrorKind.INVALID_JOB: False,
    ErrorKind.UNKNOWN_MODEL: False,
    ErrorKind.RATE_LIMITED: True,
    ErrorKind.OVERLOADED: True,
    ErrorKind.TIMEOUT: True,
    ErrorKind.CONTEXT_WINDOW_EXCEEDED: False,
    ErrorKind.CONTENT_POLICY: False,
    ErrorKind.AUTH: False,
    ErrorKind.BAD_REQUEST: False,
    ErrorKind.NOT_FOUND: False,
    ErrorKind.SERVER_ERROR: True,
    ErrorKind.DEADLINE_EXCEEDED: False,
    ErrorKind.UNAUTHORIZED: False,
    ErrorKind.MODEL_NOT_ALLOWED: False,
    ErrorKind.MODEL_NOT_APPROVED: False,
    ErrorKind.BUDGET_EXCEEDED: False,
}


class JobError(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A typed failure, safe to show to the producer.

    `message` never contains provider credentials; `field` names the offending
    part of the job (a JSON path such as `$.request.messages[0].role`) when the
    job itself was at fault.
    """

    kind: ErrorKind
    message: str
    retryable: bool
    field: str | None = None
    provider_status: int | None = None
    provider_code: str | None = None
    retry_after_s: float | None = None


def job_error(
    kind: ErrorKind,
    message: str,
    *,
    retryable: bool | None = None,
    field: str | None = None,
    provider_status: int | None = None,
    provider_code: str | None = None,
    retry_after_s: float | None = None,
) -> JobError:
    """Build a `JobError`, taking the kind's default retryability unless told."""
    return JobError(
        kind=kind,
        message=message,
        retryable=RETRYABLE[kind] if retryable is None else retryable,
        field=field,
        provider_status=provider_status,
        provider_code=provider_code,
        retry_after_s=retry_after_s,
    )
