"""Test helpers for applications: assert which events were emitted, or run listeners inline; no broker.

``fake_events(app)`` records every emission instead of publishing it (as Laravel's
``Event::fake()``); ``inline_events(app)`` also runs the listeners in the test process, one after
the other, with the worker's retry and failure rules. Both keep every check ``emit`` makes in
production (a registered listener, arguments that fit, a JSON-encodable payload, typed payloads),
so a test fails where production would.

```python
from litestar.testing import TestClient
from litestar_celery_events.testing import fake_events


def test_signing_up_emits_user_created() -> None:
    with fake_events(app) as events, TestClient(app) as client:
        client.post("/users", json={"email": "ada@example.com"})
    events.assert_emitted("user_created", email="ada@example.com")
```
"""

from litestar_celery_events.testing.inline import InlineEvents, inline_events
from litestar_celery_events.testing.recording import (
    EmittedEvent,
    EventRecorder,
    ListenerFailedError,
    ListenerRun,
    fake_events,
)

__all__ = (
    "EmittedEvent",
    "EventRecorder",
    "InlineEvents",
    "ListenerFailedError",
    "ListenerRun",
    "fake_events",
    "inline_events",
)
