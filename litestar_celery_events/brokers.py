"""Broker URLs: which broker a URL names, the server-less default, and URLs safe to print."""

from __future__ import annotations

import re

__all__ = (
    "EMBEDDED_BROKER_URL",
    "REDIS_SCHEMES",
    "embedded_broker_url",
    "is_embedded_url",
    "is_redis_url",
    "redact_url",
)

REDIS_SCHEMES = ("redis://", "rediss://")
EMBEDDED_BROKER_URL = "filesystem://"
"""kombu's filesystem transport (its folders are set in transport options): needs no server."""

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
