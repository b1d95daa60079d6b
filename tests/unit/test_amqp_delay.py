"""Delayed-event stores without a broker: RabbitMQ's delay levels (kombu's routing keys and declarations,
rounding, limits), cancel tombstones, and the refusal of a Redis Cluster."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import redis
from kombu import Exchange, Queue
from litestar import Litestar

from litestar_celery_events import (
    CeleryEventEmitter,
    CeleryEventsConfig,
    CeleryEventsPlugin,
    ScheduleError,
    emit_later,
    listener,
)
from litestar_celery_events.contract.message import DUE_AT_HEADER, Emission
from litestar_celery_events.runtime.mover import DEAD_LETTER_HEADERS, CheckDelayedStore, forget_dead_letter_headers
from litestar_celery_events.stores.schedule import (
    CANCEL_MEMORY_S,
    RedisClusterUnsupportedError,
    RedisScheduleStore,
    SqliteScheduleStore,
    eta_of,
)
from litestar_celery_events.transports.amqp_delay import (
    MAX_DELAY_S,
    DelayLevels,
    DelayTopologyError,
    delay_routing_key,
    delivery_binding_key,
    seconds_until,
    target_queue_problem,
)
from litestar_celery_events.transports.kombu import KombuTransport

try:  # the differential tests compare with kombu's own helpers, which kombu 5.4 does not have
    from kombu.transport import native_delayed_delivery as native
except ImportError:  # pragma: no cover - the lowest supported kombu
    native = None
needs_kombus_levels = pytest.mark.skipif(native is None, reason="kombu < 5.5 has no delay levels to compare with")
UNREACHABLE_AMQP = "amqp://guest:guest@127.0.0.1:1//"


@listener("reminder")
def remind(note: str) -> None: ...


@needs_kombus_levels
@pytest.mark.parametrize("delay_s", [1, 2, 3, 7200, 86_400 * 365, MAX_DELAY_S])
def test_routing_keys_are_kombus(delay_s: int) -> None:
    assert delay_routing_key(delay_s, "events") == native.calculate_routing_key(delay_s, "events")


@pytest.mark.parametrize(("delay_s", "level"), [(1, 0), (2, 1), (3, 1), (3600, 11), (7200, 12), (MAX_DELAY_S, 27)])
def test_a_message_enters_the_levels_at_its_delays_highest_bit(delay_s: int, level: int) -> None:
    assert DelayLevels("app").exchange_for(delay_s) == f"app_celery_delayed_{level}"
    # From there the route is kombu's: every higher bit is 0, so entering at level 27 would pass through.
    assert delay_routing_key(delay_s, "q").split(".")[: 27 - level] == ["0"] * (27 - level)


@pytest.mark.parametrize("delay_s", [0, -1, MAX_DELAY_S + 1])
def test_a_delay_the_levels_cannot_hold_has_no_routing_key(delay_s: int) -> None:
    with pytest.raises(ValueError, match="whole seconds"):
        delay_routing_key(delay_s, "events")


def _declarations(channel: mock.Mock) -> dict[str, Any]:
    """What a channel was asked to declare, in a form that does not depend on call style or order."""
    found: dict[str, Any] = {"exchanges": set(), "queues": {}, "queue_bindings": set(), "exchange_bindings": set()}
    for call in channel.method_calls:
        name, kwargs = call[0], call[2]
        if name == "exchange_declare":
            found["exchanges"].add((kwargs["exchange"], kwargs["type"], kwargs["durable"], kwargs["auto_delete"]))
        elif name == "queue_declare":
            found["queues"][kwargs["queue"]] = (kwargs["durable"], kwargs["auto_delete"], kwargs["arguments"])
        elif name == "queue_bind":
            found["queue_bindings"].add((kwargs["queue"], kwargs["exchange"], kwargs["routing_key"]))
        elif name == "exchange_bind":
            found["exchange_bindings"].add((kwargs["destination"], kwargs["source"], kwargs["routing_key"]))
    return found


@needs_kombus_levels
@pytest.mark.skipif(
    native is None
    or "prefix" not in inspect.signature(native.declare_native_delayed_delivery_exchanges_and_queues).parameters,
    reason="this kombu's delay levels take no prefix",
)
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_the_levels_are_declared_exactly_as_kombu_declares_them(queue_type: str) -> None:
    ours, kombus = mock.Mock(), mock.Mock()
    DelayLevels("app", queue_type).declare(ours)
    kombus.prepare_queue_arguments.side_effect = lambda arguments, **_: arguments  # py-amqp's: as given
    connection = mock.Mock()
    connection.channel.return_value = kombus
    native.declare_native_delayed_delivery_exchanges_and_queues(connection, queue_type, prefix="app")
    assert _declarations(ours) == _declarations(kombus)
    assert len(_declarations(ours)["queues"]) == 28


def test_a_target_queue_is_bound_by_its_exact_name_whatever_its_exchange() -> None:
    channel = mock.Mock()
    DelayLevels("app").bind(channel, "mail")
    channel.queue_bind.assert_called_once_with(
        queue="mail", exchange="app_celery_delayed_delivery", routing_key="*." * 28 + "mail"
    )
    # ``#.mail`` would also deliver the messages of queue ``x.mail``; the exact pattern does not.
    assert delivery_binding_key("mail").count("*") == 28


@pytest.mark.parametrize("queue", ["a.*.b", "#", "x" * 200])
def test_queue_names_a_topic_binding_cannot_name_are_refused(queue: str) -> None:
    assert target_queue_problem(queue)
    with pytest.raises(DelayTopologyError, match="rename the queue"):
        DelayLevels("app").bind(mock.Mock(), queue)


def test_a_bad_queue_type_setting_is_a_start_up_error() -> None:
    with pytest.raises(DelayTopologyError, match="'classic' or 'quorum'"):
        DelayLevels("app", "stream")


def test_delays_are_rounded_up_to_whole_seconds_and_never_early() -> None:
    now = 1_000_000.0
    assert seconds_until(eta_of(now + 0.001), now) == 1
    assert seconds_until(eta_of(now + 2.0), now) == 2
    assert seconds_until(eta_of(now + 2.4), now) == 3
    assert seconds_until(eta_of(now - 5), now) == 0  # due (the publisher waited): sent at once


def test_the_publisher_sends_a_delayed_emission_to_its_first_level_without_eta() -> None:
    celery_app = CeleryEventsConfig(broker_url=UNREACHABLE_AMQP, default_queue="mail")
    emitter_app = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(celery_app)])
    emitter = emitter_app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    transport = KombuTransport(emitter.celery_app)
    producer = mock.Mock()
    emission = Emission.create("reminder", "events.reminder", (), {"note": "x"}, max_payload_bytes=1000, queue="mail")
    emission.eta = eta_of(time.time() + 7199.5)
    transport.publish_to(producer, emission, transport.route(emission))
    transport.publish_to(producer, emission, transport.route(emission))
    first, second = producer.publish.call_args_list
    # Entering at the delay's highest bit (kombu enters at 27): 7200 s = 2**12 + ... waits in level 12 first.
    assert first.kwargs["exchange"] == "celery_events_celery_delayed_12"
    assert first.kwargs["routing_key"] == ".".join(f"{7200:028b}") + ".mail"
    assert first.kwargs["headers"]["eta"] is None
    assert first.kwargs["headers"][DUE_AT_HEADER] == emission.eta
    declared = _declarations(producer.channel)
    assert len(declared["queues"]) == 28 + 1  # the levels, then the target queue before it is bound
    assert ("mail", "celery_events_celery_delayed_delivery", "*." * 28 + "mail") in declared["queue_bindings"]
    assert second.kwargs["exchange"] == first.kwargs["exchange"]
    assert producer.channel.queue_declare.call_count == 28 + 1  # declared once per connection


def test_a_due_emission_goes_straight_to_its_queue() -> None:
    config = CeleryEventsConfig(broker_url=UNREACHABLE_AMQP, default_queue="mail")
    emitter = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(config)]).event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    producer = mock.Mock()
    emission = Emission.create("reminder", "events.reminder", (), {"note": "x"}, max_payload_bytes=1000)
    emission.eta = eta_of(time.time() - 3)
    transport = KombuTransport(emitter.celery_app)
    transport.publish_to(producer, emission, transport.route(emission))
    assert producer.publish.call_args.kwargs["exchange"] == ""
    assert producer.publish.call_args.kwargs["routing_key"] == "mail"
    assert producer.publish.call_args.kwargs["headers"][DUE_AT_HEADER] == emission.eta  # the cancel check still runs


def test_a_delayed_emission_routed_through_an_exchange_that_may_fan_out_keeps_celerys_eta() -> None:
    """The delay levels end in one queue by name; a topic exchange may feed several: send_task's countdown."""
    config = CeleryEventsConfig(
        broker_url=UNREACHABLE_AMQP,
        celery_config={"task_queues": [Queue("mail", Exchange("mail", type="topic"), routing_key="mail.#")]},
    )
    emitter = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(config)]).event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    producer = mock.Mock()
    emission = Emission.create("reminder", "events.reminder", (), {"note": "x"}, max_payload_bytes=1000, queue="mail")
    emission.eta = eta_of(time.time() + 60)
    transport = KombuTransport(emitter.celery_app)
    transport.publish_to(producer, emission, transport.route(emission))
    assert producer.publish.call_args.kwargs["exchange"] == "mail"
    assert producer.publish.call_args.kwargs["routing_key"] == "mail.#"
    assert producer.publish.call_args.kwargs["headers"]["eta"] == emission.eta  # the worker's cancel check reads it


