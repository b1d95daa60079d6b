"""The outbox's background thread, one per process: clear, keep, relay.

- clear: the publisher reports each batch it published; their outbox rows are deleted (batched).
- keep: rows this process committed but has not published yet (broker away) get their lease
  renewed, so no other process relays them while this one still holds them in memory.
- relay (web processes and worker main processes): rows whose lease ran out belong to a process
  that died between commit and publish; they are claimed, published and deleted here.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

from litestar_celery_events.brokers import redact_url
from litestar_celery_events.stores.outbox import DATABASE_ERRORS
from litestar_celery_events.transports.base import MessageRefused

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from litestar_celery_events.config import CeleryEventsConfig
    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.stores.outbox import OutboxStore
    from litestar_celery_events.transports import Transport

__all__ = ("OutboxRelay",)

logger = logging.getLogger("litestar_celery_events.outbox")

MAX_TICK_S = 0.5
"""Longest wait between two rounds (deletes of published rows, lease renewals)."""
MAX_ORPHAN_LOOK_S = 3.0
"""Longest wait between two looks for orphaned rows: a tenth of the lease, at most this (each look is a
claim query; rows are orphaned for a whole lease before any look can take them)."""
MAX_BACKOFF_S = 5.0


class OutboxRelay:
    """Per process: clears the rows of published emissions, keeps the lease of those still waiting in
    memory, and (``relay=True``) publishes rows whose owner is gone."""

    def __init__(
        self,
        open_store: Callable[[], OutboxStore],
        batch_size: int,
        config: CeleryEventsConfig,
        open_transport: Callable[[], Transport],
        on_refused: Callable[[Emission, str], None],
    ) -> None:
        self._open_store = open_store
        self._batch_size = batch_size
        self._open_transport = open_transport  # the publisher's kind: same routing, same task options
        self._on_refused = on_refused
        self.lease_s = config.outbox_relay_after_s
        self._tick_s = min(MAX_TICK_S, self.lease_s / 4)
        self._orphan_look_s = max(self._tick_s, min(MAX_ORPHAN_LOOK_S, self.lease_s / 10))
        self._pid = 0
        self._lock = threading.Lock()
        self._store: OutboxStore | None = None
        self._store_pid = 0
        self._transport: Transport | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._relaying = False
        self._unpublished: set[str] = set()
        self._to_delete: list[str] = []
        self.owner = ""
        self.relayed = 0

    @property
    def store(self) -> OutboxStore:
        if self._store is None or self._store_pid != os.getpid():
            self._store = self._open_store()
            self._store_pid = os.getpid()
        return self._store

    @property
    def waiting(self) -> int:
        """Emissions this process committed and has not published yet."""
        return len(self._unpublished)

    def ensure_started(self, relay: bool = False) -> None:
        """Start the thread in this process (again after a fork); ``relay`` also takes orphaned rows."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._reset_after_fork()
        if relay and not self._relaying:
            self._relaying = True
            logger.info("outbox: process %d relays rows whose owner is gone (lease %.0f s)", os.getpid(), self.lease_s)
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._stopping = False
                    self._thread = threading.Thread(target=self._run, name="celery-events-outbox", daemon=True)
                    self._thread.start()

    def _reset_after_fork(self) -> None:
        """First start in this process: a new owner id; after a fork, nothing of the parent's state."""
        if self._pid:  # a forked child: the parent's thread, connections and ids are the parent's
            if self._store is not None and self._store_pid != os.getpid():
                self._store.engine.dispose(close=False)
                self._store = None
            self._transport = None
            self._thread = None
            self._unpublished = set()
            self._to_delete = []
            self._relaying = False
        self._pid = os.getpid()
        self.owner = f"{socket.gethostname()}:{self._pid}:{uuid.uuid4().hex[:8]}"

    def track(self, emissions: Iterable[Emission]) -> None:
        """Committed: these rows are this process's until published (call before handing them over)."""
        self._unpublished.update(e.emission_id for e in emissions)

    def untrack(self, emissions: Iterable[Emission]) -> None:
        """Not handed to the publisher after all: their rows wait for a relay."""
        self._unpublished.difference_update(e.emission_id for e in emissions)

    def published(self, batch: list[Emission]) -> None:
        """The publisher's hook (its thread): these went out; delete the rows of the tracked ones."""
        unpublished = self._unpublished
        if not unpublished:
            return
        for emission in batch:
            emission_id = emission.emission_id
            if emission_id in unpublished:
                unpublished.discard(emission_id)
                self._to_delete.append(emission_id)

    def stop(self) -> None:
        """Delete the rows of what was published, stop the thread; unpublished rows wait for a relay."""
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return
        self._stopping = True
        self._wake.set()
        thread.join(timeout=10.0)
        self._thread = None
        if self._unpublished:
            logger.warning(
                "%d committed event(s) were not published before shutdown; their outbox rows stay and a live "
                "process relays them after outbox_relay_after_s=%.0fs",
                len(self._unpublished),
                self.lease_s,
            )
        if self._transport is not None:
            self._transport.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    def _run(self) -> None:
        failures = 0
        next_renewal = time.monotonic() + self.lease_s / 3
        next_look = 0.0
        while True:
            stopping = self._stopping
            try:
                self._clear()
                if time.monotonic() >= next_renewal and self._unpublished:
                    self.store.renew(list(self._unpublished), time.time() + self.lease_s)
                    next_renewal = time.monotonic() + self.lease_s / 3
                if self._relaying and not stopping and time.monotonic() >= next_look:
                    while self.relay_once() and not self._stopping:
                        pass
                    next_look = time.monotonic() + self._orphan_look_s
                failures = 0
            except Exception as exc:  # noqa: BLE001 - database or broker away: rows wait, retry later
                failures += 1
                if failures == 1 or failures % 50 == 0:
                    logger.warning("outbox: %s; retrying", redact_url(f"{type(exc).__name__}: {exc}"))
                if self._transport is not None:
                    self._transport.close()
                self._wake.wait(min(MAX_BACKOFF_S, self._tick_s * 2**failures))
            if stopping:
                return
            self._wake.wait(self._tick_s)
            self._wake.clear()

    def _clear(self) -> None:
        if self._to_delete:
            ids, self._to_delete = self._to_delete, []
            try:
                self.store.delete(ids)
            except DATABASE_ERRORS:
                self._to_delete.extend(ids)  # deleted next round; a relay meanwhile only duplicates (the ledger)
                raise

    def relay_once(self) -> int:
        """Claim, publish and delete one batch of orphaned rows; return how many went out."""
        now = time.time()
        claimed = self.store.claim(self.owner or "relay", now, now + self.lease_s, self._batch_size)
        if not claimed:
            return 0
        if self._transport is None:
            self._transport = self._open_transport()
        batch = [c.emission for c in claimed]
        sent, gone = 0, 0  # gone: sent, or refused and handed to the failed-events store
        try:
            while gone < len(batch):
                done = [0]
                try:
                    self._transport.publish(batch[gone:], done)
                except MessageRefused as exc:  # that one never goes: recorded as failed, the rest go on
                    sent, gone = sent + done[0], gone + done[0] + 1
                    self._on_refused(batch[gone - 1], f"the broker does not take this message: {redact_url(str(exc))}")
                    continue
                except Exception:
                    sent, gone = sent + done[0], gone + done[0]
                    raise  # the rest keep this relay's lease: retried after it, by any live process
                sent, gone = sent + done[0], gone + done[0]
                if not done[0]:
                    break  # a transport that sent nothing without an error: the rest wait for the lease
        finally:
            if gone:
                self.store.delete([e.emission_id for e in batch[:gone]])
                self.relayed += sent
                owners = sorted({c.previous_owner for c in claimed[:gone]})
                logger.warning(
                    "outbox: relayed %d event(s) whose process stopped before publishing them "
                    "(%s; oldest emitted %.1fs ago)",
                    sent,
                    ", ".join(owners[:5]) + (" ..." if len(owners) > 5 else ""),
                    now - min(e.emitted_at for e in batch),
                )
        return gone
