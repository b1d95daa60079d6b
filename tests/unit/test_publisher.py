"""The publisher against a scripted in-memory transport (pure unit tests, no broker)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from celery import Celery

from litestar_celery_events import CeleryEventsConfig, EventBufferFullError
from litestar_celery_events.contract.message import Emission
from litestar_celery_events.publisher import Publisher
from tests.helpers import wait_for


class ScriptedTransport:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.down = threading.Event()
        self.block = threading.Event()
        self.batches: list[int] = []

    def publish(self, batch: list[Emission], done: list[int]) -> None:
        if self.block.is_set():
            time.sleep(60)
        for emission in batch:
            if self.down.is_set():
                raise ConnectionError("redis://user:hunter2@broker:6379 refused")
            self.sent.append(emission.emission_id)
            done[0] += 1
        self.batches.append(len(batch))

    def close(self) -> None:
        pass


def _emission(n: int) -> Emission:
    return Emission("e", f"id-{n}", "events.e", b"[[],{},{}]", (), {})


def _publisher(transport: ScriptedTransport, **config: object) -> Publisher:
    app = Celery(set_as_current=False)
    return Publisher(app, CeleryEventsConfig(broker_url="redis://user:hunter2@broker:6379/0", **config), transport)  # type: ignore[arg-type]


def test_events_are_published_in_order_and_in_batches() -> None:
    transport = ScriptedTransport()
    publisher = _publisher(transport, publish_batch_size=100)
    for n in range(1000):
        publisher.submit(_emission(n))
    publisher.start()
    wait_for(lambda: len(transport.sent) == 1000, what="all published")
    assert transport.sent == [f"id-{n}" for n in range(1000)]
    assert max(transport.batches) == 100
    assert publisher.stop() == 0


def test_events_wait_while_the_broker_is_down_and_go_out_in_order_when_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = ScriptedTransport()
    publisher = _publisher(transport)
    publisher.start()
    transport.down.set()
    for n in range(50):
        publisher.submit(_emission(n))
    wait_for(lambda: "cannot publish" in caplog.text, what="the outage warning")
    assert publisher.pending == 50
    transport.down.clear()
    wait_for(lambda: len(transport.sent) == 50, what="publishing after the outage")
    assert transport.sent == [f"id-{n}" for n in range(50)]
    assert "hunter2" not in caplog.text
    publisher.stop()


def test_shutdown_logs_the_count_of_events_it_could_not_publish(caplog: pytest.LogCaptureFixture) -> None:
    transport = ScriptedTransport()
    transport.down.set()
    publisher = _publisher(transport)
    publisher.start()
    for n in range(7):
        publisher.submit(_emission(n))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        assert publisher.stop(timeout_s=0.3) == 7
    assert time.monotonic() - started < 5
    assert "7 emitted event(s) could not be published" in caplog.text
    assert "hunter2" not in caplog.text


def test_shutdown_is_bounded_even_when_a_publish_hangs(caplog: pytest.LogCaptureFixture) -> None:
    transport = ScriptedTransport()
    transport.block.set()
    publisher = _publisher(transport)
    publisher.start()
    publisher.submit(_emission(1))
    time.sleep(0.1)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        assert publisher.stop(timeout_s=0.2) == 1
    assert time.monotonic() - started < 3


def test_a_full_buffer_raises_by_default() -> None:
    publisher = _publisher(ScriptedTransport(), max_buffered_events=3)
    for n in range(3):
        publisher.submit(_emission(n))
    with pytest.raises(EventBufferFullError, match="3 events are waiting for the broker"):
        publisher.submit(_emission(4))


def test_a_full_buffer_can_drop_the_oldest_with_an_error_log(caplog: pytest.LogCaptureFixture) -> None:
    publisher = _publisher(ScriptedTransport(), max_buffered_events=2, buffer_full_policy="drop_oldest")
    with caplog.at_level(logging.ERROR):
        for n in range(3):
            publisher.submit(_emission(n))
    assert publisher.pending == 2
    assert publisher.dropped == 1
    assert "dropped oldest event 'e' (emission id-0)" in caplog.text


def _sized(n: int, size: int) -> Emission:
    return Emission("e", f"id-{n}", "events.e", b"x" * size, (), {})


def test_batches_are_bounded_in_bytes_as_well_as_in_count() -> None:
    transport = ScriptedTransport()
    publisher = _publisher(transport, publish_batch_size=100, publish_batch_bytes=10_000)
    for n in range(20):
        publisher.submit(_sized(n, 3_000))
    publisher.submit(_sized(20, 50_000))  # bigger than the budget alone: still goes, in a batch of its own
    publisher.start()
    wait_for(lambda: len(transport.sent) == 21, what="all published")
    assert publisher.stop() == 0
    assert transport.batches == [3, 3, 3, 3, 3, 3, 2, 1]
    assert transport.sent == [f"id-{n}" for n in range(21)]


class TimingOutTransport(ScriptedTransport):
    """Times out on any batch of more than ``fits`` messages, as a big write on a slow link does."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits
        self.attempts: list[int] = []

    def publish(self, batch: list[Emission], done: list[int]) -> None:
        self.attempts.append(len(batch))
        if len(batch) > self.fits:
            raise TimeoutError("Timeout writing to socket")
        super().publish(batch, done)