@pytest.fixture
def amqp_app(tmp_path: Path) -> Iterator[Litestar]:
    """A running app on an unreachable RabbitMQ: emit_later checks before any I/O."""
    config = CeleryEventsConfig(broker_url=UNREACHABLE_AMQP, data_dir=str(tmp_path), flush_timeout_s=0)
    app = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(config)])
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    emitter.start()
    yield app
    emitter.stop()


def test_emit_later_refuses_a_delay_beyond_what_rabbitmqs_levels_hold(amqp_app: Litestar) -> None:
    with pytest.raises(ScheduleError, match=r"beyond the 268435455s \(about 8.5 years\)"):
        emit_later(amqp_app, "reminder", note="x", delay=timedelta(days=365 * 9))
    emitter = amqp_app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    assert emitter.publisher.pending == 0
    emit_later(amqp_app, "reminder", note="x", delay=MAX_DELAY_S - 10)  # within: accepted
    assert emitter.publisher.pending + emitter.publisher.published == 1


def test_emit_later_refuses_a_queue_the_levels_cannot_reach(tmp_path: Path) -> None:
    config = CeleryEventsConfig(broker_url=UNREACHABLE_AMQP, data_dir=str(tmp_path), default_queue="jobs.*")
    app = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(config)])
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    emitter.start()
    try:
        with pytest.raises(ScheduleError, match=r"'jobs\.\*' has a '\*' or '#' word"):
            emit_later(app, "reminder", note="x", delay=5)
    finally:
        emitter.stop()


