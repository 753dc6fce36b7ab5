"""Every exchange and queue modelyard uses, declared in one place.

The same specs are declared by each process at start-up (idempotently: a
redeclare with equal arguments is a no-op) and exported as a RabbitMQ
definitions file (`modelyard topology --export`, kept in
`deploy/rabbitmq-definitions.json`) for operators who pre-provision brokers.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from schemas.jobs import MAX_REPLY_TO_BYTES, Lane, ReplyTo

JOBS_EXCHANGE = "modelyard.jobs"
# Jobs modelyard sends itself back to the router (retries after their delay,
# fallbacks, jobs waiting for a provider): already admitted. Producers may
# publish to `modelyard.jobs` only (see deploy/rabbitmq-users.sh), so they
# cannot skip admission by sending a job here.
INTERNAL_EXCHANGE = "modelyard.internal"
DISPATCH_EXCHANGE = "modelyard.dispatch"
COSTS_EXCHANGE = "modelyard.costs"
DEAD_EXCHANGE = "modelyard.dead"
# Workers' deployment health reports, fanned out to every router's own queue.
HEALTH_EXCHANGE = "modelyard.health"
# Budget alerts, for whoever binds a queue (a pager, a chat bridge).
ALERTS_EXCHANGE = "modelyard.alerts"

DELAY_EXCHANGE_PREFIX = "modelyard.wait."
RETRY_QUEUE_PREFIX = "wait."

# Retry delays are held by the broker: one queue per step of this ladder,
# each with a fixed message TTL, dead-lettering back to the router when it
# expires. A fixed TTL per queue keeps each queue in expiry order, so no
# message waits behind a longer one; a delay is rounded up to the next step
# (at most half again as long). No process holds a waiting job.
RETRY_DELAYS_MS: tuple[int, ...] = (
    250, 500, 750, 1000, 1500, 2000, 3000, 4000, 6000, 8000,
    12000, 16000, 24000, 32000, 48000, 64000, 96000, 128000, 192000, 300000,
)  # fmt: skip

ROUTER_QUEUE = "router.jobs"
ROUTER_INTERNAL_QUEUE = "router.internal"
LEDGER_QUEUE = "ledger.costs"
DEAD_QUEUE = "dead.jobs"

# A message delivered this many times without an ack is poison (it crashed a
# consumer each time): the broker dead-letters it instead of looping forever.
DELIVERY_LIMIT = 10

LANES: tuple[Lane, ...] = ("interactive", "batch")

# A client's private reply queue outlives a dropped connection (replies sent
# while it reconnects wait there) and is removed this long after its client
# is gone.
REPLY_QUEUE_EXPIRES_MS = 10 * 60 * 1000

ExchangeType = Literal["direct", "fanout", "topic"]


class ExchangeSpec(msgspec.Struct, frozen=True):
    """A durable exchange."""

    name: str
    type: ExchangeType = "direct"


class QueueSpec(msgspec.Struct, frozen=True):
    """A durable queue, its arguments and what it is bound to."""

    name: str
    bindings: tuple[tuple[str, str], ...]  # (exchange, routing key)
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)


class Topology(msgspec.Struct, frozen=True):
    """The whole broker layout for a set of worker pools."""

    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]


def worker_queue(pool: str, lane: Lane = "interactive") -> str:
    """The queue a pool's workers consume for one lane: single jobs on
    `worker.<pool>`, job batches on `worker.<pool>.batch`."""
    return f"worker.{dispatch_key(pool, lane)}"


def dispatch_key(pool: str, lane: Lane) -> str:
    """The routing key on `modelyard.dispatch` for a pool's lane."""
    return pool if lane == "interactive" else f"{pool}.batch"


def delay_step_ms(delay_s: float) -> int | None:
    """The ladder step a delay of `delay_s` waits in (the shortest at least
    as long), or None when it is longer than the ladder."""
    wanted = delay_s * 1000
    return next((step for step in RETRY_DELAYS_MS if step >= wanted), None)


def delay_exchange(step_ms: int) -> str:
    """The exchange a job is published to, to wait `step_ms` in the broker."""
    return f"{DELAY_EXCHANGE_PREFIX}{step_ms}"


def _retry_queue_arguments(step_ms: int) -> dict[str, Any]:
    """Quorum, expiring after the step into the router's queue, at least once."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": step_ms,
        "x-dead-letter-exchange": INTERNAL_EXCHANGE,
        "x-dead-letter-routing-key": "job",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def results_queue_arguments() -> dict[str, Any]:
    """A producer's durable results queue (`submit_many`, `modelyard submit`):
    replicated, so results survive the producer and the broker."""
    return {"x-queue-type": "quorum"}


def batch_results_queue(batch_id: str) -> str:
    """Where the results of `modelyard submit`'s batch `batch_id` wait."""
    return f"batch.{batch_id}"


