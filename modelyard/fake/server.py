"""The fake provider's aiohttp application, its admin routes, and ways to run it.

Admin routes (under ``/_fake``) let tests read and clear the request log,
forget cached prompts and change the settings of a running server.
Nothing is logged or printed per request: the access log is off, since the
benchmark runs thousands of requests per second through one process.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from modelyard.fake import anthropic, azure, gemini, mistral, openai
from modelyard.fake.settings import FakeSettings
from modelyard.fake.state import STATE, FakeState

MAX_BODY_BYTES = 32 * 1024 * 1024  # long prompts are the point of some tests
_JSON = "application/json"
_encode = msgspec.json.Encoder().encode


def create_app(settings: FakeSettings) -> web.Application:
    """An application serving every fake wire format and the admin routes."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE] = FakeState(settings)
    openai.add_routes(app)
    anthropic.add_routes(app)
    gemini.add_routes(app)
    mistral.add_routes(app)
    azure.add_routes(app)
    app.router.add_get("/_fake/requests", _get_requests)
    app.router.add_delete("/_fake/requests", _delete_requests)
    app.router.add_delete("/_fake/cache", _delete_cache)
    app.router.add_get("/_fake/settings", _get_settings)
    app.router.add_put("/_fake/settings", _put_settings)
    return app


async def start(host: str, port: int, settings: FakeSettings) -> tuple[web.AppRunner, int]:
    """Start serving in the running loop; returns the runner (to ``cleanup()``) and the bound port.

    Handlers are cancelled when their client disconnects, so an abandoned hang
    ends (and is logged) at once instead of after ``hang_s``.
    """
    runner = web.AppRunner(create_app(settings), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port: int = runner.addresses[0][1]
    return runner, bound_port


async def serve(host: str, port: int, settings: FakeSettings) -> None:
    """Serve until cancelled, then close every connection."""
    runner, _ = await start(host, port, settings)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _get_requests(request: web.Request) -> web.Response:
    """The request log, oldest first."""
    return _json(request.app[STATE].log.entries())


async def _delete_requests(request: web.Request) -> web.Response:
    request.app[STATE].log.clear()
    return web.Response(status=204)


async def _delete_cache(request: web.Request) -> web.Response:
    """Forget every cached prompt prefix, so the next call has no cached tokens."""
    request.app[STATE].cache.clear()
    return web.Response(status=204)


async def _get_settings(request: web.Request) -> web.Response:
    return _json(request.app[STATE].settings)


async def _put_settings(request: web.Request) -> web.Response:
    """Replace the fields given (any subset) and restart the dice; answers all settings."""
    state = request.app[STATE]
    try:
        patch = msgspec.json.decode(await request.read(), type=dict[str, Any])
        settings = msgspec.convert(msgspec.structs.asdict(state.settings) | patch, FakeSettings)
    except msgspec.DecodeError as error:  # ValidationError included
        return _json({"error": str(error)}, status=400)
    state.configure(settings)
    return _json(settings)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_encode(value), content_type=_JSON)
