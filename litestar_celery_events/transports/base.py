"""What the publisher needs from a broker: publish a batch in order, close."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from litestar_celery_events.contract.message import Emission

__all__ = ("MessageRefused", "Transport", "origin_nodename")


class Transport(Protocol):
    def publish(self, batch: list[Emission], done: list[int]) -> None:
        """Publish ``batch`` in order; keep ``done[0]`` equal to the number sent, even if this raises.

        Raises ``MessageRefused`` when ``batch[done[0]]`` can never be written to this broker. A
        transport may also offer ``reachable() -> bool`` (does the broker answer now?): with it, a
        message that keeps failing on its own while the broker answers is taken as refused too.
        """

    def close(self) -> None:
        """Drop the connection; the next ``publish`` reconnects."""


class MessageRefused(Exception):
    """The message at ``done[0]`` of a batch can never be written to this broker (e.g. over its size limit)."""


def origin_nodename() -> str:
    """Celery's ``origin`` header for messages sent from this process (as ``apply_async`` sets it)."""
    return f"gen{os.getpid()}@{socket.gethostname()}"
