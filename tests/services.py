"""Real RabbitMQ and PostgreSQL for tests: a fresh vhost and database each time.

The servers outlive the test run (CI reuses them), so every run gets its own
vhost and database and removes them afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import yaml

RABBIT = os.environ.get("MODELYARD_TEST_RABBIT", "guest:guest@127.0.0.1:5672")
PG = os.environ.get("MODELYARD_TEST_PG", "postgres@127.0.0.1:5432")


def rabbitmqctl(*args: str) -> None:
    """Run `rabbitmqctl` quietly; raises if it fails."""
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def fresh_vhost() -> Iterator[str]:
    """A new vhost the guest user may use; yields its AMQP URL, deletes it after."""
    name = f"modelyard-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://{RABBIT}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(f"postgresql://{PG}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_database(*, migrated: bool = True) -> Iterator[str]:
    """A new database, migrated unless asked not to; yields its URL, drops it after."""
    from modelyard.database import ensure_database, migrate  # noqa: PLC0415

    name = f"modelyard_test_{uuid.uuid4().hex[:10]}"
    url = f"postgresql://{PG}/{name}"
    try:
        asyncio.run(migrate(url) if migrated else ensure_database(url))
        yield url
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts connections on the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def modelyard(
    *args: str, log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a `modelyard` CLI process (stdout/stderr to `log` when given)."""
    if log is None:
        return subprocess.Popen(
            [sys.executable, "-m", "modelyard.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "modelyard.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


# One deployment per provider wire format, all served by the fake provider.
PROVIDER_MODELS: dict[str, dict[str, Any]] = {
    "via-openai": {"provider": "openai", "model": "gpt-4o-mini", "path": "/v1"},
    "via-azure": {
        "provider": "azure",
        "model": "gpt-4o-mini",
        "path": "",
        "options": {"api_version": "2024-10-21"},
        "price_provider": "openai",
    },
    "via-anthropic": {"provider": "anthropic", "model": "claude-sonnet-4-5", "path": ""},
    "via-gemini": {
        "provider": "gemini",
        "model": "gemini-2.5-flash",
        "path": "",
        "price_provider": "google",
    },
    "via-mistral": {"provider": "mistral", "model": "mistral-small-latest", "path": "/mistral/v1"},
    "via-compat": {
        "provider": "openai",
        "model": "llama-3.1-8b-instant",
        "path": "/v1",
        "options": {
            "rename_params": {"max_completion_tokens": "max_tokens"},
            "drop_params": ["user"],
        },
        "price": {
            "input_per_mtok": "0.05",
            "output_per_mtok": "0.08",
            "cache_read_per_mtok": "0.025",
        },
    },
}


def provider_deployments(fake_port: int) -> dict[str, dict[str, Any]]:
    """The deployments of `PROVIDER_MODELS` pointed at the fake provider."""
    out = {}
    for name, spec in PROVIDER_MODELS.items():
        entry = {k: v for k, v in spec.items() if k != "path"}
        entry.update(
            api_base=f"http://127.0.0.1:{fake_port}{spec['path']}",
            pool="providers",
            timeout_s=5,
            api_key_env="TEST_FAKE_KEY",
        )
        out[name] = entry
    return out


def fake_deployment(port: int, **extra: Any) -> dict[str, Any]:
    """An OpenAI-format deployment on the fake provider at `port`, in pool
    `main` (`extra` overrides or adds settings)."""
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "api_base": f"http://127.0.0.1:{port}/v1",
        "pool": "main",
        "timeout_s": 5,
        "api_key_env": "TEST_FAKE_KEY",
        **extra,
    }


def config_document(
    broker_url: str, database_url: str, fake_port: int, **extra: Any
) -> dict[str, Any]:
    """A config document serving every test model from the fake provider."""
    base = f"http://127.0.0.1:{fake_port}/v1"
    deployment = {
        "provider": "openai",
        "api_base": base,
        "pool": "main",
        "timeout_s": 5,
        "api_key_env": "TEST_FAKE_KEY",
    }
    return {
        "broker_url": broker_url,
        "database_url": database_url,
        "log_level": os.environ.get("TEST_LOG_LEVEL", "warning"),
        "pools": {
            "main": {"concurrency": 32},
            "providers": {"concurrency": 16},
            "crash": {"concurrency": 16},
        },
        "ledger": {"batch_size": 200, "flush_ms": 20},
        "deployments": {
            "mini": {**deployment, "model": "gpt-4o-mini"},
            "mini-badkey": {**deployment, "model": "gpt-4o-mini", "api_key_env": "TEST_WRONG_KEY"},
            "priced": {
                **deployment,
                "model": "house-model",
                "price": {
                    "input_per_mtok": "1.25",
                    "output_per_mtok": "10",
                    "cache_read_per_mtok": "0.125",
                },
            },
            "unpriced": {**deployment, "model": "house-model"},
            "short-stream": {**deployment, "model": "gpt-4o-mini", "stream_timeout_s": 0.3},
            "crash-mini": {**deployment, "model": "gpt-4o-mini", "pool": "crash"},
            **provider_deployments(fake_port),
        },
        "models": {
            "gpt-4o-mini": {"aliases": ["fast"], "deployments": [{"deployment": "mini"}]},
            "badkey": {"deployments": [{"deployment": "mini-badkey"}]},
            "priced": {"deployments": [{"deployment": "priced"}]},
            "unpriced": {"deployments": [{"deployment": "unpriced"}]},
            "short-stream": {"deployments": [{"deployment": "short-stream"}]},
            "crash": {"deployments": [{"deployment": "crash-mini"}]},
            **{name: {"deployments": [{"deployment": name}]} for name in PROVIDER_MODELS},
        },
        **extra,
    }


def write_config(path: Path, document: dict[str, Any]) -> Path:
    """Write a config document as YAML."""
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@contextmanager
def fake_provider(api_key: str, log: Path | None = None) -> Iterator[int]:
    """The project's fake provider in a process of its own, like a real
    provider; yields its port, stops it after."""
    port = free_port()
    process = modelyard("fake-provider", "--port", str(port), "--api-key", api_key, log=log)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(10)


class Processes:
    """modelyard processes of one test, by name, each logging to its own file."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config, self.logs = config, logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        """Start `modelyard --config CONFIG ARGS`, logging to `<name>.log`."""
        self.running[name] = modelyard(
            "--config", str(self.config), *args, log=self.logs / f"{name}.log"
        )

    def names(self) -> list[str]:
        """Every process that wrote a log, running or not."""
        return sorted(path.stem for path in self.logs.glob("*.log"))

    def log_text(self, name: str) -> str:
        """Everything a process logged."""
        return (self.logs / f"{name}.log").read_text()

    def kill(self, name: str) -> None:
        """SIGKILL: no goodbye, nothing flushed."""
        process = self.running.pop(name)
        process.kill()
        process.wait(10)

    def events(self, name: str, event: str) -> list[dict[str, Any]]:
        """The lines of a process's log with this event."""
        found = []
        path = self.logs / f"{name}.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            if line.startswith("{") and line.endswith("}"):
                entry = json.loads(line)
                if entry.get("event") == event:
                    found.append(entry)
        return found

    def wait_for(self, name: str, event: str, timeout: float = 30.0) -> None:
        """Wait until a process logged `event`."""
        deadline = time.monotonic() + timeout
        while not self.events(name, event):
            assert time.monotonic() < deadline, f"{name} did not log {event!r}"
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM every process, then wait (SIGKILL after 10 s)."""
        for process in self.running.values():
            process.terminate()
        for process in self.running.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


class TcpProxy:
    """A TCP relay to a server, which a test can cut and restore: the
    server seems to go away (every connection dropped, none accepted) and
    come back, while it keeps running for everyone else."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.target_port = host, target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Accept and relay connections."""
        self._server = await asyncio.start_server(self._relay, self.host, self.port)

    async def cut(self) -> None:
        """Refuse new connections and drop every open one."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._links |= {client_w, server_w}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))
        self._links -= {client_w, server_w}
