"""RabbitMQ publisher confirms, awaited per batch: which messages of a batch the broker took.

After ``confirm.select`` the broker acks (or nacks) every message published on the channel, by
sequence number (1, 2, ...), one at a time or many at once (``multiple``), in any order. A batch
counts as published up to its first message that is not confirmed yet or was refused.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

__all__ = ("CONFIRM_TIMEOUT_S", "Confirms", "PublishNotConfirmedError")

CONFIRM_TIMEOUT_S = 30.0
"""Longest wait for the broker to confirm a batch; then the connection is dropped and the batch re-sent."""


class PublishNotConfirmedError(ConnectionError):
    """The broker refused (nacked) a message or did not confirm it in time: it is sent again."""


class Confirms:
    """Publisher confirms on one py-amqp channel, tracked by publish sequence number."""

    def __init__(self, channel: Any) -> None:
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        self.sent = 0
        self.settled_through = 0
        """Every message up to this sequence number is acked or nacked."""
        self._settled_above: set[int] = set()  # confirms may come out of order
        self.nacked: set[int] = set()

    def _settle(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.settled_through = max(self.settled_through, tag)
            self._settled_above = {t for t in self._settled_above if t > tag}
        else:
            self._settled_above.add(tag)
        while self.settled_through + 1 in self._settled_above:
            self.settled_through += 1
            self._settled_above.discard(self.settled_through)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        first = self.settled_through + 1 if multiple else tag
        self.nacked.update(t for t in range(first, tag + 1) if t not in self._settled_above)
        self._settle(tag, multiple)

    def confirmed_prefix(self, first: int, last: int) -> int:
        """How many messages from sequence ``first`` on are confirmed, in order, up to ``last``."""
        through = min(self.settled_through, last)
        refused = [tag for tag in self.nacked if first <= tag <= through]
        if refused:
            through = min(refused) - 1
        return max(0, through - first + 1)

    def wait(self, connection: Any, last: int) -> None:
        """Read the broker's frames until every message up to ``last`` is settled, or time out."""
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while self.settled_through < last:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PublishNotConfirmedError(
                    f"the broker confirmed {self.settled_through} of {last} message(s) within "
                    f"{CONFIRM_TIMEOUT_S:.0f}s; reconnecting to send the rest again"
                )
            with contextlib.suppress(socket.timeout):
                connection.drain_events(timeout=left)
