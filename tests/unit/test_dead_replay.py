"""Which parked jobs `dead replay` sends back as admitted ones (admitted
again by their key id, their history kept): decided from headers only a
parking party could have written."""

from __future__ import annotations

from typing import Any

import pytest

from modelyard.broker import ADMITTED_HEADER
from modelyard.deadletters import _admitted


class Parked:
    def __init__(self, headers: dict[str, Any]) -> None:
        self.headers = headers


def died_in(queue: str, **extra: Any) -> Parked:
    return Parked({"x-death": [{"queue": queue, "reason": "delivery_limit"}], **extra})


@pytest.mark.parametrize(
    ("parked", "admitted"),
    [
        (Parked({ADMITTED_HEADER: True, "x-modelyard-reason": "final failure"}), True),
        (Parked({"x-modelyard-reason": "invalid job, nobody to tell"}), False),
        (died_in("worker.main"), True),
        (died_in("worker.main.batch"), True),
        (died_in("router.internal"), True),
        (died_in("router.jobs"), False),
        # A producer's own header, kept by the broker when router.jobs parked it.
        (died_in("router.jobs", **{ADMITTED_HEADER: True}), False),
        (Parked({}), False),
    ],
)
def test_only_a_parking_party_can_say_a_job_was_admitted(parked: Parked, admitted: bool) -> None:
    assert _admitted(parked) is admitted  # type: ignore[arg-type]
