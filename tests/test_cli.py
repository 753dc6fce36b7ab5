"""The `modelyard` command: clear one-line errors, never a traceback; real
reports from the ledger; idempotent migrations."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelyard.client import Client, new_job
from schemas.chat import Message
from schemas.jobs import Metadata
from tests.pipeline import eventually, scalar


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--config", "/nonexistent.yaml", "router"), "cannot read config file"),
        (("submit", "/nonexistent.jsonl"), "does not exist"),
        (("report", "--group-by", "colour"), "cannot group by"),
        (("fake-provider", "--rate-429", "2"), "fault rates"),
        (("worker", "--pool", "no-such-pool"), "no pool named"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_config: Path, args: tuple[str, ...], message: str) -> None:
    config = [] if args[0] == "--config" else ["--config", str(tmp_config)]
    done = run(*config, *args)

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("modelyard: error: ")
    assert message in done.stderr


def test_bad_config_entry_names_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "deployments:\n  x: {provider: openai, model: m, pool: p, timeout_s: soon}\nmodels: {}\n"
    )

    done = run("--config", str(bad), "router")

    assert (done.returncode, done.stderr.strip()) == (
        2,
        "modelyard: error: deployments.x.timeout_s: Expected `float`, got `str`",
    )


def test_topology_export_is_a_definitions_document(tmp_config: Path, tmp_path: Path) -> None:
    target = tmp_path / "defs.json"

    assert run("--config", str(tmp_config), "topology", "--export", str(target)).returncode == 0
    document = json.loads(target.read_text())
    assert {"worker.main", "worker.providers", "router.jobs", "ledger.costs", "dead.jobs"} <= {
        q["name"] for q in document["queues"]
    }


def test_migrate_is_idempotent(tmp_config: Path) -> None:
    done = run("--config", str(tmp_config), "migrate")

    assert done.returncode == 0
    assert "none pending" in done.stdout


@pytest.mark.asyncio
async def test_report_reads_the_ledger(tmp_config: Path, client: Client, database_url: str) -> None:
    team = "report-team"
    for i in range(3):
        job = new_job("fast", [Message(role="user", content=f"r{i}")], metadata=Metadata(team=team))
        assert (await client.complete(job, timeout=10)).status == "ok"
    calls = await eventually(
        lambda: scalar(database_url, "SELECT count(*) FROM ledger WHERE team = $1", team),
        lambda n: n == 3,
    )
    expected = await scalar(database_url, "SELECT sum(cost) FROM ledger WHERE team = $1", team)

    done = run("--config", str(tmp_config), "report", "--group-by", "team", "--format", "csv")

    assert done.returncode == 0, done.stderr
    rows = {r["team"]: r for r in csv.DictReader(io.StringIO(done.stdout))}
    assert (int(rows[team]["calls"]), rows[team]["cost"]) == (calls, f"{expected.normalize():f}")


def test_unreachable_broker_is_named_without_its_password(
    tmp_path: Path, config_doc: dict[str, object]
) -> None:
    from tests.services import write_config  # noqa: PLC0415

    config = write_config(
        tmp_path / "c.yaml", {**config_doc, "broker_url": "amqp://guest:s3cret@127.0.0.1:1/"}
    )

    done = run("--config", str(config), "router")

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/" in done.stderr
    assert "s3cret" not in done.stderr
