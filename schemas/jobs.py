"""The completion job: what a producer publishes and every component passes on.

Schema evolution follows msgspec's rules: new fields get defaults, nothing is
renamed or reordered, and `v` is bumped only for a change old readers cannot
ignore.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from schemas.chat import ChatRequest, Int64
from schemas.errors import ErrorKind

JOB_VERSION = 1

Lane = Literal["interactive", "batch"]

# The AMQP `type` of a message holding a `JobBatch` rather than one job.
JOB_BATCH_TYPE = "modelyard.job-batch"

# `\Z`, not `$`: Python's `$` also matches before a trailing newline.
JobId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+\Z")]

# `reply_to` becomes an AMQP short string (a property, a routing key), which
# holds at most 255 bytes. Printable ASCII without spaces makes characters
# and bytes the same, so the length limit is a byte limit; server-named
# queues (`amq.gen-AbC_d-9w==`) fit it.
MAX_REPLY_TO_BYTES = 255
ReplyTo = Annotated[str, Meta(min_length=1, max_length=MAX_REPLY_TO_BYTES, pattern=r"^[!-~]+\Z")]

# Metadata and key ids land in Postgres `text` columns on every cost row,
# and Postgres refuses the NUL character in text. The lengths keep one
# producer from bloating the ledger; they are far above any real label.
MAX_LABEL_CHARS = 256
MAX_CUSTOM_ID_CHARS = 512
MAX_TAGS = 64
_NO_NUL = r"^[^\x00]*$"
Label = Annotated[str, Meta(max_length=MAX_LABEL_CHARS, pattern=_NO_NUL)]
CustomId = Annotated[str, Meta(max_length=MAX_CUSTOM_ID_CHARS, pattern=_NO_NUL)]


# A virtual key's shape (`my-` and 32 URL-safe characters, made by
# `router/keys.py`): wherever a message or a log line might carry one, it is
# found by this and hidden.
KEY_PREFIX = "my-"
VIRTUAL_KEY = re.compile(KEY_PREFIX + r"[A-Za-z0-9_\-]{32}")
_VIRTUAL_KEY_BYTES = re.compile(VIRTUAL_KEY.pattern.encode())
KEY_REDACTED = "my-[redacted]"


def redact_keys(body: bytes) -> bytes:
    """`body` with every virtual key replaced, for a message kept anywhere."""
    return _VIRTUAL_KEY_BYTES.sub(KEY_REDACTED.encode(), body)


class Metadata(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Who the work is for; copied onto the result and every cost event."""

    team: Label | None = None
    project: Label | None = None
    user: Label | None = None
    batch_id: Label | None = None
    custom_id: CustomId | None = None
    tags: Annotated[list[Label], Meta(max_length=MAX_TAGS)] = msgspec.field(default_factory=list)


class TraceContext(msgspec.Struct, omit_defaults=True):
    """W3C trace context, so one trace spans producer, router and worker."""

    traceparent: str
    tracestate: str | None = None

    def trace_id(self) -> str | None:
        """The 32-hex trace id inside `traceparent`, if it is well formed."""
        parts = self.traceparent.split("-")
        return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


