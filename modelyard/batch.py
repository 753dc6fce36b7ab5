"""`modelyard submit FILE.jsonl`: an OpenAI Batch API input file through modelyard.

Resumable by construction. The batch id is derived from the input's content,
so a re-run finds the same durable results queue. Two files next to the
output record progress: the output itself (finished lines, never re-run) and
`OUTPUT.submitted` (lines the broker confirmed; their results are awaited,
not re-submitted, so nothing is billed twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import Coroutine, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from modelyard.client import Client, new_trace
from modelyard.openai_format import batch_output_line
from modelyard.topology import batch_results_queue
from schemas.chat import ChatRequest
from schemas.errors import ErrorKind, job_error
from schemas.jobs import CompletionJob, Metadata
from schemas.results import JobResult, Timings

_NAMESPACE = uuid.UUID("5b0c6f8e-8a47-4f0e-9b7c-6d1f1c1d2a10")
CHAT_URL = "/v1/chat/completions"


class BatchLine(msgspec.Struct, forbid_unknown_fields=False):
    """One input line (OpenAI Batch API format)."""

    custom_id: str
    method: str
    url: str
    body: ChatRequest


class BatchSummary(msgspec.Struct):
    """What a finished batch did."""

    batch_id: str
    total: int
    ok: int
    errors: int
    skipped: int
    cost: Decimal


_line_decoder = msgspec.json.Decoder(BatchLine)


def batch_id_for(data: bytes) -> str:
    """A stable id for an input file's content: re-runs resume the same batch."""
    return "b" + hashlib.sha256(data).hexdigest()[:16]


def parse_line(
    raw: bytes, number: int, batch_id: str, owner: Metadata | None = None
) -> tuple[str, CompletionJob | JobResult]:
    """A job for a valid line, or the error result a bad line is answered with."""
    custom_id = f"line-{number}"
    try:
        line = _line_decoder.decode(raw)
        custom_id = line.custom_id
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        custom_id = _salvaged_custom_id(raw) or custom_id
        return custom_id, _bad_line(batch_id, custom_id, f"line {number}: {exc}", None)
    except RecursionError:
        message = f"line {number}: JSON nested too deeply to decode"
        return custom_id, _bad_line(batch_id, custom_id, message, "$")
    if line.method.upper() != "POST" or line.url != CHAT_URL:
        message = f"line {number}: only POST {CHAT_URL} is supported, got {line.method} {line.url}"
        return custom_id, _bad_line(batch_id, custom_id, message, "$.url")
    job = CompletionJob(
        id=uuid.uuid5(_NAMESPACE, f"{batch_id}/{custom_id}").hex,
        request=line.body,
        metadata=msgspec.structs.replace(
            owner or Metadata(), batch_id=batch_id, custom_id=custom_id
        ),
        priority="batch",
        trace=new_trace(),
    )
    return custom_id, job


class _CustomIdOnly(msgspec.Struct):
    custom_id: str


_custom_id_decoder = msgspec.json.Decoder(_CustomIdOnly)


def _salvaged_custom_id(raw: bytes) -> str | None:
    """The `custom_id` of a line that is otherwise bad, so its answer names it."""
    try:
        return _custom_id_decoder.decode(raw).custom_id
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None


def _bad_line(batch_id: str, custom_id: str, message: str, field: str | None) -> JobResult:
    """The `invalid_job` answer for a line that cannot become a job."""
    error = job_error(ErrorKind.INVALID_JOB, message, field=field)
    job_id = uuid.uuid5(_NAMESPACE, f"{batch_id}/{custom_id}").hex
    return JobResult(job_id=job_id, status="error", error=error, timings=Timings())


class BatchInputError(ValueError):
    """The input file as a whole cannot be run, or the run cannot go on."""


class EarlierRuns(msgspec.Struct):
    """What the files next to the output say about earlier runs."""

    done: set[str]  # custom_ids with a result in the output
    submitted: set[str]  # custom_ids the broker confirmed, results maybe pending


