"""Content is judged once, at the edge: whatever could later make decoding,
publishing or storing a job fail is refused at decode time, as an
`InvalidMessage` naming the JSON path at fault."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from schemas.chat import INT64_MAX, INT64_MIN, MAX_JSON_DEPTH, MAX_OUTPUT_TOKENS
from schemas.codec import (
    InvalidMessage,
    decode_costs,
    decode_job,
    decode_reply,
    encode,
    salvage_envelope,
    split_job_batch,
)
from schemas.jobs import MAX_CUSTOM_ID_CHARS, MAX_LABEL_CHARS, MAX_REPLY_TO_BYTES, MAX_TAGS

# Far past msgspec's recursion guard (~1000 levels from a shallow stack).
TOO_DEEP_TO_DECODE = 5000
SERVER_NAMED_QUEUE = "amq.gen-AbC_d-9w=="


def nested(depth: int) -> bytes:
    """JSON objects nested `depth` levels (built by hand: `json.dumps` would
    itself give up on deep values)."""
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


def job_body(request: dict[str, Any] | None = None, **job: Any) -> bytes:
    """A valid job's JSON, with `request` and job fields added or replaced."""
    body = {
        "id": "j-1",
        "request": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        | (request or {}),
    } | job
    return json.dumps(body).encode()


def with_deep(body: bytes, depth: int) -> bytes:
    """`body` with the string `"DEEP"` replaced by JSON nested `depth` levels."""
    return body.replace(b'"DEEP"', nested(depth))


def tool(parameters: Any) -> dict[str, Any]:
    return {"tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]}


def output_schema(schema: Any) -> dict[str, Any]:
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    }


def invalid_field(body: bytes) -> str | None:
    """The path `decode_job` names for a job it refuses."""
    with pytest.raises(InvalidMessage) as caught:
        decode_job(body)
    return caught.value.field


# Nesting


@pytest.mark.parametrize(
    "body",
    [
        job_body(tool("DEEP")),
        job_body(output_schema("DEEP")),
        job_body(unknown="DEEP"),
        job_body(metadata="DEEP"),
    ],
    ids=["tool-parameters", "output-schema", "unknown-field", "typed-field"],
)
def test_json_too_deep_to_decode_is_invalid_not_a_recursion_error(body: bytes) -> None:
    assert invalid_field(with_deep(body, TOO_DEEP_TO_DECODE)) == "$"


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        (tool("DEEP"), "$.request.tools[0].function.parameters"),
        (output_schema("DEEP"), "$.request.response_format.json_schema.schema"),
    ],
)
def test_free_form_json_past_the_depth_limit_names_its_field(
    request_fields: dict[str, Any], field: str
) -> None:
    body = job_body(request_fields)

    decode_job(with_deep(body, MAX_JSON_DEPTH))  # at the limit: accepted
    assert field == invalid_field(with_deep(body, MAX_JSON_DEPTH + 1))


def test_depth_counts_arrays_inside_free_form_json() -> None:
    parameters = b'{"a":' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    body = job_body(tool("DEEP")).replace(b'"DEEP"', parameters)

    assert invalid_field(body) == "$.request.tools[0].function.parameters"


def test_a_batch_item_too_deep_to_decode_fails_the_batch_as_invalid() -> None:
    item = with_deep(job_body(tool("DEEP")), TOO_DEEP_TO_DECODE)

    with pytest.raises(InvalidMessage) as caught:
        split_job_batch(b'{"jobs":[' + item + b"]}", max_bytes=1 << 20)

    assert caught.value.field == "$"


def test_a_batch_item_past_the_depth_limit_is_refused_on_its_own() -> None:
    good = job_body()
    deep = with_deep(job_body(tool("DEEP")), MAX_JSON_DEPTH + 1)

    raws = split_job_batch(b'{"jobs":[' + good + b"," + deep + b"]}", max_bytes=1 << 20)

    assert decode_job(raws[0]).id == "j-1"
    assert invalid_field(raws[1]) == "$.request.tools[0].function.parameters"


