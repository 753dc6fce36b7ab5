"""Every exchange and queue modelyard uses, declared in one place.

The same specs are declared by each process at start-up (idempotently: a
redeclare with equal arguments is a no-op) and exported as a RabbitMQ
definitions file (`modelyard topology --export`, kept in
`deploy/rabbitmq-definitions.json`) for operators who pre-provision brokers.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from schemas.jobs import Lane

JOBS_EXCHANGE = "modelyard.jobs"
DISPATCH_EXCHANGE = "modelyard.dispatch"
COSTS_EXCHANGE = "modelyard.costs"
DEAD_EXCHANGE = "modelyard.dead"

ROUTER_QUEUE = "router.jobs"
LEDGER_QUEUE = "ledger.costs"
DEAD_QUEUE = "dead.jobs"

# A message delivered this many times without an ack is poison (it crashed a
# consumer each time): the broker dead-letters it instead of looping forever.
DELIVERY_LIMIT = 10

LANES: tuple[Lane, ...] = ("interactive", "batch")

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
        QueueSpec(LEDGER_QUEUE, ((COSTS_EXCHANGE, "cost"),), work),
        QueueSpec(DEAD_QUEUE, ((DEAD_EXCHANGE, ""),), {"x-queue-type": "quorum"}),
        *(
            QueueSpec(worker_queue(p, lane), ((DISPATCH_EXCHANGE, dispatch_key(p, lane)),), work)
            for p in sorted(pools)
            for lane in LANES
        ),
    ]
    exchanges = (
        ExchangeSpec(JOBS_EXCHANGE),
        ExchangeSpec(DISPATCH_EXCHANGE),
        ExchangeSpec(COSTS_EXCHANGE),
        ExchangeSpec(DEAD_EXCHANGE, "fanout"),
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
