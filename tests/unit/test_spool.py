"""The durable spool behind the publisher, against a scripted transport (no broker)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from celery import Celery

from litestar_celery_events import CeleryEventsConfig, EventBufferFullError
from litestar_celery_events.contract.message import Emission
from litestar_celery_events.publisher import Publisher
from litestar_celery_events.stores.spool import spool_depth
from tests.helpers import ROOT, wait_for
from tests.unit.test_publisher import ScriptedTransport


def _emission(n: int) -> Emission:
    body = f'[[{n}],{{"n":{n}}},{{"callbacks":null,"errbacks":null,"chain":null,"chord":null}}]'.encode()
    return Emission("e", f"id-{n}", "events.e", body, (n,), {"n": n}, None, 1.0, listeners=("a.b",), retries=0)


def _config(tmp_path: Path, **overrides: object) -> CeleryEventsConfig:
    settings: dict[str, object] = {
        "broker_url": "redis://user:hunter2@broker:6379/0",
        "data_dir": str(tmp_path),
        "spool": True,
        **overrides,
    }
    return CeleryEventsConfig(**settings)  # type: ignore[arg-type]


def _publisher(transport: ScriptedTransport, config: CeleryEventsConfig) -> Publisher:
    return Publisher(Celery(set_as_current=False), config, transport)  # type: ignore[arg-type]


def test_events_go_to_disk_during_an_outage_and_out_oldest_first_when_the_broker_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    transport = ScriptedTransport()
    transport.down.set()
    publisher = _publisher(transport, _config(tmp_path))
    publisher.start()
    publisher.submit(_emission(0))
    wait_for(lambda: publisher.spooled == 1, what="the first event to be spooled")
    for n in range(1, 200):
        publisher.submit(_emission(n))
    assert publisher.spooled == 200
    assert publisher.pending == 0
    assert spool_depth(publisher._config) == 200
    assert "now wait in the spool" in caplog.text
    transport.down.clear()
    wait_for(lambda: len(transport.sent) == 200, what="the spool to drain")
    assert transport.sent == [f"id-{n}" for n in range(200)]
    wait_for(lambda: publisher.spooled == 0, what="the published rows to leave the spool")
    publisher.submit(_emission(200))  # back to the memory path
    wait_for(lambda: len(transport.sent) == 201, what="a live event")
    assert publisher.stop() == 0
    assert list((tmp_path / "spool").glob("*.sqlite3")) == []
    assert "hunter2" not in caplog.text


def test_what_shutdown_cannot_publish_stays_on_disk_for_the_next_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, spool_after_events=1000)  # the outage is short: memory first
    down = ScriptedTransport()
    down.down.set()
    first = _publisher(down, config)
    first.start()
    for n in range(20):
        first.submit(_emission(n))
    with caplog.at_level(logging.ERROR):
        assert first.stop(timeout_s=0.3) == 0
    assert "20 emitted event(s) could not be published" in caplog.text
    assert "stay in the spool" in caplog.text
    assert spool_depth(config) == 20

    up = ScriptedTransport()
    second = _publisher(up, config)
    second.start()
    wait_for(lambda: len(up.sent) == 20, what="the adopted spool to drain")
    assert up.sent == [f"id-{n}" for n in range(20)]
    second.stop()
    assert spool_depth(config) == 0


def test_a_spooled_event_keeps_its_envelope(tmp_path: Path) -> None:
    transport = ScriptedTransport()
    transport.down.set()
    seen: list[Emission] = []
    original = transport.publish

    def keep(batch: list[Emission], done: list[int]) -> None:
        original(batch, done)
        seen.extend(batch)

    transport.publish = keep  # type: ignore[method-assign]
    publisher = _publisher(transport, _config(tmp_path))
    publisher.start()
    publisher.submit(_emission(7))
    wait_for(lambda: publisher.spooled == 1, what="spooling")
    transport.down.clear()
    wait_for(lambda: seen, what="publishing")
    publisher.stop()
    assert seen[0] == _emission(7)


def test_a_live_process_spool_is_never_adopted_by_another(tmp_path: Path) -> None:
    config = _config(tmp_path)
    transport = ScriptedTransport()
    transport.down.set()
    owner = _publisher(transport, config)
    owner.start()
    owner.submit(_emission(1))
    wait_for(lambda: owner.spooled == 1, what="spooling")
    other = _publisher(ScriptedTransport(), config)
    other.start()
    assert other.spooled == 0
    other.stop()
    transport.down.clear()
    owner.stop()


def test_a_killed_process_spool_is_adopted(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from celery import Celery
        from litestar_celery_events import CeleryEventsConfig
        from litestar_celery_events.publisher import Publisher
        from tests.unit.test_publisher import ScriptedTransport
        from tests.unit.test_spool import _emission
        from tests.helpers import wait_for
        t = ScriptedTransport(); t.down.set()
        p = Publisher(Celery(set_as_current=False), CeleryEventsConfig(data_dir={str(tmp_path)!r}, spool=True), t)
        p.start()
        p.submit(_emission(0))
        wait_for(lambda: p.spooled == 1)
        for n in range(1, 50):
            p.submit(_emission(n))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=False, timeout=60)
    assert killed.returncode == -9
    config = _config(tmp_path)
    assert spool_depth(config) == 50
    up = ScriptedTransport()
    publisher = _publisher(up, config)
    publisher.start()
    wait_for(lambda: len(up.sent) == 50, what="the dead process's events")
    assert up.sent == [f"id-{n}" for n in range(50)]
    publisher.stop()


def test_a_full_spool_raises_at_emit_by_default(tmp_path: Path) -> None:
    transport = ScriptedTransport()
    transport.down.set()
    publisher = _publisher(transport, _config(tmp_path, max_spooled_events=5))
    publisher.start()
    publisher.submit(_emission(0))
    wait_for(lambda: publisher.spooled == 1, what="spooling")
    for n in range(1, 5):
        publisher.submit(_emission(n))
    with pytest.raises(EventBufferFullError, match="max_spooled_events"):
        publisher.submit(_emission(5))
    publisher.stop(timeout_s=0.1)


def test_a_full_spool_can_drop_the_oldest_with_an_error_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    transport = ScriptedTransport()
    transport.down.set()
    publisher = _publisher(transport, _config(tmp_path, max_spooled_events=5, spool_full_policy="drop_oldest"))
    publisher.start()
    publisher.submit(_emission(0))
    wait_for(lambda: publisher.spooled == 1, what="spooling")
    with caplog.at_level(logging.ERROR):
        for n in range(1, 8):
            publisher.submit(_emission(n))
    assert publisher.spooled == 5
    assert "spool full (max_spooled_events=5): dropped 1 oldest event(s) (e)" in caplog.text
    transport.down.clear()
    wait_for(lambda: len(transport.sent) == 5, what="draining")
    assert transport.sent == [f"id-{n}" for n in range(3, 8)]
    publisher.stop()


def test_a_full_memory_buffer_spills_to_the_spool_instead_of_raising(tmp_path: Path) -> None:
    publisher = _publisher(ScriptedTransport(), _config(tmp_path, max_buffered_events=3))
    for n in range(10):
        publisher.submit(_emission(n))
    assert publisher.pending == 0
    assert publisher.spooled == 10


def test_redis_brokers_sweep_for_a_dead_workers_unacked_messages_on_every_tick() -> None:
    from litestar_celery_events.celery_app import build_celery_app

    app = build_celery_app(CeleryEventsConfig(broker_url="redis://localhost:6379/0"))
    assert app.conf.broker_transport_options == {"unacked_restore_throttle": 1}
    own = {"broker_transport_options": {"visibility_timeout": 60}}
    kept = build_celery_app(CeleryEventsConfig(broker_url="redis://localhost:6379/0", celery_config=own))
    assert kept.conf.broker_transport_options == {"visibility_timeout": 60}


class HangingTransport(ScriptedTransport):
    """A broker that accepts the connection and never answers until ``release``; then that
    publish fails (a timeout) or goes through (the broker was only paused)."""

    def __init__(self, then: str) -> None:
        super().__init__()
        self.then = then
        self.release = threading.Event()
        self.hung = threading.Event()

    def publish(self, batch: list[Emission], done: list[int]) -> None:
        if not self.hung.is_set():
            self.hung.set()
            self.release.wait(30)
            if self.then == "fails":
                raise TimeoutError("redis://user:hunter2@broker:6379 timed out")
        super().publish(batch, done)


@pytest.mark.parametrize("then", ["fails", "goes_through"])
def test_a_broker_that_hangs_sends_new_events_and_the_stalled_batch_to_the_spool(tmp_path: Path, then: str) -> None:
    transport = HangingTransport(then)
    publisher = _publisher(transport, _config(tmp_path))
    publisher.start()
    publisher.submit(_emission(0))
    wait_for(transport.hung.is_set, what="the publish to hang")
    n = 1
    deadline = time.monotonic() + 10
    while publisher.spooled == 0 and time.monotonic() < deadline:
        publisher.submit(_emission(n))
        n += 1
        time.sleep(0.05)
    assert publisher.spooled == n, "the batch in flight and every event since are on disk"
    transport.release.set()
    wait_for(lambda: len(transport.sent) == n, what="everything to go out once the broker answers")
    time.sleep(0.2)
    assert sorted(transport.sent) == sorted(f"id-{i}" for i in range(n)), "each event exactly once"
    publisher.stop()


def test_a_refused_message_in_the_spool_is_handed_on_and_the_rows_after_it_are_published(tmp_path: Path) -> None:
    from tests.unit.test_publisher import RefusingTransport

    transport = RefusingTransport("id-7", refuse=True)
    transport.down.set()
    refused: list[str] = []
    publisher = Publisher(
        Celery(set_as_current=False),
        _config(tmp_path, publish_batch_size=5),
        transport,  # type: ignore[arg-type]
        on_refused=lambda emission, reason: refused.append(emission.emission_id),
    )
    publisher.start()
    publisher.submit(_emission(0))
    wait_for(lambda: publisher.spooled == 1, what="the outage to start spooling")
    for n in range(1, 15):
        publisher.submit(_emission(n))
    transport.down.clear()
    wait_for(lambda: len(transport.sent) == 14, what="the spool to drain around the refused row")
    assert transport.sent == [f"id-{n}" for n in range(15) if n != 7]
    assert refused == ["id-7"]
    wait_for(lambda: publisher.spooled == 0, what="the spool to empty")
    assert publisher.stop() == 0


def test_a_spool_file_keeps_a_small_page_cache_so_an_outage_does_not_grow_the_web_process(tmp_path: Path) -> None:
    # SQLite's default page cache (2 MB a connection) was the web process's growth during an outage
    # (python -m bench --only memory: flat once warm; the cache is the warm-up).
    import fcntl
    import os

    from litestar_celery_events.stores.spool import SPOOL_CACHE_KIB, SpoolFile

    path = tmp_path / "spool.sqlite3"
    fd = os.open(SpoolFile.lock_path(path), os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    spool = SpoolFile(path, fd)
    try:
        assert spool._db.execute("PRAGMA cache_size").fetchone()[0] == -SPOOL_CACHE_KIB
    finally:
        spool.close()
    assert SPOOL_CACHE_KIB <= 512
