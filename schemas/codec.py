"""Encoding and decoding at the edges, with errors that name the field.

Every component decodes messages through here, once. A body that does not
decode raises `InvalidMessage` with a JSON path, which the caller turns into an
`invalid_job` result (or a dead letter when there is nobody to answer).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from schemas.chat import ChatRequest, FieldFault
from schemas.costs import CostBatch
from schemas.errors import ErrorKind, JobError, job_error
from schemas.health import HealthReport
from schemas.jobs import CompletionJob, JobBatch, JobId, ReplyTo
from schemas.results import Reply

T = TypeVar("T")

# Large enough for a few base64 images, small enough that one bad producer
# cannot make a router hold gigabytes. Configurable per deployment of modelyard.
DEFAULT_MAX_JOB_BYTES = 8 * 1024 * 1024

_PATH = re.compile(r" - at `(?P<path>[^`]+)`$")

encoder = msgspec.json.Encoder(decimal_format="string")
_job_decoder = msgspec.json.Decoder(CompletionJob)
_batch_decoder = msgspec.json.Decoder(JobBatch)


class _RawBatch(msgspec.Struct):
    """A job batch with each job left undecoded, to be judged one by one."""

    jobs: list[msgspec.Raw]


_raw_batch_decoder = msgspec.json.Decoder(_RawBatch)
_reply_decoder: msgspec.json.Decoder[Reply] = msgspec.json.Decoder(Reply)
_cost_decoder = msgspec.json.Decoder(CostBatch)
_health_decoder = msgspec.json.Decoder(HealthReport)
_chat_decoder = msgspec.json.Decoder(ChatRequest)
_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])


class _Envelope(msgspec.Struct):
    """The two fields an answer needs, kept raw so each is judged alone."""

    id: msgspec.Raw = msgspec.Raw(b"null")
    reply_to: msgspec.Raw = msgspec.Raw(b"null")


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_job_id_decoder = msgspec.json.Decoder(JobId)
_reply_to_decoder = msgspec.json.Decoder(ReplyTo)


class InvalidMessage(ValueError):
    """A message that cannot be accepted; `field` is the JSON path at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def to_error(self) -> JobError:
        """The `invalid_job` error to answer the producer with."""
        return job_error(ErrorKind.INVALID_JOB, str(self), field=self.field)


def encode(value: Any) -> bytes:
    """Encode any schema value as JSON bytes (Decimals as exact strings)."""
    return encoder.encode(value)


def decode_with(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode `body` with `decoder`; `InvalidMessage` with the JSON path at fault."""
    return _decode(decoder, body)


def validated(request: ChatRequest) -> ChatRequest:
    """`request` (built in code, which checks no constraint) as a decoder
    would accept it, or `InvalidMessage` naming the field at fault."""
    return _decode(_chat_decoder, encoder.encode(request))


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        path = match["path"] if match else "$"
        if isinstance(exc.__cause__, FieldFault):
            path = f"{path}.{exc.__cause__.field}"
        raise InvalidMessage(text, path) from exc
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"body is not valid JSON: {exc}", "$") from exc
    except RecursionError as exc:
        # msgspec recurses once per nesting level (even to skip a value) and
        # gives up near Python's recursion limit, without saying where.
        raise InvalidMessage("JSON nested too deeply to decode", "$") from exc


def decode_job(body: bytes, max_bytes: int = DEFAULT_MAX_JOB_BYTES) -> CompletionJob:
    """Decode a submitted job, enforcing the size limit before parsing."""
    if len(body) > max_bytes:
        raise InvalidMessage(f"job is {len(body)} bytes, over the {max_bytes}-byte limit", "$")
    return _decode(_job_decoder, body)


def decode_chat_request(body: bytes) -> tuple[ChatRequest, list[str]]:
    """An OpenAI chat completion request (an HTTP body), and the names of its
    top-level fields, for the caller to tell which it ignores."""
    request = _decode(_chat_decoder, body)
    return request, list(_fields_decoder.decode(body))


def split_job_batch(body: bytes, max_bytes: int) -> list[bytes]:
    """The raw jobs of a submitted batch, each to be decoded (and answered,
    if invalid) on its own; only a batch that is not a batch at all, or holds
    no job, raises."""
    if len(body) > max_bytes:
        raise InvalidMessage(f"batch is {len(body)} bytes, over the {max_bytes}-byte limit", "$")
    jobs = _decode(_raw_batch_decoder, body).jobs
    if not jobs:
        raise InvalidMessage("batch holds no jobs", "$.jobs")
    return [bytes(raw) for raw in jobs]


def encode_job_batch(jobs: list[bytes]) -> bytes:
    """A `JobBatch` body from jobs already encoded one by one (which is how
    producers and the router size their batches without encoding twice)."""
    return b'{"jobs":[' + b",".join(jobs) + b"]}"


def encode_result_batch(results: list[bytes]) -> bytes:
    """A `ResultBatch` body from results already encoded one by one."""
    return b'{"kind":"results","results":[' + b",".join(results) + b'],"v":1}'


def decode_job_batch(body: bytes) -> JobBatch:
    """Decode a dispatched batch (already validated job by job by the router)."""
    return _decode(_batch_decoder, body)


def decode_reply(body: bytes) -> Reply:
    """Decode a message from a reply queue (a result, a stream chunk or a batch
    of results; `schemas.results.unpack` lists what it holds)."""
    return _decode(_reply_decoder, body)


def decode_costs(body: bytes) -> CostBatch:
    """Decode a message from the costs queue."""
    return _decode(_cost_decoder, body)


def decode_health(body: bytes) -> HealthReport:
    """Decode a worker's health report."""
    return _decode(_health_decoder, body)


def salvage_envelope(body: bytes) -> tuple[str | None, str | None]:
    """Best-effort `(id, reply_to)` from a body that failed to decode; never raises.

    Lets the router answer a malformed job instead of silently dropping it.
    Each part is returned only if it is valid as `CompletionJob` defines it
    (a `JobId`, a `ReplyTo`), so the answer itself can be published; anything
    else, or a body that is not a JSON object, yields `None` for that part.
    """
    try:
        envelope = _envelope_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None, None
    return _salvage(_job_id_decoder, envelope.id), _salvage(_reply_to_decoder, envelope.reply_to)


def _salvage(decoder: msgspec.json.Decoder[str], raw: msgspec.Raw) -> str | None:
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
