"""OpenAI's Files and Batch APIs: upload a JSONL file, create a batch from
it, poll it, download its output and error files, cancel it. Run by
modelyard's own batch lane on any provider (`gateway/batch_runner.py`),
never passed through to one provider's batch API.

A file or batch belongs to the key that created it (or to callers without
a key, where keys are optional): another key sees a 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from msgspec import Meta

from gateway import batch_store as store
from gateway.http import bearer, json_response, virtual_key
from gateway.openai_api import GATEWAY, error_response
from gateway.service import Gateway
from modelyard.batch import CHAT_URL
from router.keys import KeyRecord
from schemas.codec import InvalidMessage, decode_with
from schemas.errors import ErrorKind, JobError, job_error


class BatchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A `POST /v1/batches` body."""

    input_file_id: Annotated[str, Meta(min_length=1, max_length=64)]
    endpoint: Literal["/v1/chat/completions"]
    completion_window: Literal["24h"]
    metadata: (
        Annotated[dict[str, Annotated[str, Meta(max_length=512)]], Meta(max_length=16)] | None
    ) = None


_batch_request = msgspec.json.Decoder(BatchRequest)


def _not_found(what: str) -> web.Response:
    return error_response(job_error(ErrorKind.NOT_FOUND, f"no {what}", field=None), status=404)


OwnedHandler = Callable[[web.Request, Gateway, KeyRecord | None], Awaitable[web.Response]]