@pytest.mark.parametrize("decode", [decode_reply, decode_costs])
def test_other_decoders_refuse_deep_json_as_invalid(decode: Any) -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode(nested(TOO_DEEP_TO_DECODE))

    assert caught.value.field == "$"


# Integers


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_output_limits_have_a_ceiling(name: str) -> None:
    accepted = decode_job(job_body({name: MAX_OUTPUT_TOKENS}))

    assert accepted.request.output_limit() == MAX_OUTPUT_TOKENS
    assert f"$.request.{name}" == invalid_field(job_body({name: MAX_OUTPUT_TOKENS + 1}))
    assert f"$.request.{name}" == invalid_field(job_body({name: 2**70}))


@pytest.mark.parametrize("seed", [2**63, 2**70, -(2**63) - 1])
def test_seed_must_fit_64_bits(seed: int) -> None:
    assert invalid_field(job_body({"seed": seed})) == "$.request.seed"


@pytest.mark.parametrize("seed", [INT64_MAX, INT64_MIN])
def test_seed_at_the_64_bit_edges_is_accepted_and_re_encodes(seed: int) -> None:
    job = decode_job(job_body({"seed": seed}))

    assert seed == json.loads(encode(job))["request"]["seed"]


def test_msgspec_decodes_big_integers_exactly() -> None:
    """Why the limits above are needed: msgspec turns any JSON integer of up
    to 4300 digits into a Python int (not a float), in `int` and `Any` alike,
    and encodes it back; everything downstream stops at 64 bits."""
    assert msgspec.json.decode(b"1180591620717411303424") == 2**70
    assert msgspec.json.encode(2**70) == b"1180591620717411303424"
    assert msgspec.json.decode(b"1180591620717411303424", type=int) == 2**70


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        (tool({"maximum": 2**70}), "$.request.tools[0].function.parameters"),
        (tool({"enum": [1, -(2**63) - 1]}), "$.request.tools[0].function.parameters"),
        (output_schema({"maximum": 2**64}), "$.request.response_format.json_schema.schema"),
    ],
)
def test_big_integers_in_free_form_json_are_refused(
    request_fields: dict[str, Any], field: str
) -> None:
    assert field == invalid_field(job_body(request_fields))


def test_free_form_json_within_64_bits_round_trips() -> None:
    parameters = {"maximum": INT64_MAX, "minimum": INT64_MIN, "default": 1.5e300, "x": True}
    job = decode_job(job_body(tool(parameters)))

    assert parameters == json.loads(encode(job))["request"]["tools"][0]["function"]["parameters"]


def test_job_version_must_fit_64_bits() -> None:
    assert invalid_field(job_body(v=2**64)) == "$.v"


# AMQP short strings


@pytest.mark.parametrize(
    "reply_to",
    [SERVER_NAMED_QUEUE, "amq.rabbitmq.reply-to", "results.team-a", "q" * MAX_REPLY_TO_BYTES],
)
def test_reply_to_accepts_queue_names(reply_to: str) -> None:
    assert reply_to == decode_job(job_body(reply_to=reply_to)).reply_to


@pytest.mark.parametrize(
    "reply_to",
    [
        "q" * (MAX_REPLY_TO_BYTES + 1),
        "é" * 128,  # 128 characters, 256 bytes
        "",
        "has space",
        "line\n",
        "nul\x00",
    ],
    ids=["256-bytes", "256-bytes-of-utf8", "empty", "space", "trailing-newline", "nul"],
)
def test_reply_to_must_be_a_short_printable_name(reply_to: str) -> None:
    assert invalid_field(job_body(reply_to=reply_to)) == "$.reply_to"


def test_job_id_with_a_trailing_newline_is_refused() -> None:
    assert invalid_field(job_body(id="j-1\n")) == "$.id"


# Metadata stored in Postgres


