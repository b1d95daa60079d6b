"""Broker URLs: which broker a URL names, the server-less default, URLs safe to print, retry pacing."""

from __future__ import annotations

import re

__all__ = (
    "AMQP_TRANSPORTS",
    "EMBEDDED_BROKER_URL",
    "MAX_AMQP_DELAY_S",
    "REDIS_TRANSPORTS",
    "SOCKET_TIMEOUT_S",
    "BrokerSettingError",
    "embedded_broker_url",
    "is_amqp_url",
    "is_embedded_url",
    "is_redis_url",
    "redact_url",
    "retry_delay_s",
    "worth_logging",
)

EMBEDDED_BROKER_URL = "filesystem://"
"""kombu's filesystem transport (its folders are set in transport options): needs no server."""
SOCKET_TIMEOUT_S = 10.0
"""Socket timeouts of the library's own Redis clients when ``broker_transport_options`` sets none
(kombu's default is to wait forever: a half-open connection would hang a publish or a store call)."""
MAX_RETRY_DELAY_S = 2.0

# The secret runs to the last "@" before the end of that URL: a space, a quote, or the ";" between
# the URLs of a failover or Sentinel list (kombu splits there, so no usable password contains one).
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z0-9+.\-]+://[^:/@\s;]*:)(?P<secret>[^\s;\"']+)(?P<tail>@)", re.IGNORECASE)


class BrokerSettingError(ValueError):
    """A broker setting the library cannot honour the way Celery does; raised at start-up, naming it."""


def redact_url(text: str) -> str:
    """Replace the password of every URL in ``text`` (``;`` lists too) with ``***``: secrets never reach logs."""
    return _PASSWORD_IN_URL.sub(r"\g<head>***\g<tail>", text)


def embedded_broker_url() -> str:
    """The server-less default broker."""
    return EMBEDDED_BROKER_URL


def is_embedded_url(url: object) -> bool:
    return str(url).startswith(EMBEDDED_BROKER_URL)


def retry_delay_s(failures: int) -> float:
    """Wait after ``failures`` broker errors in a row (publisher, mover): 0.1 s, doubling, capped at 2 s."""
    return min(MAX_RETRY_DELAY_S, 0.05 * 2.0 ** min(failures, 6))


def worth_logging(failures: int) -> bool:
    """Log the first broker error of a run and every 50th after it, not each retry."""
    return failures == 1 or failures % 50 == 0


REDIS_TRANSPORTS = frozenset({"redis", "rediss", "sentinel"})
"""kombu transports served by ``kombu.transport.redis`` (``redis+socket://`` is ``redis``)."""


def _scheme(url: str) -> str:
    first = url.split(";", 1)[0].strip()
    return first.partition("://")[0].lower() if "://" in first else ""


def is_redis_url(url: object) -> bool:
    """True for a broker URL Celery serves through kombu's Redis transport (TLS, unix socket, Sentinel too)."""
    return _scheme(str(url)).partition("+")[0] in REDIS_TRANSPORTS


AMQP_TRANSPORTS = frozenset({"amqp", "amqps", "pyamqp"})
"""kombu transports served by py-amqp (RabbitMQ); ``librabbitmq`` is not among them (another channel API)."""
MAX_AMQP_DELAY_S = 2**28 - 1
"""The longest delay RabbitMQ's 28 delay levels hold: 268,435,455 s, about 8.5 years."""


def is_amqp_url(url: object) -> bool:
    """True for a broker URL Celery serves through kombu's py-amqp transport (RabbitMQ)."""
    return _scheme(str(url)).partition("+")[0] in AMQP_TRANSPORTS
