"""Exceptions raised at the call site: each names the event and says what to fix."""

from __future__ import annotations

__all__ = (
    "EmitterNotRunningError",
    "EventBufferFullError",
    "EventPayloadError",
    "ListenerSignatureError",
    "OutboxConfigError",
    "PayloadTooLargeError",
    "PluginNotInstalledError",
    "StateStoreError",
)


class EventPayloadError(TypeError):
    """The emitted arguments cannot be encoded as JSON; nothing was enqueued."""


class PayloadTooLargeError(EventPayloadError):
    """The encoded arguments exceed ``CeleryEventsConfig.max_payload_bytes``; nothing was enqueued."""


class ListenerSignatureError(TypeError):
    """A registered listener cannot accept the emitted arguments; nothing was enqueued."""


class EmitterNotRunningError(RuntimeError):
    """``emit`` was called outside the Litestar app's lifespan (before startup or after shutdown)."""


class EventBufferFullError(RuntimeError):
    """The publisher's buffer is full (broker away for long) and the policy is ``raise``."""


class PluginNotInstalledError(TypeError):
    """The Litestar app has no ``CeleryEventsPlugin`` (its emitter is not this library's)."""

    def __init__(self) -> None:
        super().__init__("this Litestar app has no CeleryEventsPlugin: add plugins=[CeleryEventsPlugin(config)]")


class OutboxConfigError(RuntimeError):
    """The transactional outbox cannot work as configured (raised at start-up, naming the fix)."""


class StateStoreError(RuntimeError):
    """The shared state store (``state_url``) is not usable: a bad URL, a missing extra, or unreachable
    at start-up (raised then, naming the setting, never at the first cancel or failure)."""