@pytest.mark.parametrize(
    ("job_fields", "field"),
    [
        ({"metadata": {"team": "a\x00b"}}, "$.metadata.team"),
        ({"metadata": {"team": "t" * (MAX_LABEL_CHARS + 1)}}, "$.metadata.team"),
        ({"metadata": {"project": "\x00"}}, "$.metadata.project"),
        ({"metadata": {"user": "u\x00"}}, "$.metadata.user"),
        ({"metadata": {"batch_id": "b" * (MAX_LABEL_CHARS + 1)}}, "$.metadata.batch_id"),
        ({"metadata": {"custom_id": "c" * (MAX_CUSTOM_ID_CHARS + 1)}}, "$.metadata.custom_id"),
        ({"metadata": {"tags": ["ok", "a\x00"]}}, "$.metadata.tags[1]"),
        ({"metadata": {"tags": ["t"] * (MAX_TAGS + 1)}}, "$.metadata.tags"),
        ({"key_id": "k\x00"}, "$.key_id"),
        ({"key_id": "k" * (MAX_LABEL_CHARS + 1)}, "$.key_id"),
    ],
)
def test_metadata_must_fit_a_postgres_text_column(job_fields: dict[str, Any], field: str) -> None:
    assert field == invalid_field(job_body(**job_fields))


def test_metadata_at_its_limits_is_accepted() -> None:
    metadata = {
        "team": "t" * MAX_LABEL_CHARS,
        "custom_id": "c" * MAX_CUSTOM_ID_CHARS,
        "tags": ["t"] * MAX_TAGS,
        "user": "multi\nline é",
    }
    job = decode_job(job_body(metadata=metadata, key_id="k" * MAX_LABEL_CHARS))

    assert metadata == json.loads(encode(job))["metadata"]


# Salvaging a job that did not decode


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id": "j", "reply_to": "q", "request": 5}', ("j", "q")),
        (
            b'{"id": "j", "reply_to": "' + SERVER_NAMED_QUEUE.encode() + b'"}',
            ("j", SERVER_NAMED_QUEUE),
        ),
        (b'{"id": "' + b"i" * 129 + b'", "reply_to": "q"}', (None, "q")),
        (b'{"id": "j", "reply_to": "' + b"q" * 256 + b'"}', ("j", None)),
        (b'{"id": "has space", "reply_to": "has space"}', (None, None)),
        (b'{"id": 5, "reply_to": ["q"]}', (None, None)),
        (b'{"id": "", "reply_to": ""}', (None, None)),
        (b'{"id": "j", "reply_to": "q", "x": 1e400}', ("j", "q")),
        (b'{"id": "j", "reply_to": "q", "x": ' + nested(MAX_JSON_DEPTH + 1) + b"}", ("j", "q")),
        (b'{"id": "j", "x": ' + nested(TOO_DEEP_TO_DECODE) + b"}", (None, None)),
        (nested(TOO_DEEP_TO_DECODE), (None, None)),
        (b"[" * TOO_DEEP_TO_DECODE, (None, None)),
        (b'["j", "q"]', (None, None)),
        (b'"j"', (None, None)),
        (b"", (None, None)),
        (b'{"id": "j\xff"}', (None, None)),
        (b"\x00garbage", (None, None)),
    ],
    ids=[
        "valid",
        "server-named-queue",
        "long-id",
        "long-reply-to",
        "bad-characters",
        "not-strings",
        "empty-strings",
        "other-field-unrepresentable",
        "other-field-past-depth-limit",
        "other-field-too-deep-to-decode",
        "object-too-deep-to-decode",
        "array-too-deep-to-decode",
        "array",
        "string",
        "empty-body",
        "invalid-utf8",
        "garbage",
    ],
)
def test_salvage_returns_only_valid_parts_and_never_raises(
    body: bytes, expected: tuple[str | None, str | None]
) -> None:
    assert expected == salvage_envelope(body)


# Batches


def test_an_empty_batch_is_refused() -> None:
    with pytest.raises(InvalidMessage) as caught:
        split_job_batch(b'{"jobs": []}', max_bytes=1024)

    assert (str(caught.value), caught.value.field) == ("batch holds no jobs", "$.jobs")
