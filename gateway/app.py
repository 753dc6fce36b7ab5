"""The gateway's aiohttp application: routes, and the middleware that counts
every request and turns anything unexpected into a clean 500 (logged, never
a traceback to the client)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway import admin_api, anthropic_api, batch_api, openai_api
from gateway.http import MODEL, STREAMING, json_response
from gateway.openapi import document
from gateway.service import Gateway
from modelyard import ops
from modelyard.database import TRANSIENT

log = structlog.get_logger("modelyard.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(gateway: Gateway) -> web.Application:
    """The application one gateway instance serves."""
    # Uploads are read part by part against `max_file_bytes`, not this limit.
    app = web.Application(
        middlewares=[_observed(gateway)], client_max_size=gateway.settings.max_body_bytes
    )
    app[openai_api.GATEWAY] = gateway
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_get("/v1/models/{model}", openai_api.get_model)
    app.router.add_post("/v1/messages", anthropic_api.messages)
    app.router.add_post("/v1/files", batch_api.upload_file)
    app.router.add_get("/v1/files/{file_id}", batch_api.get_file)
    app.router.add_get("/v1/files/{file_id}/content", batch_api.file_content)
    app.router.add_delete("/v1/files/{file_id}", batch_api.delete_file)
    app.router.add_post("/v1/batches", batch_api.create_batch)
    app.router.add_get("/v1/batches", batch_api.list_batches)
    app.router.add_get("/v1/batches/{batch_id}", batch_api.get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", batch_api.cancel_batch)
    app.router.add_get("/openapi.json", _openapi)
    admin_api.add_routes(app)
    ops.add_routes(app, gateway.readiness, gateway.registry)
    return app


async def _openapi(_: web.Request) -> web.Response:
    return json_response(document())


def _observed(gateway: Gateway) -> Middleware:
    metrics = gateway.metrics

    @web.middleware
    async def observed(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        metrics.in_flight.labels(name).inc()
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except ConnectionResetError:
            status = 499  # the client went away mid-answer (nginx's code)
            raise
        except (*TRANSIENT, ConnectionError) as exc:
            if request.get(STREAMING):
                raise
            log.warning("database unavailable", route=name, error=str(exc))
            status = 503
            return _error(503, "the gateway cannot reach its database; try again shortly")
        except Exception:
            log.exception("request failed", route=name)
            if request.get(STREAMING):
                raise  # its status line is out: the connection is closed instead
            return _error(500, "internal error")
        finally:
            metrics.in_flight.labels(name).dec()
            metrics.latency.labels(name).observe(time.perf_counter() - started)
            metrics.requests.labels(name, str(status), _model_label(gateway, request)).inc()

    return observed


def _error(status: int, message: str) -> web.Response:
    error = {"message": message, "type": "api_error", "param": None, "code": None}
    headers = {"retry-after": "5"} if status == 503 else None
    return json_response({"error": error}, status=status, headers=headers)


def _model_label(gateway: Gateway, request: web.Request) -> str:
    """The model group asked for: a configured name only, so a client
    cannot grow the metrics without bound by inventing names."""
    group = gateway.dispatcher.routes.resolve(request.get(MODEL) or "")
    return group.name if group is not None else ""
