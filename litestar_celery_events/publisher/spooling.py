"""The publisher's disk side: a broker that hangs sends the batch in flight and the buffer to the spool,
and while events wait on disk they are published from there, oldest first."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections import deque

    from litestar_celery_events.batches import BatchSizer
    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.stores.spool import Spool
    from litestar_celery_events.transports import Transport

__all__ = ("SPOOL_WHEN_STALLED_S", "SpoolFallback")

logger = logging.getLogger("litestar_celery_events.publisher")

SPOOL_WHEN_STALLED_S = 1.0
"""With the spool on: a publish waiting this long for the broker (one that hangs rather than
refuses) sends new events, and the batch it holds, to the spool instead of memory."""


class SpoolFallback:
    """Mixed into ``Publisher``: the state and steps of publishing through the spool."""

    _buffer: deque[Emission]
    _in_flight: list[Emission]
    _broker: str
    _batches: BatchSizer
    _transport: Transport
    _watched: list[Emission] | None
    _watched_since: float
    _spooled_in_flight: set[str]
    published: int

    # Defined by Publisher: what to do with a failed batch, a refused message, a published batch.
    def _after_failure(self, batch: list[Emission], done: int, exc: Exception) -> list[Emission]:
        raise NotImplementedError

    def _refuse(self, emission: Emission, exc: Exception) -> None:
        raise NotImplementedError

    def _report_published(self, batch: list[Emission]) -> None:
        raise NotImplementedError

    def _back_off(self, exc: Exception, failures: int, waiting: str) -> None:
        raise NotImplementedError

    def _publish_stalled(self) -> bool:
        """True once the same batch has been in flight for ``SPOOL_WHEN_STALLED_S`` (seen from ``emit``)."""
        in_flight, now = self._in_flight, time.monotonic()
        if in_flight is not self._watched:
            self._watched, self._watched_since = in_flight, now
            return False
        return now - self._watched_since >= SPOOL_WHEN_STALLED_S

    def _spill_stalled(self, spool: Spool) -> None:
        """The broker hangs: put the batch in flight and the buffer on disk (the caller's thread)."""
        in_flight = list(self._in_flight)
        self._spooled_in_flight = {e.emission_id for e in in_flight}
        spool.put(in_flight)  # dropped from disk again if that publish still goes through
        spool.spill(self._buffer)
        logger.warning(
            "a publish to %s has waited %.1fs: %d event(s) now wait in the spool",
            self._broker,
            time.monotonic() - self._watched_since,
            spool.depth,
        )

    def _drop_spooled_copies(self, spool: Spool | None) -> None:
        """A publish that stalled went through after all: its batch's copies leave the spool."""
        if self._spooled_in_flight and spool is not None:
            spool.discard(self._spooled_in_flight)
            self._spooled_in_flight = set()

    def _publish_from_spool(self, spool: Spool, failures: int) -> int:
        """One round while events wait on disk: spill memory to disk, publish the oldest batch."""
        # Memory holds newer events than the spool, or a failed batch already spooled when it stalled.
        spool.spill(self._buffer, skip=self._spooled_in_flight)
        self._spooled_in_flight = set()
        source, rows = spool.oldest(self._batches.cap)
        if source is None:
            return failures
        rows = rows[: self._batches.fitting(len(emission.body) for _, emission in rows)]
        batch = [emission for _, emission in rows]
        done = [0]
        try:
            self._transport.publish(batch, done)
        except Exception as exc:  # noqa: BLE001 - any broker error: the events stay on disk
            refused = self._after_failure(batch, done[0], exc)
            if refused:
                self._refuse(refused[0], exc)
            gone = done[0] + len(refused)
            if gone:
                spool.published(source, rows[gone - 1][0])
                self._report_published(batch[:gone])
                self.published += done[0]
            if refused:
                return failures
            failures += 1
            self._back_off(exc, failures, f"{spool.depth} event(s) in the spool")
            return failures
        self._batches.after_success()
        spool.published(source, rows[-1][0])
        self._report_published(batch)
        self.published += len(batch)
        if failures:
            logger.warning(
                "publishing to %s again after %d failed attempt(s); %d event(s) left in the spool",
                self._broker,
                failures,
                spool.depth,
            )
        return 0
