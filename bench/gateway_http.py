"""The HTTP path (`make bench`): modelyard's gateway against the LiteLLM
proxy, both in front of the same fake provider, and the fake provider
called straight as the floor.

Starts the fake provider (0 ms latency), modelyard's gateway, worker,
router and ledger as separate processes on a fresh vhost and database, and
the LiteLLM proxy (one worker, no database, a master key) from a throwaway
virtual environment outside the project's dependencies (created on first
run under `~/.cache/modelyard/`, `--litellm-venv` to put it elsewhere).
Then, for each target and each concurrency (1, 16, 64), a closed loop of
`POST .../chat/completions` for `--seconds`: requests/s, p50 and p99.

Reported as ratios from this one run: the gateway's added p50 at
concurrency 1 over LiteLLM's (target: at most 0.5), and the gateway's
requests/s at concurrency 64 over LiteLLM's (target: at least 5).
Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import NamedTuple

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import cpu_seconds
from tests.services import (
    config_document,
    free_port,
    fresh_database,
    fresh_vhost,
    modelyard,
    wait_for_port,
    write_config,
)

KEY = "bench-key"
MASTER_KEY = "sk-bench-master"
CONCURRENCY = (1, 16, 64)
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "bench hello"}]}
DEFAULT_VENV = Path.home() / ".cache" / "modelyard" / "litellm-venv"


class Target(NamedTuple):
    name: str
    url: str
    key: str


class Run(NamedTuple):
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


async def closed_loop(target: Target, concurrency: int, seconds: float) -> Run:
    """`concurrency` clients, each sending its next request when the last is answered."""
    headers = {"authorization": f"Bearer {target.key}"}
    samples: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        stop_at = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                async with session.post(target.url, json=BODY) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                        continue
                samples.append((time.perf_counter() - started) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    q = statistics.quantiles(samples, n=100) if len(samples) > 1 else [0.0] * 99
    return Run(len(samples) / elapsed, q[49], q[98], errors)


def litellm_venv(path: Path) -> Path:
    """The LiteLLM proxy's executable, installing it into `path` if needed."""
    executable = path / "bin" / "litellm"
    if not executable.exists():
        print(f"installing the LiteLLM proxy into {path} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        pip = [str(path / "bin" / "pip"), "install", "-q", "litellm[proxy]"]
        subprocess.run(pip, check=True)
    return executable


def start_litellm(
    executable: Path, fake_port: int, port: int, tmp: Path
) -> subprocess.Popen[bytes]:
    """The LiteLLM proxy: one worker, no database, a master key."""
    config = {
        "model_list": [
            {
                "model_name": "gpt-4o-mini",
                "litellm_params": {
                    "model": "openai/gpt-4o-mini",
                    "api_base": f"http://127.0.0.1:{fake_port}/v1",
                    "api_key": KEY,
                },
            }
        ],
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": {"telemetry": False},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VIRTUAL_ENV")}
    env.update(LITELLM_LOG="ERROR", DISABLE_SCHEMA_UPDATE="true")
    with (tmp / "litellm.log").open("ab") as log:
        return subprocess.Popen(
            [str(executable), "--config", str(path), "--port", str(port), "--num_workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
        )


async def measure(
    targets: list[Target], seconds: float, pids: dict[str, int]
) -> tuple[dict[tuple[str, int], Run], dict[str, float]]:
    """Every target at every concurrency, warmed up first; and the CPU each
    process spent per request (ms) while the gateway ran at the top concurrency."""
    for target in targets:
        await closed_loop(target, 4, 1.0)
    runs = {}
    spent: dict[str, float] = {}
    for concurrency in CONCURRENCY:
        for target in targets:
            watched = target.name == "modelyard gateway" and concurrency == CONCURRENCY[-1]
            before = cpu_seconds(pids) if watched else {}
            runs[target.name, concurrency] = run = await closed_loop(target, concurrency, seconds)
            if watched:
                after = cpu_seconds(pids)
                count = run.rps * seconds
                spent = {n: (after[n] - before.get(n, 0.0)) * 1000 / count for n in after}
    return runs, spent


def report(runs: dict[tuple[str, int], Run], names: list[str], seconds: float) -> None:
    print(f"\nHTTP path, closed loop, {seconds:g} s per cell (requests/s, p50 / p99 ms)")
    print(f"  {'concurrency':<12}" + "".join(f"{name:>30}" for name in names))
    for concurrency in CONCURRENCY:
        cells = []
        for name in names:
            run = runs[name, concurrency]
            failed = f" ({run.errors} failed)" if run.errors else ""
            cells.append(f"{run.rps:7.0f}/s {run.p50_ms:6.2f} / {run.p99_ms:6.2f}{failed}")
        print(f"  {concurrency:<12}" + "".join(f"{cell:>30}" for cell in cells))
    direct = runs["fake provider", 1].p50_ms
    added = {name: runs[name, 1].p50_ms - direct for name in names if name != "fake provider"}
    for name, ms in added.items():
        print(f"  {name}: adds {ms:.2f} ms at p50, concurrency 1")
    if "litellm proxy" in added:
        gateway, litellm = added["modelyard gateway"], added["litellm proxy"]
        ratio = gateway / litellm
        print(f"  added p50 at concurrency 1, gateway / litellm : {ratio:6.2f}  (target <= 0.5)")
        top = runs["modelyard gateway", 64].rps / runs["litellm proxy", 64].rps
        print(f"  requests/s at concurrency 64, gateway / litellm: {top:6.2f}  (target >= 5)")
    print(
        "  gateway / fake provider, requests/s at 64: "
        f"{runs['modelyard gateway', 64].rps / runs['fake provider', 64].rps:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per target and concurrency")
    parser.add_argument("--litellm-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy")
    parser.add_argument("--logs", type=Path, help="keep each process's log in this directory")
    args = parser.parse_args()
    executable = None if args.no_litellm else litellm_venv(args.litellm_venv)

    with TemporaryDirectory() as tmp, fresh_vhost() as broker_url, fresh_database() as database_url:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        fake_port, gateway_port, litellm_port = free_port(), free_port(), free_port()
        doc = config_document(broker_url, database_url, fake_port)
        doc["gateway"] = {"port": gateway_port}
        config = str(write_config(Path(tmp) / "bench.yaml", doc))
        env = {"TEST_FAKE_KEY": KEY, "TEST_WRONG_KEY": "not-the-key"}
        fake = ["fake-provider", "--port", str(fake_port), "--api-key", KEY]
        procs = {"fake": modelyard(*fake, log=logs / "fake.log")}
        wait_for_port(fake_port)
        for role in ("ledger", "worker", "router", "gateway"):
            extra = ["--pool", "main"] if role == "worker" else []
            log = logs / f"{role}.log"
            procs[role] = modelyard("--config", config, role, *extra, env=env, log=log)
        if executable is not None:
            procs["litellm"] = start_litellm(executable, fake_port, litellm_port, logs)
        try:
            wait_for_port(gateway_port, timeout=60)
            targets = [
                Target("fake provider", f"http://127.0.0.1:{fake_port}/v1/chat/completions", KEY),
                Target(
                    "modelyard gateway",
                    f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
                    "none",
                ),
            ]
            if executable is not None:
                wait_for_port(litellm_port, timeout=180)
                url = f"http://127.0.0.1:{litellm_port}/chat/completions"
                targets.append(Target("litellm proxy", url, MASTER_KEY))
            pids = {name: p.pid for name, p in procs.items() if name != "litellm"}
            pids["load generator"] = os.getpid()
            runs, spent = asyncio.run(measure(targets, args.seconds, pids))
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(30)
    report(runs, [t.name for t in targets], args.seconds)
    ranked = sorted(spent.items(), key=lambda kv: -kv[1])
    print(
        "  CPU per request, gateway at 64 (ms): " + ", ".join(f"{n} {ms:.2f}" for n, ms in ranked)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
