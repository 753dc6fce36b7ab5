"""`make demo`: the whole pipeline on this machine, with real jobs through it.

Migrates the demo database, starts `modelyard up --fake-provider` (router,
workers, ledger, the HTTP gateway and the fake provider), runs a 1,000-line
OpenAI Batch API file through `modelyard submit`, sends two requests over
HTTP (OpenAI's format to an Anthropic model, Anthropic's to an OpenAI one),
then prints the results summary and the cost report. Everything it writes
goes to `demo-out/`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "demo.yaml"
OUT = Path("demo-out")
JOBS = 1000
TOPICS = ["queues", "ledgers", "budgets", "retries", "latency", "fallbacks", "prices", "tokens"]
MODELS = ["fast", "llama", "claude", "gemini"]


def modelyard(*args: str) -> list[str]:
    """The argv for a modelyard subcommand with the demo config."""
    return [sys.executable, "-m", "modelyard.cli", "--config", str(CONFIG), *args]


def write_batch(path: Path) -> None:
    """A batch file mixing two models, a few bad lines included on purpose."""
    with path.open("w") as f:
        for i in range(JOBS):
            model = MODELS[i % len(MODELS)]
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {
                        "role": "user",
                        "content": f"Explain {TOPICS[i % len(TOPICS)]} in one line (#{i}).",
                    },
                ],
                "max_tokens": 64,
            }
            if i % 250 == 249:
                body["model"] = "no-such-model"  # answered with unknown_model, not lost
            f.write(
                json.dumps(
                    {
                        "custom_id": f"req-{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": body,
                    }
                )
                + "\n"
            )


def wait_for_port(port: int, timeout: float = 30) -> None:
    """Until the fake provider listens (the pipeline is then up too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"demo: the pipeline did not start within {timeout:g}s (see {OUT}/up.log)")


def free_port() -> int:
    """A port nothing listens on now, for the gateway."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[dict[str, str], Any]:
    """A JSON POST: the response headers and body."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(response.headers), json.loads(response.read())


def http_tour(port: int) -> None:
    """One request in each API's format, answered by the other's kind of provider."""
    base = f"http://127.0.0.1:{port}"
    question = [{"role": "user", "content": "Say hello over HTTP."}]
    headers, body = post(
        f"{base}/v1/chat/completions",
        {"model": "claude", "messages": question},
        {"authorization": "Bearer demo"},
    )
    print(
        f"\nPOST {base}/v1/chat/completions (OpenAI's format) model=claude:"
        f"\n  {body['choices'][0]['message']['content'][:60]!r}"
        f"\n  provider={headers.get('x-modelyard-provider')}"
        f" cost=${headers.get('x-modelyard-cost')}"
    )
    headers, body = post(
        f"{base}/v1/messages",
        {"model": "fast", "max_tokens": 64, "messages": question},
        {"x-api-key": "demo", "anthropic-version": "2023-06-01"},
    )
    print(
        f"POST {base}/v1/messages (Anthropic's format) model=fast:"
        f"\n  {body['content'][0]['text'][:60]!r}"
        f"\n  provider={headers.get('x-modelyard-provider')}"
        f" cost=${headers.get('x-modelyard-cost')}"
    )


def main() -> int:
    """Run the demo; returns the process exit code."""
    OUT.mkdir(exist_ok=True)
    env = {**os.environ, "FAKE_OPENAI_KEY": "demo-key"}
    subprocess.run(modelyard("migrate"), check=True, env=env)
    batch, output = OUT / "batch.jsonl", OUT / "batch.output.jsonl"
    write_batch(batch)
    output.unlink(missing_ok=True)
    with (OUT / "up.log").open("wb") as log:
        port = free_port()
        up = subprocess.Popen(
            modelyard("up", "--fake-provider", "--port", str(port)),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for_port(8900)
        wait_for_port(port)
        started = time.monotonic()
        subprocess.run(
            modelyard(
                "submit", str(batch), "--output", str(output), "--team", "demo", "--project", "tour"
            ),
            check=True,
            env=env,
        )
        elapsed = time.monotonic() - started
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        errors = [line for line in lines if line["error"]]
        rate = len(lines) / elapsed
        print(
            f"\n{len(lines)} results in {elapsed:.1f}s ({rate:.0f} jobs/s), {len(errors)} errors:"
        )
        for kind in sorted({e["error"]["code"] for e in errors}):
            print(f"  {kind}: {sum(e['error']['code'] == kind for e in errors)}")
        http_tour(port)
        time.sleep(0.5)  # the ledger flushes every 50 ms
        subprocess.run(
            modelyard("report", "--group-by", "team,model,provider,day"), check=True, env=env
        )
    finally:
        up.terminate()
        up.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
