"""Running Batch API batches: every gateway instance runs the batches it
holds a lease on, and takes over any whose holder stopped renewing.

A batch goes `validating` (its file read into lines; bad lines answered at
once, a file that cannot be a batch fails it), `in_progress` (lines
admitted with the owner's key, budgets and limits included, and sent on the
batch lane, a window at a time; answers read from the batch's durable
results queue and written onto their lines, each acked only once written),
`finalizing` (output and error files written) and `completed`; or, when
cancelled, `cancelling` (lines not yet sent are answered `batch_cancelled`;
those sent are awaited) and `cancelled`.

Nothing is billed twice across a takeover: a line is marked `sent` once the
broker confirmed it and is never sent again; only a line whose publish was
confirmed in the instant before its holder died can be sent a second time,
and it goes marked as a repeat, which workers skip when the first copy
already ran. Job ids are fixed per line, so the ledger and the results
count each line once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import structlog

from gateway import batch_store as store
from modelyard.batch import BatchInputError, _check_unique, parse_line
from modelyard.batching import settle_all
from modelyard.client import Client
from modelyard.database import TRANSIENT, Database
from modelyard.openai_format import batch_output_line
from modelyard.topology import batch_results_queue
from router.dispatch import Dispatcher
from router.keys import KeyRecord
from schemas.codec import decode_job, encode
from schemas.errors import ErrorKind, job_error
from schemas.jobs import CompletionJob, Metadata
from schemas.results import JobResult, Timings

log = structlog.get_logger("modelyard.batches")

LEASE = timedelta(seconds=15)
RENEW_EVERY_S = 4.0
# Lines sent and not yet answered, per batch: enough to keep a pool busy,
# few enough that a cancel stops most of a large batch.
WINDOW = 2000


class BatchRunner:
    """One gateway's share of the Batch API's work."""

    def __init__(self, dispatcher: Dispatcher, client: Client, db: Database) -> None:
        self.dispatcher, self.client, self.db = dispatcher, client, db
        self.name = uuid.uuid4().hex[:12]
        self._running: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()  # a new batch: look at once
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Start claiming and renewing leases."""
        self._loop = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        """Stop every runner and hand their batches back at once."""
        if self._loop is not None:
            # Not cancelled mid-statement: a pool cut off while connecting leaks.
            self._stopping.set()
            self.wake.set()
            await self._loop
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        held = list(self._running)
        if held:
            with contextlib.suppress(*TRANSIENT, ConnectionError):
                await self.db.run(
                    lambda c: store.release(c, self.name, held),
                    what="batch release",
                    give_up_after_s=2,
                )

    async def _supervise(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._tend()
            except (*TRANSIENT, ConnectionError) as exc:
                log.warning("batch leases unavailable", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), RENEW_EVERY_S)
            self.wake.clear()

    async def _tend(self) -> None:
        """Renew what we hold, drop what we lost, take what nobody holds."""
        for batch_id, task in list(self._running.items()):
            if task.done():
                del self._running[batch_id]
        held = list(self._running)
        if held:
            kept = await self.db.run(
                lambda c: store.renew(c, self.name, held, LEASE),
                what="batch lease renewal",
                give_up_after_s=RENEW_EVERY_S,
            )
            for lost in set(held) - kept:
                log.warning("batch lease lost", batch_id=lost)
                self._running.pop(lost).cancel()
        claimed = await self.db.run(
            lambda c: store.claim(c, self.name, LEASE, 16),
            what="batch claim",
            give_up_after_s=RENEW_EVERY_S,
        )
        for batch_id in claimed:
            log.info("batch taken", batch_id=batch_id, runner=self.name)
            self._running[batch_id] = asyncio.create_task(self._run(batch_id))

    async def _run(self, batch_id: str) -> None:
        try:
            await _Run(self, batch_id).run()
        except asyncio.CancelledError:
            raise
        except store.LeaseLost:
            log.warning("batch lease lost; another runner has it", batch_id=batch_id)
        except Exception:
            # Left to the lease: another runner (or this one) takes it again.
            log.exception("batch run failed; it will be taken over", batch_id=batch_id)