class Route(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where the router sent the job: filled in by the router, read by workers."""

    deployment: str
    pool: str
    routed_at: float
    # Said on the result: why the router chose as it did, when the choice
    # was forced (every deployment of the model cooling down).
    note: str | None = None
    # The model group the deployment serves this job for: the requested one,
    # or the fallback the job moved to (whose chain and retry policy apply).
    model: str | None = None


class Attempt(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One provider call made for the job (history travels with the job)."""

    deployment: str
    provider: str
    # The model group the call was made for (a fallback moves a job on).
    model: str | None = None
    started_at: float
    finished_at: float
    outcome: Literal["ok", "error"]
    error: ErrorKind | None = None
    provider_request_id: str | None = None
    # Whether the provider billed the call (a cost event carries it, with
    # the job's id), and what it cost.
    billed: bool = False
    cost: Decimal | None = None


class Constraints(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Where the job may run, narrowing its model's deployments (and its
    fallbacks'): only these providers or deployments, and only at prices
    up to these (USD per million tokens; a deployment with no known price
    never qualifies)."""

    providers: Annotated[list[Label], Meta(min_length=1, max_length=32)] | None = None
    deployments: Annotated[list[Label], Meta(min_length=1, max_length=256)] | None = None
    max_input_per_mtok: Annotated[float, Meta(ge=0)] | None = None
    max_output_per_mtok: Annotated[float, Meta(ge=0)] | None = None
    # Only deployments carrying at least one of these tags (a key's pin to
    # `eu` or `self-hosted` deployments arrives here).
    tags: Annotated[list[Label], Meta(min_length=1, max_length=32)] | None = None


class NextHop(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where a failed job goes next, decided by the worker, carried out by
    the router: the same `deployment` again (a retry, after a delay held by
    the broker), or a deployment of the fallback chain not tried yet."""

    reason: ErrorKind
    deployment: str | None = None
    fallback: bool = False
    # The error that sent the job on, answered if nothing is left to try.
    message: str = ""


class CompletionJob(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A normalized completion job.

    `id` doubles as the idempotency key: results and cost events carry it, and
    clients drop a second result for an id they have already seen. `reply_to`
    names the queue the result goes to (the AMQP `reply_to` property is used
    when this is absent). `deadline` is absolute; past it the job is answered
    `deadline_exceeded` rather than run.
    """

    id: JobId
    request: ChatRequest
    v: Int64 = JOB_VERSION
    # The producer's virtual key (`my-...`): checked at admission and
    # removed from the job before it goes anywhere else. `key_id` and the
    # metadata's team, project and user are then the key's, whatever the
    # producer wrote there.
    api_key: Annotated[str, Meta(max_length=256)] | None = None
    key_id: Label | None = None
    metadata: Metadata = msgspec.field(default_factory=Metadata)
    reply_to: ReplyTo | None = None
    deadline: Annotated[datetime, Meta(tz=True)] | None = None
    submitted_at: float | None = None
    # The lane: interactive jobs travel one per message and get a worker's
    # free slot first; batch jobs travel many per message (cheaper per job,
    # a few milliseconds later) and take the slots interactive work leaves.
    priority: Lane = "interactive"
    trace: TraceContext | None = None
    route: Route | None = None
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    # Set by the router when it routed this job before (it died before its
    # ack): the job may run twice, and its result is marked `redelivered`.
    redelivered: bool = False
    # The producer's own fallback chain (model names), tried in order after
    # the requested model; the config may forbid it (`allow_job_fallbacks`).
    fallbacks: Annotated[list[Label], Meta(max_length=16)] | None = None
    next_hop: NextHop | None = None
    constraints: Constraints | None = None
    # Set by admission when it narrowed `constraints` (a key's or team's
    # tags, the approved deployments): what the producer asked, so a
    # replay is narrowed afresh by today's rules (empty: nothing asked).
    constraints_asked: Constraints | None = None
    # Set by admission: the budget reservation held for this job (its id)
    # until `reserved_until` (unix seconds); the job's end releases it.
    reservation: Label | None = None
    reserved_until: float | None = None
    # Set by admission with the reservation: the least any budget over the
    # job has left once it is reserved (USD), for the producer to be told.
    budget_left: Decimal | None = None
    # Set by the router: what it had to say about its choices on the way
    # (every deployment cooling down, a wait for one that asked to be left
    # alone), kept across retries and fallbacks for the result's warnings.
    notes: Annotated[list[Annotated[str, Meta(max_length=512)]], Meta(max_length=16)] = (
        msgspec.field(default_factory=list)
    )

    def deadline_passed(self, now: float) -> bool:
        """True when the job's absolute deadline is behind `now` (unix seconds)."""
        return self.deadline is not None and self.deadline.timestamp() <= now


class JobBatch(msgspec.Struct, kw_only=True):
    """Many jobs in one message (AMQP `type` = `JOB_BATCH_TYPE`).

    Producers send batches to cut the broker's work per job; the router
    answers or routes each job on its own, so one invalid job never fails
    the others. The router sends batch-lane jobs to workers the same way."""

    jobs: list[CompletionJob]
    v: Int64 = 1
