"""What happens to a listener that will not succeed: one record, logged and handed to the sinks."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from litestar_celery_events.brokers import redact_url
from litestar_celery_events.contract.failures import ListenerFailure

if TYPE_CHECKING:
    from litestar_celery_events.stores.failed import FailedStore

__all__ = (
    "ListenerFailure",
    "add_failure_sink",
    "failure_from_exception",
    "record_failures_in",
    "remove_failure_sink",
    "report_failure",
)

logger = logging.getLogger("litestar_celery_events.worker")

FailureSink = Callable[["ListenerFailure"], None]
_sinks: list[FailureSink] = []


def failure_from_exception(exc: BaseException, **fields: Any) -> ListenerFailure:
    """The record of ``exc``, secrets redacted (a listener's error may quote a URL with its password)."""
    return ListenerFailure(
        exc_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=redact_url(str(exc)),
        traceback=redact_url("".join(traceback.format_exception(exc))),
        **fields,
    )


def add_failure_sink(sink: FailureSink) -> None:
    """Call ``sink`` with every final listener failure (the failed-events store registers here)."""
    if sink not in _sinks:
        _sinks.append(sink)


def remove_failure_sink(sink: FailureSink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def record_failures_in(store: FailedStore) -> FailureSink:
    """Write every final failure to ``store`` (the worker app does this at start-up)."""

    def record(failure: ListenerFailure) -> None:
        record_id = store.add(failure)
        logger.info(
            "recorded failed event %s in %s: replay with `litestar events failed replay %s`",
            record_id,
            store.location,
            record_id,
        )

    add_failure_sink(record)
    return record


def report_failure(failure: ListenerFailure) -> None:
    logger.error(
        "listener %s failed for good on event %r (emission %s) after %d attempt(s): %s: %s",
        failure.listener,
        failure.event_id,
        failure.emission_id,
        failure.attempts,
        failure.exc_type,
        failure.message,
        extra={"event_id": failure.event_id, "emission_id": failure.emission_id, "listener": failure.listener},
    )
    for sink in _sinks:
        try:
            sink(failure)
        except Exception:
            logger.exception("failure sink %r could not record emission %s", sink, failure.emission_id)
