"""Throughput while one provider misbehaves (`make bench`).

Two fake providers (0 ms latency), one of them answering 10% of requests
with a 429 (retry-after 1 s) and 5% with a 500; a router, a worker and a
ledger as separate processes. The same number of batch-lane jobs runs twice
in one go: on a model whose two deployments are both healthy, then on one
whose second deployment is the faulty one. Printed: jobs/s of each run and
their ratio, the share answered ok, attempts per job, and whether the ledger
equals the calls the two fakes billed.

Not a test: it asserts nothing about speed. Compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import cpu_seconds
from modelyard.client import Client, new_job
from schemas.chat import Message
from schemas.results import JobResult
from tests.services import (
    config_document,
    fake_deployment,
    free_port,
    fresh_database,
    fresh_vhost,
    modelyard,
    wait_for_port,
    write_config,
)

FAULTS = {"rate_429": 0.10, "retry_after_s": 1.0, "rate_500": 0.05}


async def run(broker_url: str, model: str, n: int, tag: str) -> tuple[float, list[JobResult]]:
    """Submit `n` batch-lane jobs for `model`; jobs/s until every result is back."""
    queue = f"bench-{tag}"
    batch = [
        new_job(model, [Message(role="user", content=f"{tag} {i}")], priority="batch")
        for i in range(n)
    ]
    results: list[JobResult] = []
    async with await Client.connect(broker_url) as client:
        await client.declare_results_queue(queue)
        started = time.perf_counter()
        sender = asyncio.create_task(client.submit_many(batch, queue))
        async with contextlib.aclosing(client.results(queue)) as answers:
            async for result in answers:
                results.append(result)
                if len(results) == n:
                    break
        elapsed = time.perf_counter() - started
        await sender
        await client.delete_queue(queue)
    return n / elapsed, results


async def billed(ports: list[int]) -> int:
    """Calls the fakes answered with a 200 (what a provider bills)."""
    total = 0
    async with aiohttp.ClientSession() as session:
        for port in ports:
            async with session.get(f"http://127.0.0.1:{port}/_fake/requests") as r:
                total += sum(1 for e in await r.json() if e["status"] == 200 and not e["fault"])
    return total


async def ledger_rows(database_url: str, expected: int) -> int:
    """Ledger rows, once they stop growing (or reach `expected`)."""
    conn = await asyncpg.connect(database_url)
    try:
        last, stable = -1, 0
        while stable < 20:
            count = int(await conn.fetchval("SELECT count(*) FROM ledger"))
            stable = stable + 1 if count == last else 0
            last = count
            if count >= expected:
                await asyncio.sleep(0.5)
                return int(await conn.fetchval("SELECT count(*) FROM ledger"))
            await asyncio.sleep(0.1)
        return last
    finally:
        await conn.close()


async def configure(port: int, settings: dict[str, float]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.put(f"http://127.0.0.1:{port}/_fake/settings", json=settings) as r,
    ):
        r.raise_for_status()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=128, help="worker pool concurrency")
    args = parser.parse_args()

    with TemporaryDirectory() as tmp, fresh_vhost() as broker_url, fresh_database() as database_url:
        good, bad = free_port(), free_port()
        doc = config_document(broker_url, database_url, good)
        doc["pools"]["main"]["concurrency"] = args.concurrency
        doc["ledger"] = {"batch_size": 500, "flush_ms": 20}
        doc["deployments"].update(
            {
                "good-a": fake_deployment(good),
                "good-b": fake_deployment(good),
                "flaky-b": fake_deployment(bad),
            }
        )
        doc["models"].update(
            {
                "healthy-pair": {
                    "deployments": [{"deployment": "good-a"}, {"deployment": "good-b"}]
                },
                "faulty-pair": {
                    "deployments": [{"deployment": "good-a"}, {"deployment": "flaky-b"}]
                },
            }
        )
        config = str(write_config(Path(tmp) / "bench.yaml", doc))
        env = {"TEST_FAKE_KEY": "bench-key", "TEST_WRONG_KEY": "not-the-key"}
        logs = Path(tmp)
        procs = {
            f"fake-{port}": modelyard(
                "fake-provider",
                "--port",
                str(port),
                "--api-key",
                "bench-key",
                log=logs / "fake.log",
            )
            for port in (good, bad)
        }
        procs |= {
            role: modelyard("--config", config, *args_for(role), env=env, log=logs / f"{role}.log")
            for role in ("router", "worker", "ledger")
        }
        try:
            wait_for_port(good)
            wait_for_port(bad)
            asyncio.run(run(broker_url, "healthy-pair", 200, "warm"))
            pids = {name: p.pid for name, p in procs.items()}
            before = cpu_seconds(pids)
            healthy_s, _ = asyncio.run(run(broker_url, "healthy-pair", args.jobs, "healthy"))
            middle = cpu_seconds(pids)
            asyncio.run(configure(bad, FAULTS))
            faulty_s, results = asyncio.run(run(broker_url, "faulty-pair", args.jobs, "faulty"))
            after = cpu_seconds(pids)
            calls = asyncio.run(billed([good, bad]))
            rows = asyncio.run(ledger_rows(database_url, calls))
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(30)

    report(
        args.jobs,
        healthy_s=healthy_s,
        faulty_s=faulty_s,
        results=results,
        cpu=(before, middle, after),
        rows=rows,
        calls=calls,
    )
    return 0


def report(
    n: int,
    *,
    healthy_s: float,
    faulty_s: float,
    results: list[JobResult],
    cpu: tuple[dict[str, float], dict[str, float], dict[str, float]],
    rows: int,
    calls: int,
) -> None:
    """Print the figures of both runs."""
    before, middle, after = cpu
    ok = sum(1 for r in results if r.status == "ok")
    attempts = Counter(len(r.attempts) for r in results)
    print(f"\nmodelyard under provider faults ({n} batch-lane jobs per run)")
    print(f"  healthy deployments          : {healthy_s:8.0f} jobs/s")
    print(
        f"  one deployment faulty        : {faulty_s:8.0f} jobs/s "
        f"(10% 429 with retry-after 1 s, 5% 500)"
    )
    print(f"  faulty / healthy             : {faulty_s / healthy_s:8.2f}")
    print(f"  answered ok                  : {ok / len(results):8.2%}")
    per_job = sum(len(r.attempts) for r in results) / len(results)
    print(f"  attempts per job             : {per_job:8.3f}")
    print(
        "  jobs by attempts             : "
        + ", ".join(f"{k}: {v}" for k, v in sorted(attempts.items()))
    )
    for label, group in (
        ("first try", [r for r in results if len(r.attempts) == 1]),
        ("retried", [r for r in results if len(r.attempts) > 1]),
    ):
        spans = sorted((r.timings.finished_at or 0) - (r.timings.submitted_at or 0) for r in group)
        if spans:
            mid, tail = spans[len(spans) // 2], spans[int(len(spans) * 0.99)]
            print(f"  submit -> answer, {label:10}: p50 {mid:6.2f} s, p99 {tail:6.2f} s")
    for label, start, end in (("healthy", before, middle), ("faulty", middle, after)):
        spent = {p: (end[p] - start.get(p, 0.0)) * 1000 / n for p in end}
        ranked = sorted(spent.items(), key=lambda kv: -kv[1])
        print(f"  CPU per job, {label:8}: " + ", ".join(f"{n} {ms:.2f}" for n, ms in ranked))
    verdict = "equal" if rows == calls else "DIFFERENT"
    print(f"  ledger rows / billed calls   : {rows} / {calls} ({verdict})")


def args_for(role: str) -> list[str]:
    return ["worker", "--pool", "main"] if role == "worker" else [role]


if __name__ == "__main__":
    sys.exit(main())
