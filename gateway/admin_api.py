"""The admin API under `/admin/`, guarded by the master key: keys, model
approvals, budgets and current spend. Each endpoint builds the same
operation the CLI builds (`modelyard/admin.py`) and runs it with the same
code; answers are `{"object": "list", "data": [rows]}`, rows as the CLI's
`--format json` prints them.

The master key is read from the environment variable `gateway.master_key_env`
names (`MODELYARD_MASTER_KEY`) when the gateway starts; without one, the
admin API answers 403 to everyone.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from gateway.http import bearer, json_response
from gateway.openai_api import GATEWAY
from modelyard import admin

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
    body = {
        "error": {
            "message": message,
            "type": kind.get(status, "invalid_request_error"),
            "param": param,
            "code": None,
        }
    }
    return json_response(body, status=status)


def _guarded(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        gateway = request.app[GATEWAY]
        master = os.environ.get(gateway.settings.master_key_env, "")
        if not master:
            return _error(
                403,
                f"the admin API is off: set {gateway.settings.master_key_env} "
                "in the gateway's environment",
            )
        given = bearer(request) or ""
        if not hmac.compare_digest(given.encode(), master.encode()):
            return _error(401, "the admin API needs the master key as a bearer token")
        return await handler(request)

    return guarded


async def _run(request: web.Request, op: admin.Operation) -> web.Response:
    gateway = request.app[GATEWAY]
    try:
        outcome = await gateway.db_run(
            lambda conn: admin.perform(conn, op, gateway.config), what="admin"
        )
    except admin.NotFound as exc:
        return _error(404, str(exc))
    except ValueError as exc:
        return _error(400, str(exc))
    return json_response({"object": "list", "data": outcome.rows})


async def _body(request: web.Request, kind: type[Any], **path: Any) -> Any:
    """The operation from the JSON body (if any) and the path's parts."""
    raw = await request.read()
    fields = msgspec.json.decode(raw) if raw.strip() else {}
    if not isinstance(fields, dict):
        raise msgspec.ValidationError("Expected `object`")
    return msgspec.convert({**fields, **path}, kind)


def _operation(kind: type[Any], *names: str) -> Handler:
    """A handler running `kind`, built from the body and the path's `names`."""

    async def handle(request: web.Request) -> web.StreamResponse:
        path = {name: request.match_info[name] for name in names if name in request.match_info}
        try:
            op = await _body(request, kind, **path)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _error(400, f"invalid request: {exc}")
        return await _run(request, op)

    return _guarded(handle)


def _query(kind: type[Any]) -> Handler:
    """A handler running `kind`, built from the query string."""

    async def handle(request: web.Request) -> web.StreamResponse:
        fields: dict[str, Any] = dict(request.query)
        if "all" in fields:
            fields["all"] = fields["all"].lower() in ("1", "true", "yes")
        fields.update(request.match_info)
        try:
            op = msgspec.convert(fields, kind)
        except msgspec.ValidationError as exc:
            return _error(400, f"invalid request: {exc}")
        return await _run(request, op)

    return _guarded(handle)


def _decide(action: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            op = await _body(
                request, admin.DecideModel, model=request.match_info["model"], action=action
            )
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _error(400, f"invalid request: {exc}")
        return await _run(request, op)

    return _guarded(handle)


def add_routes(app: web.Application) -> None:
    """Every `/admin/` endpoint."""
    routes = app.router
    routes.add_post("/admin/keys", _operation(admin.CreateKey))
    routes.add_get("/admin/keys", _query(admin.ListKeys))
    routes.add_post("/admin/keys/{key_id}/rotate", _operation(admin.RotateKey, "key_id"))
    routes.add_post("/admin/keys/{key_id}/revoke", _operation(admin.RevokeKey, "key_id"))
    routes.add_get("/admin/models", _query(admin.ListModels))
    routes.add_get("/admin/models/history", _query(admin.ModelHistory))
    routes.add_post("/admin/models/{model}/approve", _decide("approve"))
    routes.add_post("/admin/models/{model}/revoke", _decide("revoke"))
    routes.add_get("/admin/budgets", _query(admin.ListBudgets))
    for path in ("/admin/budgets/{scope}", "/admin/budgets/{scope}/{subject}"):
        routes.add_put(path, _operation(admin.SetBudget, "scope", "subject"))
        routes.add_get(path, _query(admin.ShowBudget))
