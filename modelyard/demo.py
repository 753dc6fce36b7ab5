"""`make demo`: the whole pipeline on this machine, with real jobs through it.

Migrates the demo database, starts `modelyard up --fake-provider` (router,
workers, ledger and the fake provider), runs a 1,000-line OpenAI Batch API
file through `modelyard submit`, then prints the results summary and the cost
report. Everything it writes goes to `demo-out/`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def main() -> int:
    """Run the demo; returns the process exit code."""
    OUT.mkdir(exist_ok=True)
    env = {**os.environ, "FAKE_OPENAI_KEY": "demo-key"}
    subprocess.run(modelyard("migrate"), check=True, env=env)
    batch, output = OUT / "batch.jsonl", OUT / "batch.output.jsonl"
    write_batch(batch)
    output.unlink(missing_ok=True)
    with (OUT / "up.log").open("wb") as log:
        up = subprocess.Popen(
            modelyard("up", "--fake-provider"), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_for_port(8900)
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
