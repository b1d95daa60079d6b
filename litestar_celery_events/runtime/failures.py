"""What happens to a listener that will not succeed: one record, logged and handed to the sinks."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from litestar_celery_events.config import redact_url

if TYPE_CHECKING:
    from litestar_celery_events.failed_store import FailedStore

__all__ = ("ListenerFailure", "add_failure_sink", "record_failures_in", "remove_failure_sink", "report_failure")

logger = logging.getLogger("litestar_celery_events.worker")

FailureSink = Callable[["ListenerFailure"], None]
_sinks: list[FailureSink] = []


@dataclass
class ListenerFailure:
    """A listener run that failed for good: retries exhausted, or an error no retry can fix."""

    event_id: str
    emission_id: str
    listener: str
    args: list[Any]
    kwargs: dict[str, Any]
    exc_type: str
    message: str
    traceback: str
    attempts: int
    permanent: bool
    """True when retrying could not help (signature mismatch, unknown listener)."""
    emitted_at: float | None = None
    failed_at: float = field(default_factory=time.time)

    @classmethod
    def from_exception(cls, exc: BaseException, **fields: Any) -> ListenerFailure:
        return cls(
            exc_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            message=redact_url(str(exc)),  # a listener's error may quote a URL with its password
            traceback=redact_url("".join(traceback.format_exception(exc))),
            **fields,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
