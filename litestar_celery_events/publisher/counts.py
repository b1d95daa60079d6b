"""Where every event handed to a publisher is."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("PublisherCounts",)


@dataclass(frozen=True)
class PublisherCounts:
    """Where every event handed to a publisher is (``add_up``). Exact while the publisher is idle or stopped."""

    emitted: int  # accepted by ``emit`` (it returned without raising)
    adopted: int  # taken over from the spool files of a dead process with the same ``data_dir``
    published: int  # taken by the broker: Redis replied, RabbitMQ confirmed (publisher confirms)
    waiting: int  # in memory, in flight (sent, not yet confirmed) or in this process's spool
    refused: int  # never taken by the broker (too big): in the failed-events store
    dropped: int  # by ``buffer_full_policy``/``spool_full_policy="drop_oldest"`` (each logged)
    lost: int  # unpublished at shutdown and not kept in a spool (logged with their event ids)

    @property
    def add_up(self) -> bool:
        accounted = self.published + self.waiting + self.refused + self.dropped + self.lost
        return self.emitted + self.adopted == accounted
