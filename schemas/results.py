"""What comes back on a reply queue: the final result, and streamed chunks.

Every kind travels on the same queue as a tagged union (`kind`), so a
consumer decodes one type and matches on it: a result, a stream chunk, or a
batch of results (batch-lane jobs).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

from schemas.chat import ToolCall
from schemas.errors import JobError
from schemas.jobs import Attempt, Metadata

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class Usage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Token counts with OpenAI's semantics, whatever the provider said.

    `input_tokens` is the whole prompt, cached and cache-written tokens
    included; `output_tokens` includes `reasoning_tokens`. Adapters convert
    each provider's counters to this meaning so cost arithmetic is uniform.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus output tokens."""
        return self.input_tokens + self.output_tokens


class Completion(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A normalized answer: one choice, OpenAI's shape."""

    id: str
    model: str
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None
    finish_reason: FinishReason = "stop"
    provider_finish_reason: str | None = None
    created: int = 0


class RateLimits(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The provider's own view of its limits after this call, from its
    response headers, for limiters and retry decisions. Resets are in
    seconds from the moment the response arrived."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = None


class Timings(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Unix timestamps (seconds, float) of each stage the job went through."""

    submitted_at: float | None = None
    routed_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    # When a worker took the job from its queue: `started_at - received_at`
    # is the wait for a free slot, `received_at - routed_at` the queue's.
    received_at: float | None = None


class JobResult(msgspec.Struct, tag_field="kind", tag="result", kw_only=True, omit_defaults=True):
    """The final answer to a job: a completion or a typed error, never both.

    `redelivered` is set when the job message had been delivered before (a
    process died mid-job): the producer may already hold a result for this
    id and should keep the first one it saw. `warnings` name request
    parameters the provider had no equivalent for and that were left out.
    """

    job_id: str
    status: Literal["ok", "error"]
    response: Completion | None = None
    error: JobError | None = None
    usage: Usage | None = None
    cost: Decimal | None = None
    model: str | None = None
    provider: str | None = None
    deployment: str | None = None
    metadata: Metadata = msgspec.field(default_factory=Metadata)
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    timings: Timings = msgspec.field(default_factory=Timings)
    redelivered: bool = False
    rate_limits: RateLimits | None = None
    warnings: list[str] = msgspec.field(default_factory=list)
    v: int = 1


class ToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A piece of a streamed tool call (OpenAI chunk semantics)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


class StreamChunk(msgspec.Struct, tag_field="kind", tag="chunk", kw_only=True, omit_defaults=True):
    """One ordered piece of a streamed answer; `seq` starts at 0.

    `redelivered` marks chunks of a second attempt after a worker died
    mid-stream: the answer starts again at `seq` 0, and a consumer should
    discard what it had received of the first attempt."""

    job_id: str
    seq: int
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    finish_reason: FinishReason | None = None
    redelivered: bool = False
    v: int = 1


class ResultBatch(msgspec.Struct, tag_field="kind", tag="results", kw_only=True):
    """Several final results in one message, for batch-lane jobs.

    A message per result was a third of the broker's work per job; a batch
    consumer unpacks these and handles each result as if it came alone."""

    results: list[JobResult]
    v: int = 1


Reply = JobResult | StreamChunk | ResultBatch


def unpack(reply: Reply) -> list[JobResult | StreamChunk]:
    """The results and chunks a reply message carries, in order."""
    if isinstance(reply, ResultBatch):
        return list(reply.results)
    return [reply]