def reply_queue(client_id: str) -> str:
    """A client's private queue for `complete()` and `stream()` answers."""
    return f"reply.{client_id}"


def reply_queue_arguments() -> dict[str, Any]:
    """Durable (it survives a broker restart with the answers in it) and
    removed `REPLY_QUEUE_EXPIRES_MS` after its client stopped using it."""
    return {"x-expires": REPLY_QUEUE_EXPIRES_MS}


# A router's health queue: reports older than this are not worth reading,
# and the queue goes this long after its router does.
HEALTH_REPORT_TTL_MS = 5000
HEALTH_QUEUE_EXPIRES_MS = 60_000


def health_topology(instance: str) -> Topology:
    """A router's (or gateway's) own queue of workers' health reports,
    `health.<instance>`: not replicated (a lost report is replaced by the
    next), stale reports dropped, removed a minute after its consumer."""
    queue = QueueSpec(
        f"health.{instance}",
        ((HEALTH_EXCHANGE, ""),),
        {
            "x-expires": HEALTH_QUEUE_EXPIRES_MS,
            "x-message-ttl": HEALTH_REPORT_TTL_MS,
            "x-max-length": 1000,
        },
    )
    return Topology(exchanges=(ExchangeSpec(HEALTH_EXCHANGE, "fanout"),), queues=(queue,))


def reply_target_problem(reply_to: str | None) -> str | None:
    """Why answers must not be published to `reply_to`, or None when it names
    an ordinary queue. RabbitMQ's special addresses (direct reply-to) close
    the publishing channel unless their consumer is alive on it, and other
    `amq.` names cannot be queues a producer declared; server-named queues
    (`amq.gen-...`) are ordinary."""
    if not reply_to:
        return "no reply_to on the job"
    try:
        msgspec.convert(reply_to, ReplyTo)
    except msgspec.ValidationError:
        return (
            f"reply_to is not a queue name of 1 to {MAX_REPLY_TO_BYTES} printable ASCII characters"
        )
    if reply_to.startswith("amq.") and not reply_to.startswith("amq.gen-"):
        return f"reply_to {reply_to[:64]!r} is a RabbitMQ special address, not a queue"
    return None


def _work_queue_arguments() -> dict[str, Any]:
    """Quorum (replicated, fsynced) with at-least-once dead-lettering: a
    rejected or poison message moves to the dead queue and cannot be lost on
    the way there."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
    }


def build_topology(pools: list[str]) -> Topology:
    """The layout for these pools (the router, ledger and dead queues always exist)."""
    work = _work_queue_arguments()
    queues = [
        QueueSpec(ROUTER_QUEUE, ((JOBS_EXCHANGE, "job"),), work),
        QueueSpec(ROUTER_INTERNAL_QUEUE, ((INTERNAL_EXCHANGE, "job"),), work),
        QueueSpec(LEDGER_QUEUE, ((COSTS_EXCHANGE, "cost"),), work),
        QueueSpec(DEAD_QUEUE, ((DEAD_EXCHANGE, ""),), {"x-queue-type": "quorum"}),
        *(
            QueueSpec(worker_queue(p, lane), ((DISPATCH_EXCHANGE, dispatch_key(p, lane)),), work)
            for p in sorted(pools)
            for lane in LANES
        ),
    ]
    queues += [
        QueueSpec(
            f"{RETRY_QUEUE_PREFIX}{step}",
            ((delay_exchange(step), ""),),
            _retry_queue_arguments(step),
        )
        for step in RETRY_DELAYS_MS
    ]
    exchanges = (
        ExchangeSpec(JOBS_EXCHANGE),
        ExchangeSpec(INTERNAL_EXCHANGE),
        ExchangeSpec(DISPATCH_EXCHANGE),
        ExchangeSpec(COSTS_EXCHANGE),
        ExchangeSpec(DEAD_EXCHANGE, "fanout"),
        ExchangeSpec(HEALTH_EXCHANGE, "fanout"),
        ExchangeSpec(ALERTS_EXCHANGE, "fanout"),
        *(ExchangeSpec(delay_exchange(step), "fanout") for step in RETRY_DELAYS_MS),
    )
    return Topology(exchanges=exchanges, queues=tuple(queues))


def definitions(topology: Topology, vhost: str = "/") -> dict[str, Any]:
    """The topology as a RabbitMQ definitions document (`rabbitmqctl import_definitions`)."""
    return {
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for e in topology.exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": q.arguments,
            }
            for q in topology.queues
        ],
        "bindings": [
            {
                "source": exchange,
                "vhost": vhost,
                "destination": q.name,
                "destination_type": "queue",
                "routing_key": key,
                "arguments": {},
            }
            for q in topology.queues
            for exchange, key in q.bindings
        ],
    }
