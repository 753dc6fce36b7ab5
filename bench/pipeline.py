"""End-to-end throughput and latency of the whole pipeline (`make bench`).

Starts the fake provider (0 ms latency), a router, a worker and a ledger as
separate processes on a fresh vhost and database, then measures:

- throughput: N batch-lane jobs submitted with `submit_many`, jobs/s until
  every result is back, and until every ledger row is committed;
- latency at low load: submit-to-result of one interactive job at a time
  (p50, p99), and the median of each stage from the results' timestamps;
- the baseline: the same requests sent straight to the fake provider at the
  same concurrency, and the ratio of the two;
- peak RSS of every process.

Not a test: it asserts nothing about speed. Figures vary with the machine;
compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, NamedTuple

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelyard.client import Client, new_job
from schemas.chat import Message
from schemas.jobs import CompletionJob, Lane
from tests.services import (
    config_document,
    free_port,
    fresh_database,
    fresh_vhost,
    modelyard,
    wait_for_port,
    write_config,
)

RESULTS = "bench-results"


def jobs(n: int, tag: str, lane: Lane = "interactive") -> list[CompletionJob]:
    return [
        new_job("gpt-4o-mini", [Message(role="user", content=f"bench {tag} {i}")], priority=lane)
        for i in range(n)
    ]


async def throughput(
    broker_url: str, database_url: str, n: int, tag: str = "throughput"
) -> tuple[float, float]:
    """Batch-lane jobs/s to the results queue, and until their ledger rows are in."""
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(database_url)
    try:
        rows_before = await conn.fetchval("SELECT count(*) FROM ledger")
    finally:
        await conn.close()
    batch = jobs(n, tag, "batch")
    async with await Client.connect(broker_url) as client:
        await client.declare_results_queue(RESULTS)
        started = time.perf_counter()
        sender = asyncio.create_task(client.submit_many(batch, RESULTS))
        got = 0
        async with contextlib.aclosing(client.results(RESULTS)) as results:
            async for _ in results:
                got += 1
                if got == n:
                    break
        results_s = time.perf_counter() - started
        await sender
    conn = await asyncpg.connect(database_url)
    try:
        while await conn.fetchval("SELECT count(*) FROM ledger") < rows_before + n:  # noqa: ASYNC110  (polling the database)
            await asyncio.sleep(0.01)
        ledger_s = time.perf_counter() - started
    finally:
        await conn.close()
    return n / results_s, n / ledger_s


async def quiet_ledger(conn: Any, quiet_s: float = 1.0) -> None:
    """Wait until the ledger's row count stays put for `quiet_s`."""
    count, still_since = -1, time.perf_counter()
    while time.perf_counter() - still_since < quiet_s:
        now = await conn.fetchval("SELECT count(*) FROM ledger")
        if now != count:
            count, still_since = now, time.perf_counter()
        await asyncio.sleep(0.1)


class Budgeted(NamedTuple):
    """The throughput run again with a budget on every job."""

    jobs_s: float
    ledger_s: float
    spent: Decimal  # what the budget recorded
    billed: Decimal  # what the ledger holds for those jobs
    held: int  # reservations left over


async def with_budgets(broker_url: str, database_url: str, n: int) -> Budgeted:
    """Set a global budget (every job reserves and settles), too large to
    bind, wait for every router's admission cache to see it, run again."""
    import asyncpg  # noqa: PLC0415

    from modelyard import budgets  # noqa: PLC0415

    conn = await asyncpg.connect(database_url)
    try:
        # The earlier runs' last cost events first: one written after the
        # budget exists counts against it, though its call came before `since`.
        await quiet_ledger(conn)
        since = await conn.fetchval("SELECT now()")
        await budgets.set_budget(conn, "global", "", period="monthly", limit=Decimal(10**9))
        await asyncio.sleep(3)
        jobs_s, ledger_s = await throughput(broker_url, database_url, n, "budgeted")
        for _ in range(100):  # the last releases reach the ledger
            held = int(await conn.fetchval("SELECT count(*) FROM budget_reservations"))
            if held == 0:
                break
            await asyncio.sleep(0.1)
        spent = await conn.fetchval("SELECT sum(spent) FROM budget_usage WHERE scope = 'global'")
        billed = await conn.fetchval(
            "SELECT coalesce(sum(cost), 0) FROM ledger WHERE occurred_at >= $1", since
        )
    finally:
        await conn.close()
    return Budgeted(jobs_s, ledger_s, spent, billed, held)


def report_budgets(budgeted: Budgeted, off_jobs_s: float) -> None:
    """Print the budgeted run beside the plain one."""
    print(f"  ... with a budget on every job: {budgeted.jobs_s:7.0f} jobs/s")
    print(f"  budgets on / off             : {budgeted.jobs_s / off_jobs_s:8.2f}")
    verdict = "equal" if budgeted.spent == budgeted.billed else "DIFFERENT"
    print(
        f"  budget spent / ledger        : {budgeted.spent:.6f} / {budgeted.billed:.6f} "
        f"({verdict}), reservations left: {budgeted.held}"
    )


STAGES = ("submit -> router", "router -> worker", "provider call", "worker -> client")