def _owned(handler: OwnedHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler given the key the caller holds (None without one, where
    keys are optional); a refused key is answered before it runs."""

    async def handle(request: web.Request) -> web.Response:
        gateway = request.app[GATEWAY]
        secret = virtual_key(bearer(request), required=gateway.config.access.require_key)
        owner = await gateway.dispatcher.admission.identify(secret)
        if isinstance(owner, JobError):
            return error_response(owner)
        return await handler(request, gateway, owner)

    return handle


async def _upload_file(
    request: web.Request, gateway: Gateway, owner: KeyRecord | None
) -> web.Response:
    """`POST /v1/files` (multipart: `file`, `purpose` = `batch`)."""
    if not request.content_type.startswith("multipart/"):
        return _bad("upload the file as multipart/form-data with `file` and `purpose`", "file")
    limit = gateway.settings.max_file_bytes
    try:
        upload = await _upload(request, limit)
    except (HttpProcessingError, ValueError, AssertionError) as exc:
        # aiohttp's multipart reader raises these on a malformed body.
        return _bad(f"the upload is not valid multipart/form-data: {exc}", "file")
    if upload is None:
        error = {
            "message": f"the file is over {limit} bytes",
            "type": "invalid_request_error",
            "param": "file",
            "code": None,
        }
        return json_response({"error": error}, status=413)
    purpose, filename, content = upload
    if purpose != "batch" or not content:
        problem = "the file is empty" if content else "only `purpose` `batch` is supported"
        return _bad(problem, "file" if purpose == "batch" else "purpose")
    made = await gateway.db_run(
        lambda c: store.add_file(
            c, purpose="batch", filename=filename, content=content, owner=_key_id(owner)
        ),
        what="file upload",
    )
    return json_response(made)


async def _upload(request: web.Request, limit: int) -> tuple[str | None, str, bytes] | None:
    """(purpose, filename, content) of a multipart upload; None when the
    file is over `limit` bytes."""
    purpose, filename, content = None, "upload.jsonl", b""
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            text = await _read_part(part, 64)
            purpose = text.decode(errors="replace").strip() if text is not None else "?"
        elif part.name == "file":
            filename = _plain(part.filename) or filename
            read = await _read_part(part, limit)
            if read is None:
                return None
            content = read
    return purpose, filename, content


async def _read_part(part: BodyPartReader, limit: int) -> bytes | None:
    data = bytearray()
    while chunk := await part.read_chunk(64 * 1024):
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


async def _get_file(
    request: web.Request, gateway: Gateway, owner: KeyRecord | None
) -> web.Response:
    """`GET /v1/files/{id}`."""
    found = await _file(request, gateway, owner)
    return found if isinstance(found, web.Response) else json_response(store.file_object(found))


async def _file_content(
    request: web.Request, gateway: Gateway, owner: KeyRecord | None
) -> web.Response:
    """`GET /v1/files/{id}/content`: the file itself."""
    found = await _file(request, gateway, owner)
    if isinstance(found, web.Response):
        return found
    return web.Response(body=bytes(found["content"]), content_type="application/jsonl")


async def _delete_file(
    request: web.Request, gateway: Gateway, owner: KeyRecord | None
) -> web.Response:
    """`DELETE /v1/files/{id}`."""
    file_id = request.match_info["file_id"]
    gone = await gateway.db_run(
        lambda c: store.delete_file(c, file_id, _key_id(owner)), what="file delete"
    )
    if not gone:
        return _not_found(f"file {file_id!r}")
    return json_response({"id": file_id, "object": "file", "deleted": True})


async def _file(request: web.Request, gateway: Gateway, owner: KeyRecord | None) -> Any:
    file_id = request.match_info["file_id"]
    found = await gateway.db_run(
        lambda c: store.get_file(c, file_id, _key_id(owner)), what="file read"
    )
    return found if found is not None else _not_found(f"file {file_id!r}")


async def _create_batch(
    request: web.Request, gateway: Gateway, owner: KeyRecord | None
) -> web.Response:
    """`POST /v1/batches`: the batch starts `validating`; any gateway runs it."""
    try:
        asked = decode_with(_batch_request, await request.read())
    except InvalidMessage as exc:
        return error_response(exc.to_error())
    file = await gateway.db_run(
        lambda c: store.get_file(c, asked.input_file_id, _key_id(owner)), what="batch file"
    )
    if file is None:
        return _not_found(f"file {asked.input_file_id!r}")
    if file["purpose"] != "batch":
        return _bad(f"file {asked.input_file_id!r} is not a `batch` file", "input_file_id")
    principal = store.Owner(
        key_id=_key_id(owner),
        team=owner.team if owner else None,
        project=owner.project if owner else None,
        user=owner.user if owner else None,
    )
    made = await gateway.db_run(
        lambda c: store.create_batch(
            c,
            input_file_id=asked.input_file_id,
            endpoint=CHAT_URL,
            window=timedelta(hours=24),
            metadata=asked.metadata,
            owner=principal,
        ),
        what="batch create",
    )
    gateway.batches.wake.set()
    return json_response(made)


async def _get_batch(
    request: web.Request, gateway: Gateway, owner: KeyRecord | None
) -> web.Response:
    """`GET /v1/batches/{id}`."""
    return await _batch_answer(request, gateway, owner, cancel=False)


async def _cancel_batch(
    request: web.Request, gateway: Gateway, owner: KeyRecord | None
) -> web.Response:
    """`POST /v1/batches/{id}/cancel`: lines not sent yet are not sent."""
    return await _batch_answer(request, gateway, owner, cancel=True)


async def _batch_answer(
    request: web.Request, gateway: Gateway, owner: KeyRecord | None, *, cancel: bool
) -> web.Response:
    batch_id = request.match_info["batch_id"]
    key_id = _key_id(owner)

    async def read(conn: Any) -> dict[str, Any] | None:
        row = await (store.cancel if cancel else store.get_batch)(conn, batch_id, key_id)
        return None if row is None else await store.batch_object(conn, row)

    found = await gateway.db_run(read, what="batch read")
    if found is None:
        return _not_found(f"batch {batch_id!r}")
    if cancel:
        gateway.batches.wake.set()
    return json_response(found)


async def _list_batches(
    request: web.Request, gateway: Gateway, owner: KeyRecord | None
) -> web.Response:
    """`GET /v1/batches?limit=&after=`: newest first."""
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        return _bad("`limit` is a whole number from 1 to 100", "limit")
    if not 1 <= limit <= 100:
        return _bad("`limit` is a whole number from 1 to 100", "limit")
    after = request.query.get("after")

    async def read(conn: Any) -> dict[str, Any]:
        rows, more = await store.list_batches(conn, _key_id(owner), after=after, limit=limit)
        data = [await store.batch_object(conn, row) for row in rows]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }

    return json_response(await gateway.db_run(read, what="batch list"))


def _plain(name: str | None) -> str:
    """A file name as kept: no control characters (Postgres refuses NUL), at most 255."""
    return "".join(ch for ch in name or "" if ch.isprintable())[:255]


def _key_id(owner: KeyRecord | None) -> str | None:
    """What owns files and batches: the key's lineage, so a rotated key
    keeps reaching them."""
    return owner.lineage if owner is not None else None


def _bad(message: str, param: str) -> web.Response:
    return error_response(job_error(ErrorKind.INVALID_JOB, message, field=f"$.{param}"))


upload_file = _owned(_upload_file)
get_file = _owned(_get_file)
file_content = _owned(_file_content)
delete_file = _owned(_delete_file)
create_batch = _owned(_create_batch)
get_batch = _owned(_get_batch)
cancel_batch = _owned(_cancel_batch)
list_batches = _owned(_list_batches)
