"""How many events the publisher's next round trip carries, and when one message is the problem.

Batches are bounded in count (``publish_batch_size``) and in bytes of encoded arguments
(``publish_batch_bytes``), and always hold at least one event. A failed write halves the next
batches (a batch too big to write in time goes out in smaller parts); each success doubles them
back. A message the broker refuses outright, or that keeps failing on its own while the broker
answers, is one it will never take: the publisher records it instead of retrying it forever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar_celery_events.brokers.failover import MasterUnavailableError
from litestar_celery_events.transports import MessageRefused

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from litestar_celery_events.config import CeleryEventsConfig
    from litestar_celery_events.contract.message import Emission

__all__ = ("REFUSED_AFTER_ATTEMPTS", "BatchSizer")

REFUSED_AFTER_ATTEMPTS = 3
"""A message that failed this many times in a row, sent alone, while the broker still answers, is
one the broker will never take: it goes to the failed-events store instead of blocking the rest."""


class BatchSizer:
    """The publisher's batch bounds: count cap (shrinks after failures), byte budget, refusals."""

    def __init__(self, config: CeleryEventsConfig) -> None:
        self.max_count = config.publish_batch_size
        self.max_bytes = config.publish_batch_bytes
        self.cap = self.max_count
        self._alone_failures = 0

    def fitting(self, body_sizes: Iterable[int]) -> int:
        """How many of the oldest events (their encoded sizes, ``cap`` at most) fit the byte budget; at least one."""
        budget = self.max_bytes
        count = 0
        for size in body_sizes:
            budget -= size
            if budget < 0 and count:
                break
            count += 1
        return count

    def after_failure(
        self, batch: list[Emission], done: int, exc: Exception, reachable: Callable[[], bool] | None
    ) -> list[Emission]:
        """Shrink the next batches; return the message the broker will never take, if any (``[]``: retry all)."""
        if isinstance(exc, MessageRefused):  # that one message, not the batch's size
            self._alone_failures = 0
            return batch[done : done + 1]
        if isinstance(exc, MasterUnavailableError):  # the server takes no writes now (failing over): not the message
            return []
        self.cap = max(1, min(self.cap, len(batch) - done) // 2)
        if len(batch) - done != 1:
            self._alone_failures = 0
            return []
        self._alone_failures += 1
        if self._alone_failures < REFUSED_AFTER_ATTEMPTS:
            return []
        if reachable is None or not reachable():  # an outage: the message is not the cause, keep it
            return []
        self._alone_failures = 0
        return batch[done : done + 1]

    def after_success(self) -> None:
        self._alone_failures = 0
        if self.cap < self.max_count:
            self.cap = min(self.max_count, self.cap * 2)

    @property
    def failing_alone(self) -> int:
        """Failed attempts in a row of one message sent alone (0 after any success or bigger batch)."""
        return self._alone_failures
