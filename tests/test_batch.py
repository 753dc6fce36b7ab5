"""`modelyard submit`: an OpenAI Batch API file through the pipeline,
interrupted and resumed without billing any line twice."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from tests.conftest import FakeControl
from tests.pipeline import eventually, scalar
from tests.services import modelyard

pytestmark = pytest.mark.asyncio


def write_batch(path: Path, lines: int, bad: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    with path.open("w") as f:
        for i in range(lines):
            url = "/v1/embeddings" if i in bad else "/v1/chat/completions"
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"line {i}"}]}
            f.write(
                json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
                + "\n"
            )


def read_output(path: Path) -> dict[str, dict[str, object]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id was written twice"
    return by_id


async def run_submit(config: Path, source: Path, output: Path) -> int:
    process = modelyard("--config", str(config), "submit", str(source), "-o", str(output), "-q")
    try:
        return await asyncio.to_thread(process.wait, 120)
    finally:
        if process.poll() is None:  # a hung submit must not outlive the test
            process.kill()
            process.wait()


async def billed(fake: FakeControl) -> int:
    return sum(1 for e in await fake.requests() if e["status"] == 200 and not e["fault"])


async def test_batch_output_errors_and_ledger(
    tmp_config: Path, tmp_path: Path, pipeline: None, fake: FakeControl, database_url: str
) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_batch(source, 40, bad={7})
    await fake.clear()

    assert await run_submit(tmp_config, source, output) == 0

    results = read_output(output)
    assert set(results) == {f"req-{i}" for i in range(40)}
    assert results["req-7"]["error"] == {
        "code": "invalid_job",
        "message": results["req-7"]["error"]["message"],  # type: ignore[index]
    }
    ok = [r for r in results.values() if r["error"] is None]
    assert len(ok) == 39
    assert all(r["response"]["status_code"] == 200 for r in ok)  # type: ignore[index]
    assert await billed(fake) == 39
    rows = await eventually(
        lambda: scalar(database_url, "SELECT count(*) FROM ledger WHERE custom_id LIKE 'req-%'"),
        lambda n: n >= 39,
    )
    assert rows == 39
    assert not (tmp_path / "out.jsonl.submitted").exists()

    # Running the finished batch again sends nothing and bills nothing.
    assert await run_submit(tmp_config, source, output) == 0
    assert await billed(fake) == 39
    assert read_output(output) == results


async def test_killed_submit_resumes_without_billing_twice(
    tmp_config: Path, tmp_path: Path, pipeline: None, fake: FakeControl
) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_batch(source, 300)
    await fake.clear()
    await fake.set(latency_ms=40)
    try:
        process = modelyard(
            "--config", str(tmp_config), "submit", str(source), "-o", str(output), "-q"
        )
        await eventually(
            lambda: asyncio.to_thread(
                lambda: output.exists() and len(output.read_bytes().splitlines()) >= 60
            ),
            bool,
            timeout=60,
        )
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 10)
        partial = len(output.read_bytes().splitlines())
        assert 60 <= partial < 300

        assert await run_submit(tmp_config, source, output) == 0
    finally:
        await fake.set(latency_ms=0)

    assert set(read_output(output)) == {f"req-{i}" for i in range(300)}
    assert await billed(fake) == 300  # every line billed exactly once across both runs
    assert process.returncode == -signal.SIGKILL