async def latency(broker_url: str, n: int) -> tuple[list[float], dict[str, list[float]]]:
    """Submit-to-result times of one job at a time, and where each one went:
    the stage gaps come from the result's own timestamps."""
    samples = []
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    async with await Client.connect(broker_url) as client:
        for job in jobs(n, "latency"):
            started = time.perf_counter()
            result = await client.complete(job, timeout=10)
            received = time.time()
            samples.append((time.perf_counter() - started) * 1000)
            assert result.status == "ok", result.error
            t = result.timings
            marks = (t.submitted_at, t.routed_at, t.started_at, t.finished_at, received)
            if None in marks:
                raise RuntimeError(f"result without stage timings: {t}")
            for name, a, b in zip(STAGES, marks, marks[1:], strict=False):
                stages[name].append((b - a) * 1000)  # type: ignore[operator]
    return samples, stages


async def direct(port: int, n: int, concurrency: int) -> float:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "bench direct"}]}
    headers = {"authorization": "Bearer bench-key"}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one() -> None:
            async with slots, session.post(url, json=body, headers=headers) as r:
                await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - started)


async def warm_up(broker_url: str) -> None:
    async with await Client.connect(broker_url) as client:
        await asyncio.gather(*(client.complete(j, timeout=30) for j in jobs(200, "warm")))


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User+system CPU each process (and the broker and database) has used so far."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            out[name] = times.user + times.system
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        name = "rabbitmq" if proc.info["name"] == "beam.smp" else None
        if proc.info["name"] and proc.info["name"].startswith("postgres"):
            name = "postgres"
        if name and (times := proc.info["cpu_times"]) is not None:
            out[name] = out.get(name, 0.0) + times.user + times.system
    return out


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--latency-jobs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=128, help="worker pool concurrency")
    parser.add_argument("--logs", type=Path, help="keep each process's log in this directory")
    args = parser.parse_args()

    with TemporaryDirectory() as tmp, fresh_vhost() as broker_url, fresh_database() as database_url:
        port = free_port()
        doc = config_document(broker_url, database_url, port)
        doc["pools"]["main"]["concurrency"] = args.concurrency
        doc["ledger"] = {"batch_size": 500, "flush_ms": 20}
        config = str(write_config(Path(tmp) / "bench.yaml", doc))
        env = {"TEST_FAKE_KEY": "bench-key", "TEST_WRONG_KEY": "not-the-key"}
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        procs = {
            "fake": modelyard(
                "fake-provider",
                "--port",
                str(port),
                "--api-key",
                "bench-key",
                log=logs / "fake.log",
            ),
            "router": modelyard("--config", config, "router", env=env, log=logs / "router.log"),
            "worker": modelyard(
                "--config", config, "worker", "--pool", "main", env=env, log=logs / "worker.log"
            ),
            "ledger": modelyard("--config", config, "ledger", env=env, log=logs / "ledger.log"),
        }
        try:
            wait_for_port(port)
            try:
                asyncio.run(warm_up(broker_url))
            except TimeoutError:
                for name in ("router", "worker", "ledger", "fake"):
                    print(f"--- {name} log", (logs / f"{name}.log").read_text()[-1500:], sep="\n")
                raise
            pids = {**{n: p.pid for n, p in procs.items()}, "bench client": os.getpid()}
            before = cpu_seconds(pids)
            jobs_s, ledger_s = asyncio.run(throughput(broker_url, database_url, args.jobs))
            after = cpu_seconds(pids)
            samples, stages = asyncio.run(latency(broker_url, args.latency_jobs))
            budgeted = asyncio.run(with_budgets(broker_url, database_url, args.jobs))
            direct_s = asyncio.run(direct(port, args.jobs, args.concurrency))
            rss = {name: peak_rss_mb(p.pid) for name, p in procs.items()}
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(30)

    q = statistics.quantiles(samples, n=100)
    print(f"\nmodelyard pipeline benchmark ({args.jobs} jobs, pool concurrency {args.concurrency})")
    print(f"  batch lane, submit -> result : {jobs_s:8.0f} jobs/s")
    print(f"  batch lane, submit -> ledger : {ledger_s:8.0f} jobs/s")
    report_budgets(budgeted, jobs_s)
    print(f"  straight to the fake provider: {direct_s:8.0f} requests/s")
    print(f"  pipeline / direct            : {jobs_s / direct_s:8.2f}")
    print(
        f"  interactive latency at low load (1 in flight, {len(samples)} jobs):"
        f" p50 {q[49]:.2f} ms, p99 {q[98]:.2f} ms"
    )
    medians = (f"{name} {statistics.median(ms):.2f} ms" for name, ms in stages.items())
    print("    median per stage: " + ", ".join(medians))
    print("  peak RSS: " + ", ".join(f"{name} {mb:.0f} MiB" for name, mb in rss.items()))
    spent = {name: (after[name] - before.get(name, 0.0)) * 1000 / args.jobs for name in after}
    print("  CPU per job during the throughput run (ms): ", end="")
    ranked = sorted(spent.items(), key=lambda kv: -kv[1])
    print(", ".join(f"{name} {ms:.2f}" for name, ms in ranked))
    return 0


if __name__ == "__main__":
    sys.exit(main())
