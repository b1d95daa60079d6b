"""Events that follow the database transaction (web side): the session hooks and the relay thread.

``transactions``: ``SQLAlchemyOutbox`` and what holds, writes and hands over emissions at commit.
``relay``: per process, deletes published rows, renews leases, publishes rows a dead process left.
The table and its SQL live in ``stores.outbox``.
"""

from litestar_celery_events.outbox.transactions import (
    SessionBinding,
    SQLAlchemyOutbox,
    TransactionalOutbox,
    remember_request_scope,
    start_outbox,
    stop_outbox,
)

__all__ = (
    "SQLAlchemyOutbox",
    "SessionBinding",
    "TransactionalOutbox",
    "remember_request_scope",
    "start_outbox",
    "stop_outbox",
)
