"""Runs once: the worker skips listeners the ledger says already completed for an emission.

On by default with an outbox (``CeleryEventsConfig.listener_ledger``). The ledger lives in the state
store (``state_url``: by default the broker's Redis, else the outbox database). A ledger that cannot be reached
never stops a listener: the run goes ahead (at-least-once, as without a ledger) and a warning says so.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from litestar_celery_events.brokers import redact_url
from litestar_celery_events.stores.state import ledger_for

if TYPE_CHECKING:
    from celery import Celery

    from litestar_celery_events.emitter import CeleryEventEmitter
    from litestar_celery_events.stores.ledger import ListenerLedger

__all__ = ("RunOnce", "run_once_for")

logger = logging.getLogger("litestar_celery_events.worker")


class RunOnce:
    """The ledger as the tasks use it: lookups and records that never raise."""

    def __init__(self, ledger: ListenerLedger) -> None:
        self.ledger = ledger
        self._failures = 0

    def completed(self, emission_id: str) -> set[str]:
        try:
            return self.ledger.completed(emission_id)
        except Exception as exc:  # noqa: BLE001 - unreachable ledger: run (at-least-once), say so
            self._warn("cannot read", exc)
            return set()

    def record(self, emission_id: str, listener: str) -> None:
        try:
            self.ledger.record(emission_id, listener)
        except Exception as exc:  # noqa: BLE001 - the listener ran; a duplicate may run it again
            self._warn("cannot record a completed run in", exc)

    def skipped(self, event_id: str, emission_id: str, listener: str) -> None:
        logger.info(
            "listener %s already completed for emission %s of event %r: not run again",
            listener,
            emission_id,
            event_id,
            extra={"event_id": event_id, "emission_id": emission_id, "listener": listener},
        )

    def _warn(self, what: str, exc: Exception) -> None:
        self._failures += 1
        if self._failures == 1 or self._failures % 100 == 0:
            logger.warning(
                "%s the listener ledger (%s): %s; listeners run anyway (at-least-once)",
                what,
                self.ledger.location,
                redact_url(f"{type(exc).__name__}: {exc}"),
            )


def run_once_for(emitter: CeleryEventEmitter, celery_app: Celery) -> RunOnce | None:
    """The worker's ledger, or None when ``listener_ledger`` is off (by default: without an outbox)."""
    config = emitter.config
    enabled = config.listener_ledger if config.listener_ledger is not None else emitter.outbox is not None
    if not enabled:
        return None
    return RunOnce(ledger_for(config, celery_app))
