"""Broker URLs: which broker a URL names, the server-less default, and URLs safe to print."""

from __future__ import annotations

import re

__all__ = (
    "EMBEDDED_BROKER_URL",
    "REDIS_SCHEMES",
    "SOCKET_TIMEOUT_S",
    "retry_delay_s",
    "worth_logging",
    "embedded_broker_url",
    "is_embedded_url",
    "is_redis_url",
    "redact_url",
)

REDIS_SCHEMES = ("redis://", "rediss://")
EMBEDDED_BROKER_URL = "filesystem://"
"""kombu's filesystem transport (its folders are set in transport options): needs no server."""

SOCKET_TIMEOUT_S = 10.0
"""Default socket timeout of the library's own Redis clients (publisher, stores, mover, CLI)."""
MAX_RETRY_DELAY_S = 2.0

_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z0-9+.\-]+://[^:/@\s]*:)(?P<secret>\S+)(?P<tail>@)", re.IGNORECASE)


def redact_url(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``: broker secrets never reach logs."""
    return _PASSWORD_IN_URL.sub(r"\g<head>***\g<tail>", text)


def embedded_broker_url() -> str:
    """The server-less default broker."""
    return EMBEDDED_BROKER_URL


def is_redis_url(url: object) -> bool:
    """True for the URLs kombu's Redis transport serves (``redis://``, ``rediss://``)."""
    return str(url).startswith(REDIS_SCHEMES)


def is_embedded_url(url: object) -> bool:
    return str(url).startswith(EMBEDDED_BROKER_URL)


def retry_delay_s(failures: int) -> float:
    """Wait after ``failures`` broker errors in a row (publisher, mover): 0.1 s, doubling, capped at 2 s."""
    return min(MAX_RETRY_DELAY_S, 0.05 * 2.0 ** min(failures, 6))


def worth_logging(failures: int) -> bool:
    """Log the first broker error of a run and every 50th after it, not each retry."""
    return failures == 1 or failures % 50 == 0