class _Run:
    """One batch, while this gateway holds it. Every write is fenced by the
    lease (`store.fence`): a run that lost it stops at its next write."""

    def __init__(self, runner: BatchRunner, batch_id: str) -> None:
        self.runner = runner
        self.db = runner.db
        self.batch_id = batch_id
        self.queue = batch_results_queue(batch_id)
        self.answered = asyncio.Event()

    async def run(self) -> None:
        row = await self._row()
        if row["status"] == "validating":
            if not await self._validate(row):
                return
            row = await self._row()
        await self.runner.client.declare_results_queue(self.queue)
        reader = asyncio.create_task(self._read_answers())
        try:
            final = await self._work(reader)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await self._finalize(final)

    async def _work(self, reader: asyncio.Task[None]) -> str:
        """Send, await and record until every line is answered; the status to close with."""
        resumed = True  # lines pending now may have been sent by a runner that died
        hold_until = 0.0  # lines held back (a rate limit, a budget in use) wait until then
        while True:
            if reader.done():
                reader.result()  # it failed: so does this run (and the batch is taken over)
            row = await self._row()
            tally = await self.db.run(lambda c: store.counts(c, self.batch_id), what="batch counts")
            if row["expires_at"] <= datetime.now(UTC):
                await self._close_unanswered(("pending", "sent"), "batch_expired", _EXPIRED)
                return "expired"
            if row["status"] == "cancelling" and tally["pending"]:
                await self._close_unanswered(("pending",), "batch_cancelled", _CANCELLED)
                continue
            if not tally["pending"] and not tally["sent"]:
                return "cancelled" if row["status"] == "cancelling" else "completed"
            room = WINDOW - tally["sent"]
            if tally["pending"] and room > 0 and time.monotonic() >= hold_until:
                wait = await self._send(room, resumed, in_flight=tally["sent"])
                resumed = False
                hold_until = time.monotonic() + wait
                if not wait:
                    continue
            self.answered.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.answered.wait(), 1.0)

    async def _row(self) -> Any:
        row = await self.db.run(
            lambda c: c.fetchrow("SELECT * FROM batches WHERE id = $1", self.batch_id),
            what="batch read",
        )
        assert row is not None
        return row

    async def _owner(self) -> KeyRecord | None:
        """The key the batch runs as, read afresh (a revoked key stops it):
        the newest key of the lineage that owns it, so a rotation carries
        the batch over to the new key."""
        from router import keys  # noqa: PLC0415

        async def newest(conn: Any) -> KeyRecord | None:
            lineage = await conn.fetchval(
                "SELECT owner_key FROM batches WHERE id = $1", self.batch_id
            )
            return None if lineage is None else await keys.newest_of(conn, lineage)

        return await self.db.run(newest, what="batch owner")

    async def _validate(self, row: Any) -> bool:
        """Read the input file into lines; False when the batch failed."""
        file = await self.db.run(
            lambda c: store.get_file(c, row["input_file_id"], row["owner_key"]), what="batch file"
        )
        owner = Metadata(team=row["team"], project=row["project"], user=row["user_id"])
        try:
            content = bytes(file["content"]) if file is not None else b""
            lines = _lines(content, self.batch_id, owner, row["expires_at"])
        except BatchInputError as exc:
            errors = [{"code": "invalid_file", "message": str(exc), "param": None, "line": None}]

            async def fail(conn: Any) -> None:
                await store.fence(conn, self.batch_id, self.runner.name)
                encoded = msgspec.json.encode(errors).decode()
                await store.set_status(conn, self.batch_id, "failed", errors=encoded)

            await self.db.run(fail, what="batch failed")
            log.info("batch failed validation", batch_id=self.batch_id, reason=str(exc))
            return False

        async def save(conn: Any) -> None:
            status = await store.fence(conn, self.batch_id, self.runner.name)
            await store.add_lines(conn, self.batch_id, lines)
            if status == "validating":  # a cancel that came meanwhile stands
                await store.set_status(conn, self.batch_id, "in_progress")

        await self.db.run(save, what="batch lines")
        log.info("batch in progress", batch_id=self.batch_id, lines=len(lines))
        return True

    async def _send(self, room: int, resumed: bool, *, in_flight: int) -> float:
        """The next lines, admitted as the owner and sent; refused ones
        answered. A line refused for a key's rate limit, or for a budget
        while other lines are in flight (their reservations come back), is
        held and tried again: the seconds to wait before that (0: none held)."""
        owner = await self._owner()
        rows = await self.db.run(
            lambda c: store.pending(c, self.batch_id, room), what="batch pending"
        )
        jobs: list[tuple[int, CompletionJob]] = []
        for row in rows:
            job = decode_job(bytes(row["body"]))
            job.reply_to = self.queue
            job.redelivered = resumed
            jobs.append((row["line"], job))
        refusals = await self.runner.dispatcher.admit([job for _, job in jobs], owner=owner)
        refused: list[tuple[str, bytes, bool, Any]] = []
        sends, sent, wait = [], [], 0.0
        for (line, job), refusal in zip(jobs, refusals, strict=True):
            if refusal is None:
                sends.append(self.runner.dispatcher.route(job))
                sent.append(line)
            elif refusal.kind == ErrorKind.RATE_LIMITED or (
                refusal.kind == ErrorKind.BUDGET_EXCEEDED and in_flight + len(sent) > 0
            ):
                wait = max(wait, min(refusal.retry_after_s or 1.0, 30.0))
            else:
                result = JobResult(job_id=job.id, status="error", error=refusal, timings=Timings())
                refused.append(
                    (job.id, batch_output_line(result, job.metadata.custom_id or ""), True, None)
                )
        await settle_all(sends)

        async def save(conn: Any) -> None:
            await store.fence(conn, self.batch_id, self.runner.name)
            await store.mark_sent(conn, self.batch_id, sent)
            await store.record(conn, self.batch_id, refused)

        await self.db.run(save, what="batch sent")
        return wait

    async def _read_answers(self) -> None:
        """Answers from the batch's queue onto their lines, all the answers
        of a message in one transaction; each message is acked (by asking
        for the next) only after its answers are written."""
        async for results in self.runner.client.result_groups(self.queue):
            answers = [
                (
                    result.job_id,
                    batch_output_line(result, result.metadata.custom_id or ""),
                    result.status != "ok",
                    result.cost,
                )
                for result in results
            ]
            await self._record(answers)
            self.answered.set()

    async def _record(self, answers: list[tuple[str, bytes, bool, Any]]) -> None:
        async def save(conn: Any) -> None:
            await store.fence(conn, self.batch_id, self.runner.name)
            await store.record(conn, self.batch_id, answers)

        await self.db.run(save, what="batch answer")

    async def _close_unanswered(self, states: tuple[str, ...], code: str, why: str) -> None:
        """Answer every line in `states` with an error line saying `why`."""
        rows = await self.db.run(
            lambda c: store.unanswered(c, self.batch_id, states), what="batch unanswered"
        )
        error = job_error(ErrorKind.INVALID_JOB, why)
        outputs = []
        for row in rows:
            result = JobResult(job_id=row["job_id"], status="error", error=error, timings=Timings())
            outputs.append((row["line"], batch_output_line(result, row["custom_id"], code=code)))

        async def save(conn: Any) -> None:
            await store.fence(conn, self.batch_id, self.runner.name)
            await store.settle_unanswered(conn, self.batch_id, outputs, states)

        await self.db.run(save, what="batch close")

    async def _finalize(self, final: str) -> None:
        """Write the output and error files, total the cost, and close the batch."""

        async def finish(conn: Any) -> None:
            await store.fence(conn, self.batch_id, self.runner.name)
            row = await conn.fetchrow("SELECT owner_key FROM batches WHERE id = $1", self.batch_id)
            await store.set_status(conn, self.batch_id, "finalizing")
            columns: dict[str, Any] = {}
            for failed, column in ((False, "output_file_id"), (True, "error_file_id")):
                content = await store.outputs(conn, self.batch_id, failed)
                if content:
                    name = f"{self.batch_id}_{'error' if failed else 'output'}.jsonl"
                    made = await store.add_file(
                        conn,
                        purpose="batch_output",
                        filename=name,
                        content=content,
                        owner=row["owner_key"],
                    )
                    columns[column] = made["id"]
            tally = await store.counts(conn, self.batch_id)
            await store.set_status(conn, self.batch_id, final, cost=tally["cost"], **columns)

        await self.db.run(finish, what="batch finalize")
        await self.runner.client.delete_queue(self.queue)
        log.info("batch finished", batch_id=self.batch_id, status=final)


_EXPIRED = "the batch's completion window ended before this line was answered"
_CANCELLED = "the batch was cancelled before this line was sent"


def _lines(
    data: bytes, batch_id: str, owner: Metadata, deadline: Any
) -> list[tuple[int, str, str, bytes | None, bytes | None, bool]]:
    """The file's lines as stored: a job to send, or the error line a bad one gets."""
    lines: list[tuple[int, str, str, bytes | None, bytes | None, bool]] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        custom_id, parsed = parse_line(raw, number, batch_id, owner)
        if isinstance(parsed, JobResult):
            lines.append(
                (number, custom_id, parsed.job_id, None, batch_output_line(parsed, custom_id), True)
            )
        else:
            parsed.deadline = deadline
            lines.append((number, custom_id, parsed.id, encode(parsed), None, False))
    if not lines:
        raise BatchInputError("the input file is empty, or no longer exists")
    _check_unique([custom_id for _, custom_id, *_ in lines])
    return lines
