"""The next ``BRPOP`` sent before the message just fetched is handed to Celery (Redis brokers).

kombu's Redis transport fetches one message per ``BRPOP`` and sends the next one only after the
message went through reservation (a ``MULTI``/``EXEC`` round trip that records it as
unacknowledged) and Celery's consumer: two round trips, one after the other, per message. With
many listeners in flight that chain is the worker's ceiling. This step sends the next ``BRPOP``
as soon as a reply has been read, so it travels while the message is reserved and dispatched.
Nothing else changes: the message is still recorded as unacknowledged before any listener runs,
prefetch still bounds what is fetched (at most one message over it), and a pending
re-authentication token is sent at an idle moment as kombu does (no early ``BRPOP`` then).
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

__all__ = ("EarlyRedisFetch",)


class _EarlyBrpop:
    """Wraps one channel's ``BRPOP`` reply handler and its transport's ``_deliver``."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.transport = channel.connection
        self.original_read = channel.handlers["BRPOP"]
        self.original_deliver = self.transport._deliver
        self.original_flush = getattr(channel, "_flush_brpop_reauth", None)
        self.reading = False
        self.sent_early: Any = None

    def install(self) -> None:
        self.channel.handlers["BRPOP"] = self.read
        self.transport._deliver = self.deliver
        if self.original_flush is not None:
            self.channel._flush_brpop_reauth = self.flush_reauth

    def uninstall(self) -> None:
        self.channel.handlers["BRPOP"] = self.original_read
        self.transport._deliver = self.original_deliver
        if self.original_flush is not None:
            self.channel._flush_brpop_reauth = self.original_flush

    def read(self, **options: Any) -> Any:
        self.reading = True
        try:
            return self.original_read(**options)
        finally:
            self.reading = False
            if self.sent_early is not None:
                self.channel._in_poll = self.sent_early  # kombu cleared it: that BRPOP is in flight
                self.sent_early = None

    def deliver(self, message: Any, queue: str) -> Any:
        if self.reading and self.sent_early is None and self._may_send_early():
            channel = self.channel
            channel._in_poll = None
            self.transport.cycle._register_BRPOP(channel)
            self.sent_early = channel._in_poll or None
        return self.original_deliver(message, queue)

    def flush_reauth(self) -> None:
        if self.sent_early is None:  # kombu calls this right after a read: not while our BRPOP travels
            assert self.original_flush is not None
            self.original_flush()

    def _may_send_early(self) -> bool:
        channel = self.channel
        pending_token = getattr(channel, "_pending_reauth_token", None)
        if pending_token is not None and pending_token(channel.client.connection) is not None:
            return False
        return bool(channel.qos.can_consume())


class EarlyRedisFetch(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Consumer step: the task consumer channel sends its next ``BRPOP`` early (Redis only)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.patch: _EarlyBrpop | None = None

    def start(self, parent: Any) -> None:
        channel = getattr(getattr(parent, "task_consumer", None), "channel", None)
        handlers = getattr(channel, "handlers", None)
        transport = getattr(channel, "connection", None)
        if not isinstance(handlers, dict) or "BRPOP" not in handlers or not hasattr(transport, "cycle"):
            return  # not kombu's Redis transport: nothing to do
        self.patch = _EarlyBrpop(channel)
        self.patch.install()

    def stop(self, parent: Any) -> None:
        patch, self.patch = self.patch, None
        if patch is not None:
            patch.uninstall()

    shutdown = stop