def test_a_batch_that_times_out_is_retried_in_smaller_parts_then_grows_back() -> None:
    transport = TimingOutTransport(fits=30)
    publisher = _publisher(transport, publish_batch_size=100)
    for n in range(300):
        publisher.submit(_emission(n))
    publisher.start()
    wait_for(lambda: len(transport.sent) == 300, timeout=30, what="all published")
    assert publisher.stop() == 0
    assert transport.sent == [f"id-{n}" for n in range(300)]
    assert transport.attempts[:3] == [100, 50, 25], "halved after each timeout until it fits"


class RefusingTransport(ScriptedTransport):
    """Refuses one message: at once (``MessageRefused``) or by failing whenever it is sent."""

    def __init__(self, bad: str, refuse: bool, reachable: bool = True) -> None:
        super().__init__()
        self.bad = bad
        self.refuse = refuse
        self.is_reachable = reachable

    def publish(self, batch: list[Emission], done: list[int]) -> None:
        from litestar_celery_events.transports import MessageRefused

        if self.down.is_set():
            raise ConnectionError("refused")
        for emission in batch:
            if emission.emission_id == self.bad:
                if self.refuse:
                    raise MessageRefused("the message is 3000000 bytes, over this Redis server's limit")
                raise ConnectionResetError("connection reset by peer")
            self.sent.append(emission.emission_id)
            done[0] += 1

    def reachable(self) -> bool:
        return self.is_reachable


@pytest.mark.parametrize("refuse", [True, False], ids=["refused-by-the-transport", "failing-alone-while-reachable"])
def test_a_message_the_broker_never_takes_goes_to_on_refused_and_the_rest_are_published(refuse: bool) -> None:
    transport = RefusingTransport("id-5", refuse=refuse)
    refused: list[tuple[str, str]] = []
    app = Celery(set_as_current=False)
    config = CeleryEventsConfig(broker_url="redis://user:hunter2@broker:6379/0", publish_batch_size=4)
    publisher = Publisher(
        app, config, transport, on_refused=lambda emission, reason: refused.append((emission.emission_id, reason))
    )
    for n in range(10):
        publisher.submit(_emission(n))
    publisher.start()
    wait_for(lambda: len(transport.sent) == 9, timeout=30, what="the other events published")
    assert publisher.stop() == 0
    assert transport.sent == [f"id-{n}" for n in range(10) if n != 5]
    assert [emission_id for emission_id, _ in refused] == ["id-5"]
    assert "redis://user:***@broker:6379/0" in refused[0][1]
    assert publisher.refused == 1


def test_a_message_failing_alone_during_an_outage_is_kept_not_refused() -> None:
    transport = RefusingTransport("id-0", refuse=False, reachable=False)
    refused: list[Emission] = []
    app = Celery(set_as_current=False)
    config = CeleryEventsConfig(broker_url="redis://broker:6379/0")
    publisher = Publisher(app, config, transport, on_refused=lambda emission, reason: refused.append(emission))
    publisher.submit(_emission(0))
    publisher.start()
    wait_for(lambda: publisher._batches.failing_alone >= 2, timeout=30, what="several failed attempts")
    assert refused == []
    assert publisher.pending == 1
    assert publisher.stop(timeout_s=0.1) == 1


def test_the_counters_add_up_through_an_outage_a_drop_and_a_shutdown() -> None:
    transport = ScriptedTransport()
    publisher = _publisher(transport, max_buffered_events=40, buffer_full_policy="drop_oldest")
    publisher.start()
    for n in range(30):
        publisher.submit(_emission(n))
    wait_for(lambda: publisher.published == 30, what="the first events published")
    transport.down.set()
    for n in range(30, 75):  # 45 during the outage: 5 over max_buffered_events are dropped
        publisher.submit(_emission(n))
    counts = publisher.counts()
    assert (counts.emitted, counts.published, counts.dropped) == (75, 30, 5)
    assert counts.add_up, counts
    assert publisher.stop(timeout_s=0.2) == 40
    counts = publisher.counts()
    assert (counts.emitted, counts.published, counts.waiting, counts.dropped, counts.lost) == (75, 30, 0, 5, 40)
    assert counts.add_up
