"""What the publisher needs from a broker: publish a batch in order, close."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from litestar_celery_events.contract.message import Emission

__all__ = ("Transport", "origin_nodename")


class Transport(Protocol):
    def publish(self, batch: list[Emission], done: list[int]) -> None:
        """Publish ``batch`` in order; keep ``done[0]`` equal to the number sent, even if this raises."""

    def close(self) -> None:
        """Drop the connection; the next ``publish`` reconnects."""


def origin_nodename() -> str:
    """Celery's ``origin`` header for messages sent from this process (as ``apply_async`` sets it)."""
    return f"gen{os.getpid()}@{socket.gethostname()}"
