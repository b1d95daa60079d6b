"""The background publisher: a bounded buffer drained by one thread that talks to the broker.

``emit`` only appends to the buffer, so a slow or absent broker never blocks the web app's
event loop. The thread publishes in batches (pipelined where kombu's transport supports it),
keeps unpublished events at the head of the buffer while the broker is away, and on shutdown
flushes within a bounded time, logging the count of what it could not publish.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING, Any

from litestar_celery_events.batches import BatchSizer
from litestar_celery_events.brokers import redact_url, retry_delay_s, worth_logging
from litestar_celery_events.errors import EventBufferFullError
from litestar_celery_events.publisher.counts import PublisherCounts
from litestar_celery_events.publisher.on_loop import LoopPublishing
from litestar_celery_events.publisher.spooling import SpoolFallback
from litestar_celery_events.transports import Transport, transport_for
from litestar_celery_events.transports.routing import EventRouter

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from celery import Celery

    from litestar_celery_events.config import CeleryEventsConfig
    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.stores.spool import Spool
    from litestar_celery_events.transports.routing import Route

__all__ = ("Publisher", "PublisherCounts")

logger = logging.getLogger("litestar_celery_events.publisher")

IDLE_WAIT_S = 0.5
MIN_PUBLISH_INTERVAL_S = 0.002
MAX_PUBLISH_INTERVAL_S = 0.02
"""Under a steady stream of events, round trips are 2 ms (one event per batch) to 20 ms apart, so
each carries a batch: a round trip costs ~100x the CPU of adding one message to it."""


class Publisher(SpoolFallback, LoopPublishing):
    """A bounded buffer of emissions and the thread that drains it to the broker."""

    def __init__(
        self,
        celery_app: Celery,
        config: CeleryEventsConfig,
        transport: Transport | None = None,
        *,
        task_options: Mapping[str, Mapping[str, Any]] | None = None,
        on_refused: Callable[[Emission, str], None] | None = None,
    ) -> None:
        self._config = config
        self._celery_app = celery_app
        self._owns_transport = transport is None
        self._task_options = task_options
        self._transport = transport or transport_for(celery_app, task_options)
        self._on_refused = on_refused
        self.route: Route = getattr(self._transport, "route", None) or EventRouter(celery_app, task_options)
        """Where each emission goes (the Celery app's router and settings; see ``transports.routing``)."""
        self._batches = BatchSizer(config)
        self._pid = os.getpid()
        self._broker = redact_url(config.resolved_broker_url)
        self._buffer: deque[Emission] = deque()
        self._wakeup = threading.Event()
        self._idle = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._in_flight: list[Emission] = []
        self._flush_deadline_passed = False
        self._count_lock = threading.Lock()  # emit may run on several threads (sync handlers)
        self._emitted_by_thread: dict[int, int] = {}
        self.adopted = 0
        self.published = 0
        self.refused = 0  # the broker would never take them (too big): in the failed-events store
        self.lost = 0
        self._dropped_from_memory = 0
        self.spool: Spool | None = None
        if config.spool:
            from litestar_celery_events.stores.spool import Spool

            self.spool = Spool(config)
        self._spool_after = config.spool_after_events
        self._max_buffered = config.max_buffered_events
        self._watched: list[Emission] | None = None
        self._watched_since = 0.0
        self._spooled_in_flight: set[str] = set()
        self.on_published: Callable[[list[Emission]], None] | None = None  # the outbox's: deletes their rows
        self._init_loop_state()

    @property
    def emitted(self) -> int:
        """Events handed to this publisher since it started."""
        return sum(list(self._emitted_by_thread.values()))

    @property
    def pending(self) -> int:
        return len(self._buffer)

    @property
    def spooled(self) -> int:
        """Events waiting in this process's spool files (0 without ``spool``)."""
        return 0 if self.spool is None else self.spool.depth

    @property
    def dropped(self) -> int:
        """Events dropped by a ``drop_oldest`` policy (memory buffer and spool)."""
        return self._dropped_from_memory + (0 if self.spool is None else self.spool.dropped)

    @property
    def waiting(self) -> int:
        """Events not yet taken by the broker: buffered, in flight, or in the spool."""
        # A stalled batch is in the spool and in flight at once: count it once.
        in_flight = 0 if self._spooled_in_flight else len(self._in_flight)
        return len(self._buffer) + in_flight + self._loop_waiting + self.spooled

    def counts(self) -> PublisherCounts:
        return PublisherCounts(
            emitted=self.emitted,
            adopted=self.adopted,
            published=self.published,
            waiting=self.waiting,
            refused=self.refused,
            dropped=self.dropped,
            lost=self.lost,
        )

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if self._pid != os.getpid():
            # A forked child (a Celery pool process): the parent publishes what it buffered, and the
            # parent's broker connection is left alone (closing it here could close it for both).
            self._buffer.clear()
            self._emitted_by_thread = {}
            self.adopted = self.published = self.lost = self.refused = self._dropped_from_memory = 0
            if self._owns_transport:
                self._transport = transport_for(self._celery_app, self._task_options)
            self._pid = os.getpid()
            self._init_loop_state()  # the parent's event loop is not this process's
        if self.spool is not None:
            before = self.spool.depth
            self.adopted += self.spool.adopt_orphans() - before  # what a dead process left goes out first
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="celery-events-publisher", daemon=True)
        self._thread.start()

    def submit(self, emission: Emission) -> None:
        """Hand ``emission`` to the publisher thread (no network I/O on the caller's thread)."""
        if self.spool is None and len(self._buffer) < self._max_buffered:
            self._buffer.append(emission)  # ``_accept``'s common case, one frame fewer
            self._wake_drainer()
        else:
            self._accept(emission)
        # Per thread (emit may run on several: sync handlers), so no lock and no lost count.
        counts = self._emitted_by_thread
        thread = threading.get_ident()
        counts[thread] = counts.get(thread, 0) + 1

    def _accept(self, emission: Emission) -> None:
        spool = self.spool
        if spool is not None and spool.active:  # the broker is away: on disk before emit returns
            spool.put_or_raise(emission)
            if self._idle:
                self._wakeup.set()
            return
        buffer = self._buffer
        if spool is not None and self._in_flight and len(buffer) >= self._spool_after and self._publish_stalled():
            self._spill_stalled(spool)
            spool.put_or_raise(emission)
            return
        if len(buffer) >= self._max_buffered:
            if spool is not None:
                spool.spill(buffer)
                spool.put_or_raise(emission)
                return
            self._overflow(emission)
        buffer.append(emission)
        if spool is not None and spool.active:  # the publisher began spooling meanwhile: join it on disk
            spool.spill(buffer)
        self._wake_drainer()

    def _overflow(self, emission: Emission) -> None:
        if self._config.buffer_full_policy == "raise":
            raise EventBufferFullError(
                f"cannot emit event {emission.event_id!r}: {len(self._buffer)} events are waiting for the broker "
                f"({self._broker}); raise max_buffered_events or check the broker"
            )
        lost = self._buffer.popleft()
        with self._count_lock:
            self._dropped_from_memory += 1
        logger.error(
            "publisher buffer full: dropped oldest event %r (emission %s); %d dropped so far",
            lost.event_id,
            lost.emission_id,
            self._dropped_from_memory,
        )

    def stop(self, timeout_s: float | None = None) -> int:
        """Flush for at most ``timeout_s`` and stop; return (and log) how many events stayed unpublished."""
        thread = self._thread
        if thread is None:
            return 0
        deadline = time.monotonic() + (self._config.flush_timeout_s if timeout_s is None else timeout_s)
        self._stopping = True
        loop = self._leave_loop()
        self._wakeup.set()
        spool = self.spool
        # In flight too: a batch that fails (or holds a refused message) goes back to the buffer first.
        while (self._buffer or self._in_flight or self._loop_waiting or (spool and spool.active)) and thread.is_alive():
            if time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        self._flush_deadline_passed = True
        self._wakeup.set()
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        unpublished = self._loop_unpublished() + list(self._buffer) + (self._in_flight if thread.is_alive() else [])
        self._buffer.clear()  # now counted as spooled or lost, not waiting
        self._in_flight = []
        self._thread = None
        self._close_loop_connection(loop)
        if spool is not None:
            refused = spool.put(unpublished) if unpublished else []
            on_disk = spool.close()
            if on_disk:
                logger.error(
                    "%d emitted event(s) could not be published to %s before shutdown; they stay in the spool "
                    "under %s and the next process started with this data_dir publishes them",
                    on_disk,
                    self._broker,
                    spool.folder,
                )
            unpublished = refused
        left = len(unpublished)
        self.lost += left
        if left:
            logger.error(
                "%d emitted event(s) could not be published to %s before shutdown and are lost: %s",
                left,
                self._broker,
                ", ".join(sorted({e.event_id for e in unpublished})),
            )
        self._transport.close()
        return left

    def _next_batch(self) -> list[Emission]:
        """The oldest events that fit one round trip (``BatchSizer``)."""
        buffer = self._buffer
        size = self._batches.fitting(len(emission.body) for emission in islice(buffer, self._batches.cap))
        batch: list[Emission] = []
        self._in_flight = batch  # each event is in the buffer or in flight at every moment (stop() looks)
        for _ in range(size):
            batch.append(buffer[0])
            buffer.popleft()
        return batch

    def _after_failure(self, batch: list[Emission], done: int, exc: Exception) -> list[Emission]:
        return self._batches.after_failure(batch, done, exc, getattr(self._transport, "reachable", None))

    def _refuse(self, emission: Emission, exc: Exception) -> None:
        """Hand a message the broker never takes to the failed-events store (``on_refused``); never silent."""
        reason = f"the broker {self._broker} does not take this message: {type(exc).__name__}: {redact_url(str(exc))}"
        self.refused += 1
        logger.error(
            "event %r (emission %s) cannot be published: %s%s",
            emission.event_id,
            emission.emission_id,
            reason,
            "; it goes to the failed-events store" if self._on_refused is not None else "; it is dropped",
        )
        if self._on_refused is not None:
            try:
                self._on_refused(emission, reason)
            except Exception:
                logger.exception("could not record unpublishable emission %s", emission.emission_id)

    def _run(self) -> None:
        failures = 0
        self._flush_deadline_passed = False
        while True:
            spool = self.spool
            if spool is not None and (spool.active or (failures and len(self._buffer) > self._spool_after)):
                if self._flush_deadline_passed:
                    return
                failures = self._publish_from_spool(spool, failures)
                continue
            if not self._buffer and self._stopping:
                if not self._loop_waiting:
                    return
                self._wakeup.wait(0.005)  # writes from the loop await their replies
                continue
            self._maybe_resume_loop(failures)
            if self._on_loop or not self._buffer:
                self._wait_idle()
                continue
            if self._flush_deadline_passed:
                return
            batch = self._next_batch()
            done = [0]
            started = time.monotonic()
            try:
                self._transport.publish(batch, done)
            except Exception as exc:  # noqa: BLE001 - any broker error: keep the events, retry later
                refused = self._after_failure(batch, done[0], exc)
                self._buffer.extendleft(reversed(batch[done[0] + len(refused) :]))
                self._report_published(batch[: done[0] + len(refused)])
                self.published += done[0]
                self._in_flight = []
                if refused:
                    self._refuse(refused[0], exc)
                    continue
                failures += 1
                self._back_off(exc, failures, f"{len(self._buffer)} event(s) waiting")
                continue
            self._batches.after_success()
            if failures:
                logger.warning("publishing to %s again after %d failed attempt(s)", self._broker, failures)
                failures = 0
            self._report_published(batch)
            self.published += len(batch)
            self._in_flight = []
            self._drop_spooled_copies(spool)
            if len(self._buffer) < self._batches.cap and not self._stopping:
                # A steady stream goes out in batches: the busier the stream (the bigger this batch),
                # the longer until the next round trip, within MIN/MAX_PUBLISH_INTERVAL_S. After a
                # quiet spell the thread is idle and the next event goes out at once.
                interval = min(MAX_PUBLISH_INTERVAL_S, MIN_PUBLISH_INTERVAL_S * len(batch))
                rest = started + interval - time.monotonic()
                if rest > 0:
                    time.sleep(rest)

    def _wait_idle(self) -> None:
        """Nothing for the thread to publish (its buffer is empty, or the event loop publishes): wait."""
        self._idle = True
        if not self._buffer or self._on_loop:
            self._wakeup.wait(IDLE_WAIT_S)
        self._idle = False
        self._wakeup.clear()
        self._nudge_loop()

    def _report_published(self, batch: list[Emission]) -> None:
        """Sent, or refused and recorded as failed: either way the outbox's rows of ``batch`` are done."""
        if self.on_published is not None and batch:
            self.on_published(batch)  # set operations only: never raises, never blocks

    def _back_off(self, exc: Exception, failures: int, waiting: str) -> None:
        """After a failed publish: drop the connection, log now and then, wait (exponential, capped)."""
        self._transport.close()
        if worth_logging(failures):
            logger.warning("cannot publish to %s (%s); %s, retrying", self._broker, redact_url(str(exc)), waiting)
        self._wakeup.wait(retry_delay_s(failures))
        self._wakeup.clear()