def test_a_cancel_outlives_a_long_delay_and_is_forgotten_a_week_after_the_event_met_it(tmp_path: Path) -> None:
    store = SqliteScheduleStore(tmp_path / "s.sqlite3")
    now = time.time()
    year = 365 * 86_400.0
    assert store.cancel("far", due_ts=now + year)
    assert store.cancel("unknown")  # due time unknown: kept for the longest delay a broker holds
    with mock.patch("time.time", return_value=now + year - 1):
        store.cancel("other")  # prunes what is past its time
        assert not store.may_run("far")
        assert not store.may_run("unknown")
    with mock.patch("time.time", return_value=now + year + CANCEL_MEMORY_S - 60):
        store.cancel("other-2")
        assert not store.may_run("far")  # a redelivery within the week is still stopped
    with mock.patch("time.time", return_value=now + year + CANCEL_MEMORY_S + 60):
        store.cancel("other-3")
        assert store.may_run("far")  # forgotten a week after it was met


def test_rabbitmqs_dead_letter_headers_are_dropped_from_the_request() -> None:
    request = mock.Mock(spec=["headers"])
    request.headers = {name: "x" for name in DEAD_LETTER_HEADERS} | {"event_id": "reminder"}
    for name in DEAD_LETTER_HEADERS:
        setattr(request, name, [{"count": 1}])
    task = mock.Mock(request=request)
    forget_dead_letter_headers(task)
    assert request.headers == {"event_id": "reminder"}
    assert not any(name in vars(request) for name in DEAD_LETTER_HEADERS)


@pytest.mark.parametrize(("cluster_enabled", "refused"), [(1, True), (0, False)], ids=["cluster", "single-server"])
def test_a_redis_cluster_is_refused_at_start_up_with_the_reason(cluster_enabled: int, refused: bool) -> None:
    broker_redis = mock.Mock()  # the client factory's handle
    broker_redis.settings.global_keyprefix = ""
    broker_redis.sentinel = False
    client = broker_redis.client.return_value
    client.info.return_value = {"cluster_enabled": cluster_enabled}
    store = RedisScheduleStore(broker_redis)
    worker = mock.Mock()
    worker.app.celery_events_mover = mock.Mock(store=store)
    step = CheckDelayedStore(worker)
    if refused:
        with pytest.raises(
            RedisClusterUnsupportedError, match=r"need one Redis server .* Lua scripts touch several keys"
        ):
            step.start(worker)
    else:
        step.start(worker)
    client.info.assert_called_once_with("cluster")


def test_a_redis_down_at_start_up_or_without_info_does_not_stop_the_worker() -> None:
    for error in (redis.ConnectionError("refused"), redis.ResponseError("unknown command 'INFO'")):
        broker_redis = mock.Mock()
        broker_redis.settings.global_keyprefix = ""
        broker_redis.sentinel = False
        broker_redis.client.return_value.info.side_effect = error
        worker = mock.Mock()
        worker.app.celery_events_mover = mock.Mock(store=RedisScheduleStore(broker_redis))
        CheckDelayedStore(worker).start(worker)  # Celery waits for the broker; a cluster fails in kombu anyway
