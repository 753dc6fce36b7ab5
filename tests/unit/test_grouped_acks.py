"""The reply inboxes' grouped acks, on stand-in messages that record the
acks they are asked for (the broker's side is tested in
tests/test_robustness.py): each ack covers only messages that are done, and
no delivery tag is acked twice (RabbitMQ closes the channel for that)."""

from __future__ import annotations

import asyncio

import pytest
from aiormq.exceptions import ChannelInvalidStateError

from modelyard.broker import GroupedAcks

pytestmark = pytest.mark.asyncio


class Delivery:
    """A delivered message: its channel, its tag, and the acks sent for it."""

    def __init__(self, channel: object, tag: int, acks: list[tuple[object, int]]) -> None:
        self.channel, self.delivery_tag, self._acks = channel, tag, acks

    async def ack(self, multiple: bool = False) -> None:
        assert multiple
        self._acks.append((self.channel, self.delivery_tag))


async def settled(acks: GroupedAcks) -> None:
    await asyncio.sleep(acks.linger_s * 3)


async def test_a_held_message_finishing_after_later_ones_is_acked_once_by_the_latest() -> None:
    sent: list[tuple[object, int]] = []
    channel = object()
    acks = GroupedAcks(linger_s=0.001)
    garbage, after = Delivery(channel, 1, sent), Delivery(channel, 2, sent)
    async with acks.holding():
        acks.done(after)  # a later reply finishes while the garbage is being parked
        await settled(acks)
        assert sent == []  # nothing acked while a message is held
        acks.done(garbage)
    await settled(acks)
    assert sent == [(channel, 2)]


async def test_a_message_done_after_its_group_was_acked_is_not_acked_again() -> None:
    sent: list[tuple[object, int]] = []
    channel = object()
    acks = GroupedAcks(linger_s=0.001)
    acks.done(Delivery(channel, 2, sent))
    await settled(acks)
    acks.done(Delivery(channel, 1, sent))
    await settled(acks)
    acks.done(Delivery(channel, 3, sent))
    await settled(acks)
    assert sent == [(channel, 2), (channel, 3)]


async def test_a_new_channel_starts_its_own_tags() -> None:
    sent: list[tuple[object, int]] = []
    old, new = object(), object()
    acks = GroupedAcks(linger_s=0.001)
    acks.done(Delivery(old, 7, sent))
    await settled(acks)
    acks.done(Delivery(new, 1, sent))  # after a reconnect, tags start again
    await settled(acks)
    assert sent == [(old, 7), (new, 1)]


class Closing(Delivery):
    """A message whose channel can close: aio-pika raises on `.channel` then."""

    def __init__(self, tag: int, acks: list[tuple[object, int]]) -> None:
        self._channel, self.closed = object(), False
        super().__init__(self._channel, tag, acks)

    @property  # type: ignore[override]
    def channel(self) -> object:
        if self.closed:
            raise ChannelInvalidStateError
        return self._channel

    @channel.setter
    def channel(self, _: object) -> None:
        pass


async def test_a_message_whose_channel_closed_is_left_for_the_broker_to_deliver_again() -> None:
    sent: list[tuple[object, int]] = []
    failures: list[dict[str, object]] = []  # what the acks' timer callbacks raised
    asyncio.get_running_loop().set_exception_handler(lambda _, context: failures.append(context))
    acks = GroupedAcks(linger_s=0.001)
    gone = Closing(4, sent)
    gone.closed = True
    acks.done(gone)  # done after its channel closed
    await settled(acks)
    closing = Closing(5, sent)
    acks.done(closing)
    closing.closed = True  # closed before its group's ack went out
    await settled(acks)
    assert sent == []
    assert failures == []
