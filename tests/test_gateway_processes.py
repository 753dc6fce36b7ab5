"""The gateway as separate processes: a Batch API batch survives the
SIGKILL of the gateway running it (another gateway takes it over when the
lease lapses), and every line is answered and billed once."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelyard.client import Client, new_job
from schemas.chat import Message
from tests.conftest import FakeControl
from tests.pipeline import eventually, ledger_rows
from tests.services import (
    Processes,
    config_document,
    free_port,
    fresh_database,
    fresh_vhost,
    write_config,
)

pytestmark = pytest.mark.asyncio

LINES = 400

Stack = tuple[Processes, str, str]  # the processes, the database URL, the broker URL


@pytest.fixture
def stack(tmp_path: Path, own_fake_port: int) -> Iterator[Stack]:
    with fresh_vhost() as broker_url, fresh_database() as database_url:
        doc = config_document(broker_url, database_url, own_fake_port, log_level="info")
        doc["pools"]["main"]["concurrency"] = 8
        processes = Processes(write_config(tmp_path / "modelyard.yaml", doc), tmp_path)
        try:
            for role in ("ledger", "router"):
                processes.start(role, role)
            processes.start("worker", "worker", "--pool", "main")
            for role in ("ledger", "router", "worker"):
                processes.wait_for(role, f"{role} started")
            yield processes, database_url, broker_url
        finally:
            processes.stop()


def gateway(processes: Processes, name: str) -> openai.AsyncOpenAI:
    port = free_port()
    processes.start(name, "gateway", "--port", str(port))
    processes.wait_for(name, "gateway started")
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)


async def test_a_batch_survives_the_gateway_running_it_being_killed(
    stack: Stack, own_fake_port: int
) -> None:
    processes, database_url, _ = stack
    async with aiohttp.ClientSession() as session:
        await FakeControl(session, own_fake_port).set(latency_ms=50)
    first = gateway(processes, "gateway-1")
    lines = b"".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"q {i}"}],
                },
            }
        ).encode()
        + b"\n"
        for i in range(LINES)
    )
    uploaded = await first.files.create(file=("in.jsonl", lines), purpose="batch")
    batch = await first.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await eventually(
        lambda: first.batches.retrieve(batch.id),
        lambda b: (b.request_counts.completed if b.request_counts else 0) >= 40,
        timeout=60,
    )
    processes.kill("gateway-1")  # mid-run: lines sent, answers half read
    await first.close()

    second = gateway(processes, "gateway-2")
    done = await eventually(
        lambda: second.batches.retrieve(batch.id),
        lambda b: b.status == "completed",
        timeout=120,
    )
    output = (await second.files.content(done.output_file_id or "")).content
    await second.close()

    answered = Counter(json.loads(line)["custom_id"] for line in output.splitlines())
    assert done.request_counts is not None
    assert done.request_counts.completed == LINES
    assert answered == Counter({f"line-{i}": 1 for i in range(LINES)})
    assert processes.events("gateway-2", "batch taken")  # the second gateway took it over
    rows = await ledger_rows(database_url, "batch_id = $1", batch.id)
    assert len(rows) == len({r["job_id"] for r in rows}) == LINES  # each line billed once


async def test_router_worker_and_ledger_serve_health_readiness_and_metrics(
    stack: Stack,
) -> None:
    processes, database_url, broker_url = stack
    for role in ("router", "worker", "ledger"):
        processes.kill(role)  # these ones serve no ops endpoints: the jobs go to those that do
    ports = {}
    for role in ("router", "worker", "ledger"):
        ports[role] = free_port()
        extra = ["--pool", "main"] if role == "worker" else []
        processes.start(f"{role}-ops", role, *extra, "--ops-port", str(ports[role]))
    for role in ports:
        processes.wait_for(f"{role}-ops", "running")
    async with aiohttp.ClientSession() as session:
        for role, port in ports.items():
            base = f"http://127.0.0.1:{port}"
            async with session.get(f"{base}/healthz") as alive:
                assert alive.status == 200, role
            async with session.get(f"{base}/readyz") as ready:
                report = await ready.json()
            assert ready.status == 200, role
            assert report["checks"] == {"broker": "ok", "database": "ok", "topology": "ok"}
            async with session.get(f"{base}/metrics") as scraped:
                text = await scraped.text()
            assert "process_resident_memory_bytes" in text, role

        # Each role counts the jobs it handled.
        client = await Client.connect(broker_url, "test-ops-client")
        try:
            ask = [Message(role="user", content="count me")]
            answers = [await client.complete(new_job("gpt-4o-mini", ask)) for _ in range(3)]
            refused = await client.complete(new_job("no-such-model", ask))
        finally:
            await client.close()
        assert [a.status for a in answers] == ["ok"] * 3
        assert refused.error is not None
        await eventually(lambda: ledger_rows(database_url), lambda rows: len(rows) == 3)
        metrics = {}
        for role, port in ports.items():
            async with session.get(f"http://127.0.0.1:{port}/metrics") as scraped:
                metrics[role] = await scraped.text()
    assert sample(metrics["router"], "modelyard_jobs_routed_total", deployment="mini") == 3
    assert sample(metrics["router"], "modelyard_jobs_refused_total", kind="unknown_model") == 1
    worker = metrics["worker"]
    assert sample(worker, "modelyard_provider_calls_total", deployment="mini", outcome="ok") == 3
    billed = sample(worker, "modelyard_billed_tokens_total", deployment="mini", direction="output")
    assert billed == sum(a.usage.output_tokens for a in answers if a.usage)
    assert billed
    assert sample(worker, "modelyard_provider_call_duration_seconds_count", deployment="mini") == 3
    assert sample(worker, "modelyard_provider_calls_in_flight", pool="main") == 0
    assert sample(metrics["ledger"], "modelyard_ledger_events_written_total") == 3
    assert (sample(metrics["ledger"], "modelyard_ledger_cost_usd_total") or 0) > 0


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text page (None when absent)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return None
