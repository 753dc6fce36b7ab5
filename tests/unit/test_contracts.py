"""Contracts at the edge: decoding errors name the field, logs stay redacted,
topology exports, batch lines and reports validate."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from modelyard.batch import BatchInputError, batch_id_for, parse_line, read_progress
from modelyard.logs import REDACTED, Redactor
from modelyard.openai_format import batch_output_line
from modelyard.report import ReportError, exact, report_sql
from modelyard.topology import (
    DEAD_EXCHANGE,
    RETRY_DELAYS_MS,
    build_topology,
    definitions,
    delay_step_ms,
    worker_queue,
)
from schemas.codec import InvalidMessage, decode_job, decode_reply, encode, salvage_envelope
from schemas.errors import ErrorKind
from schemas.jobs import CompletionJob
from schemas.results import Completion, JobResult, StreamChunk, Usage


def test_job_round_trips() -> None:
    body = {
        "id": "j-1",
        "request": {
            "model": "fast",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    ],
                },
            ],
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
            ],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": {"type": "object"}},
            },
            "stop": ["\n"],
        },
        "metadata": {"team": "t", "custom_id": "c"},
    }
    job = decode_job(json.dumps(body).encode())

    assert isinstance(job, CompletionJob)
    assert json.loads(encode(job))["request"] == body["request"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "$"),
        (b'{"request": {"model": "m", "messages": [{"role": "user"}]}}', "$"),
        (b'{"id": "has space", "request": {"model": "m", "messages": [{"role": "user"}]}}', "$.id"),
        (
            b'{"id": "a", "request": {"model": "m", "messages": '
            b'[{"role": "user", "content": [{"type": "audio"}]}]}}',
            "$.request.messages[0].content[0].type",
        ),
        (
            b'{"id": "a", "request": {"model": "m", "messages": [{"role": "user"}], "n": 2}}',
            "$.request.n",
        ),
    ],
)
def test_invalid_job_names_the_field(body: bytes, field: str) -> None:
    with pytest.raises(InvalidMessage) as error:
        decode_job(body)

    assert error.value.field == field
    assert error.value.to_error().kind == ErrorKind.INVALID_JOB
    assert error.value.to_error().retryable is False


def test_oversized_job_refused_before_parsing() -> None:
    with pytest.raises(InvalidMessage, match="over the 2048-byte limit"):
        decode_job(b"x" * 4096, max_bytes=2048)


def test_salvage_envelope() -> None:
    assert salvage_envelope(b'{"id": "j", "reply_to": "q", "request": 5}') == ("j", "q")
    assert salvage_envelope(b"[1, 2]") == (None, None)
    assert salvage_envelope(b"\x00garbage") == (None, None)


def test_replies_are_a_tagged_union_and_money_is_a_string() -> None:
    result = JobResult(
        job_id="j", status="ok", cost=Decimal("0.000000123"), usage=Usage(input_tokens=1)
    )
    chunk = StreamChunk(job_id="j", seq=0, content="he")

    wire = json.loads(encode(result))["cost"]
    assert isinstance(wire, str)  # never a float
    assert Decimal(wire) == Decimal("0.000000123")
    assert decode_reply(encode(result)) == result
    assert decode_reply(encode(chunk)) == chunk


def test_redaction_is_a_processor() -> None:
    event: dict[str, Any] = {
        "event": "x",
        "messages": ["secret prompt"],
        "api_key": "sk",
        "job_id": "j",
    }
    allowed: dict[str, Any] = {"event": "x", "messages": ["prompt"], "authorization": "Bearer sk"}

    assert Redactor(log_prompts=False)(None, "info", event) == {
        "event": "x",
        "messages": REDACTED,
        "api_key": REDACTED,
        "job_id": "j",
    }
    assert Redactor(log_prompts=True)(None, "info", allowed) == {
        "event": "x",
        "messages": ["prompt"],
        "authorization": REDACTED,
    }


def test_topology_is_quorum_with_dead_lettering() -> None:
    topology = build_topology(["openai", "anthropic"])
    exported = definitions(topology, vhost="prod")
    queues = {q["name"]: q for q in exported["queues"]}

    assert set(queues) == {
        "router.jobs",
        "router.internal",
        "ledger.costs",
        "dead.jobs",
        worker_queue("openai"),
        worker_queue("openai", "batch"),
        worker_queue("anthropic"),
        worker_queue("anthropic", "batch"),
        *(f"wait.{step}" for step in RETRY_DELAYS_MS),
    }
    for name in ("router.jobs", "ledger.costs", "worker.openai", "worker.openai.batch"):
        assert queues[name]["arguments"]["x-queue-type"] == "quorum"
        assert queues[name]["arguments"]["x-dead-letter-exchange"] == DEAD_EXCHANGE
        assert queues[name]["durable"] is True
    assert {(b["source"], b["routing_key"], b["destination"]) for b in exported["bindings"]} >= {
        ("modelyard.dispatch", "openai", "worker.openai"),
        ("modelyard.dispatch", "openai.batch", "worker.openai.batch"),
        ("modelyard.jobs", "job", "router.jobs"),
    }
    assert all(q["vhost"] == "prod" for q in exported["queues"])
    # A retry waits its step in the broker, then goes back to the router,
    # on the internal path producers cannot publish to.
    retry = queues["wait.2000"]["arguments"]
    assert (retry["x-message-ttl"], retry["x-dead-letter-exchange"]) == (2000, "modelyard.internal")
    assert retry["x-dead-letter-routing-key"] == "job"
    assert ("modelyard.wait.2000", "", "wait.2000") in {
        (b["source"], b["routing_key"], b["destination"]) for b in exported["bindings"]
    }


def test_a_delay_waits_the_shortest_ladder_step_at_least_as_long() -> None:
    assert [delay_step_ms(s) for s in (0, 0.25, 0.3, 1.0, 1.01, 300, 301)] == [
        250,
        250,
        500,
        1000,
        1500,
        300000,
        None,
    ]


def test_batch_lines() -> None:
    good = json.dumps(
        {
            "custom_id": "r1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        }
    ).encode()
    wrong_url = json.dumps(
        {
            "custom_id": "r2",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        }
    ).encode()

    cid, job = parse_line(good, 1, "b1")
    cid2, bad = parse_line(wrong_url, 2, "b1")
    cid3, garbage = parse_line(b"{", 3, "b1")

    assert cid == "r1"
    assert isinstance(job, CompletionJob)
    assert (job.metadata.batch_id, job.metadata.custom_id, job.priority) == ("b1", "r1", "batch")
    assert parse_line(good, 1, "b1")[1].id == job.id  # type: ignore[union-attr]  # stable: resumable
    assert isinstance(bad, JobResult)
    assert bad.error is not None
    assert (cid2, bad.error.field) == ("r2", "$.url")
    assert isinstance(garbage, JobResult)
    assert cid3 == "line-3"
    assert batch_id_for(b"a") != batch_id_for(b"b")


def test_batch_output_line_matches_openai_batch_format() -> None:
    ok = JobResult(
        job_id="j",
        status="ok",
        response=Completion(id="c", model="m", content="hi"),
        usage=Usage(input_tokens=3, output_tokens=1),
    )
    line = json.loads(batch_output_line(ok, "r1"))

    assert (line["custom_id"], line["error"], line["response"]["status_code"]) == ("r1", None, 200)
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "hi"
    assert line["response"]["body"]["usage"]["total_tokens"] == 4


def test_report_validates_grouping() -> None:
    assert "GROUP BY team, model, day" in report_sql(["team", "model", "day"])
    with pytest.raises(ReportError):
        report_sql(["team; DROP TABLE ledger"])
    assert exact(Decimal("0.017536160000")) == "0.01753616"
    assert exact(Decimal("12.000")) == "12"


def test_batch_progress_files(tmp_path: Path) -> None:
    ids = {"r1": "job1", "r2": "job2"}
    output, sidecar = tmp_path / "out.jsonl", tmp_path / "out.jsonl.submitted"
    output.write_bytes(b'{"id": "batch_req_job1", "custom_id": "r1"}\n{"id": "batch_req_jo')
    sidecar.write_bytes(b'{"batch_id": "b1"}\n"r2"\n"r')

    earlier = read_progress(output, sidecar, "b1", ids)

    assert (earlier.done, earlier.submitted) == ({"r1"}, {"r2"})
    assert output.read_bytes().endswith(b'"r1"}\n')  # the torn line is cut off the file
    assert read_progress(output, sidecar, "b2", ids).submitted == set()  # another input's sidecar
    with pytest.raises(BatchInputError, match="different input"):
        read_progress(output, sidecar, "b1", {"r1": "other-job"})


def test_deploy_definitions_match_the_demo_config() -> None:
    """`deploy/rabbitmq-definitions.json` is the demo config's topology; a
    change to the topology must re-export it (`modelyard topology --export`)."""
    from modelyard.config import load  # noqa: PLC0415

    root = Path(__file__).resolve().parents[2]
    config = load(root / "deploy" / "demo.yaml")
    exported = json.loads((root / "deploy" / "rabbitmq-definitions.json").read_text())

    assert exported == definitions(build_topology(config.pool_names()))
