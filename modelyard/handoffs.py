"""Jobs modelyard sends back to the router, many per message.

A failed batch-lane job on its way to a retry, a fallback, or a job waiting
for a provider that asked for time: each travels with others going the same
way, as one `JobBatch` per step of the retry ladder (step 0: straight back
to the router's internal queue). Used by workers and routers alike.
"""

from __future__ import annotations

from modelyard.batching import Batcher, Encoded, encoded_size
from modelyard.broker import Broker
from schemas.codec import encode_job_batch


def handoff_batcher(broker: Broker, *, max_items: int, linger_s: float) -> Batcher[int, Encoded]:
    """Put `(job_id, encode(job))` under the ladder step (ms) it waits, or 0."""

    async def send(step_ms: int, jobs: list[Encoded]) -> None:
        body = encode_job_batch([job for _, job in jobs])
        first = jobs[0][0]
        if step_ms:
            await broker.defer(step_ms, body, correlation_id=first, batch=True)
        else:
            await broker.resubmit(body, correlation_id=first, batch=True)

    return Batcher(send, max_items=max_items, linger_s=linger_s, size=encoded_size)