def _complete_lines(path: Path) -> list[bytes]:
    """The file's whole lines; a torn last line (a crash mid-write) is cut off
    the file itself, so the next append starts on a fresh line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    return data[:end].splitlines()


def read_progress(
    output: Path, sidecar: Path, batch_id: str, job_ids: dict[str, str]
) -> EarlierRuns:
    """Finished and submitted lines of this batch from earlier runs.

    An output holding results of another input (its request ids do not match
    this input's jobs) is refused rather than mixed; a sidecar from another
    input is ignored (those jobs belong to another batch queue).
    """
    done: set[str] = set()
    for raw in _complete_lines(output):
        line = msgspec.json.decode(raw)
        custom_id = line.get("custom_id")
        if line.get("id") != f"batch_req_{job_ids.get(custom_id, '')}":
            raise BatchInputError(
                f"{output} holds results of a different input (custom_id {custom_id!r}); "
                "choose another --output, or remove it to start over"
            )
        done.add(custom_id)
    lines = _complete_lines(sidecar)
    submitted: set[str] = set()
    if lines and msgspec.json.decode(lines[0]) == {"batch_id": batch_id}:
        submitted = {msgspec.json.decode(raw) for raw in lines[1:]}
    return EarlierRuns(done=done, submitted=submitted)


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(data.splitlines(), start=1):
        if raw.strip():
            yield number, raw


def _check_unique(custom_ids: list[str]) -> None:
    seen: set[str] = set()
    for cid in custom_ids:
        if cid in seen:
            raise BatchInputError(
                f"custom_id {cid!r} appears more than once; each line needs its own"
            )
        seen.add(cid)


async def run_batch(
    client: Client,
    input_path: Path,
    output_path: Path,
    *,
    owner: Metadata | None = None,
    show_progress: bool = True,
) -> BatchSummary:
    """Submit every unfinished line and write results as they arrive.

    `owner` (team, project, user) is stamped on every job, so the batch's
    spend is attributed in the ledger. Returns once every line has its
    result in the output; the batch's queue and sidecar are removed then,
    and only then.
    """
    data = await asyncio.to_thread(input_path.read_bytes)
    batch_id = batch_id_for(data)
    queue = batch_results_queue(batch_id)
    sidecar = output_path.with_name(output_path.name + ".submitted")
    parsed = [parse_line(raw, n, batch_id, owner) for n, raw in _lines(data)]
    _check_unique([cid for cid, _ in parsed])
    job_ids = {
        cid: (item.id if isinstance(item, CompletionJob) else item.job_id) for cid, item in parsed
    }
    custom_by_job = {job_id: cid for cid, job_id in job_ids.items()}
    progress = read_progress(output_path, sidecar, batch_id, job_ids)
    done = progress.done
    await client.declare_results_queue(queue)
    summary = BatchSummary(batch_id, len(parsed), 0, 0, len(done), Decimal(0))
    fresh_sidecar = not progress.submitted
    with (
        output_path.open("ab") as out,
        sidecar.open("wb" if fresh_sidecar else "ab") as sub,
        _progress(show_progress) as bar,
    ):
        task = bar.add_task(f"batch {batch_id}", total=len(parsed), completed=len(done))
        if fresh_sidecar:
            sub.write(msgspec.json.encode({"batch_id": batch_id}) + b"\n")

        def record(result: JobResult) -> None:
            custom_id = custom_by_job.get(result.job_id)
            if custom_id is None or custom_id in done:
                return
            out.write(batch_output_line(result, custom_id))
            out.flush()
            done.add(custom_id)
            summary.ok += result.status == "ok"
            summary.errors += result.status == "error"
            summary.cost += result.cost or 0
            bar.advance(task)

        for _, item in parsed:
            if isinstance(item, JobResult):
                record(item)
        to_send = [
            item
            for cid, item in parsed
            if isinstance(item, CompletionJob) and cid not in done and cid not in progress.submitted
        ]

        def confirmed(job: CompletionJob) -> None:
            # Flushed per line: a crash must not forget a confirmed job, or a
            # re-run would submit (and bill) it again.
            sub.write(msgspec.json.encode(job.metadata.custom_id) + b"\n")
            sub.flush()

        async def collect() -> None:
            if len(done) >= len(parsed):
                return
            # aclosing: leaving the loop closes the consumer now, not at GC.
            async with contextlib.aclosing(client.results(queue, exclusive=True)) as results:
                async for result in results:
                    record(result)
                    if len(done) >= len(parsed):
                        return

        await _send_and_collect(
            client.submit_many(to_send, queue, on_confirmed=confirmed), collect()
        )
    await client.delete_queue(queue)
    sidecar.unlink(missing_ok=True)
    return summary


async def _send_and_collect(
    sending: Coroutine[Any, Any, int], collecting: Coroutine[Any, Any, None]
) -> None:
    """Run both; a failed submit stops the wait for results (which would
    otherwise wait forever for jobs never sent) and is raised."""
    sender = asyncio.ensure_future(sending)
    collector = asyncio.ensure_future(collecting)
    finished, _ = await asyncio.wait({sender, collector}, return_when=asyncio.FIRST_EXCEPTION)
    failed = next((t for t in finished if t.exception() is not None), None)
    if failed is None:
        await asyncio.gather(sender, collector)
        return
    for task in (sender, collector):
        task.cancel()
    await asyncio.gather(sender, collector, return_exceptions=True)
    raise BatchInputError(f"the batch stopped: {failed.exception()}; run it again to resume")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
