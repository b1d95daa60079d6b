"""No batch can wedge the publisher: big events over a slow link, and a message Redis refuses."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, listener
from litestar_celery_events.contract.message import Emission
from litestar_celery_events.stores.state import failed_store_for
from tests.helpers import free_port, port_open, redis_server_binary, wait_for

pytestmark = pytest.mark.integration

LINK_BYTES_PER_S = 20_000_000
NO_DISK = ("--save", "", "--appendonly", "no")


class ThrottledProxy:
    """A TCP proxy to ``target_port`` that forwards client->server bytes at ``bytes_per_s`` at most."""

    def __init__(self, target_port: int, bytes_per_s: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._rate = bytes_per_s
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            threading.Thread(target=self._pipe, args=(client, upstream, self._rate), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, rate: int | None) -> None:
        started, sent = time.monotonic(), 0
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                sent += len(chunk)
                if rate is not None:  # ahead of the link's pace: wait until it catches up
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def close(self) -> None:
        self._stop.set()
        self._server.close()


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[int]:
    """A private Redis that refuses any single value over 1 MB (``proto-max-bulk-len``)."""
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", *NO_DISK, "--proto-max-bulk-len", "1mb"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), timeout=10, what="redis-server")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@listener("big_event")
def on_big_event(blob: str, n: int) -> None:
    """Never runs here: these tests look at what reaches the broker."""


def _app(broker_url: str, tmp_path: Path, **config: object) -> Litestar:
    settings = CeleryEventsConfig(
        broker_url=broker_url,
        default_queue="big",
        data_dir=str(tmp_path / "data"),
        **config,  # type: ignore[arg-type]
    )
    return Litestar(listeners=[on_big_event], plugins=[CeleryEventsPlugin(settings)])


def test_300_buffered_900_kb_events_over_a_20_mb_per_s_link_are_all_delivered(redis_url: str, tmp_path: Path) -> None:
    target = redis.Redis.from_url(redis_url)
    port = int(str(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]))
    proxy = ThrottledProxy(port, LINK_BYTES_PER_S)
    app = _app(f"redis://127.0.0.1:{proxy.port}/0", tmp_path, max_payload_bytes=2_000_000, flush_timeout_s=60)
    emitter = app.event_emitter
    blob = "x" * 900_000
    task_name = emitter.config.event_task_name("big_event")
    target.delete("big")
    try:
        for n in range(300):  # buffered before the publisher starts: one burst, as after an outage
            kwargs = {"blob": blob, "n": n}
            emission = Emission.create("big_event", task_name, (), kwargs, max_payload_bytes=2_000_000)
            emitter.publisher.submit(emission)
        started = time.monotonic()
        emitter.start()
        assert emitter.stop() == 0, "every event published within flush_timeout_s"
        elapsed = time.monotonic() - started
        assert target.llen("big") == 300
        print(f"300 x 900 KB over {LINK_BYTES_PER_S / 1e6:.0f} MB/s: all delivered in {elapsed:.1f}s")
    finally:
        proxy.close()
        target.delete("big")
        target.close()


def test_a_message_over_the_brokers_size_limit_goes_to_the_failed_store_and_the_rest_are_delivered(
    small_redis: int, tmp_path: Path
) -> None:
    broker_url = f"redis://127.0.0.1:{small_redis}/0"
    app = _app(broker_url, tmp_path, max_payload_bytes=2_000_000)
    emitter = app.event_emitter
    client = redis.Redis(port=small_redis)
    emitter.start()
    try:
        emitter.emit("big_event", blob="small", n=1)
        refused = emitter.enqueue("big_event", blob="y" * 1_500_000, n=2)  # 2 MB in kombu's base64 envelope
        emitter.emit("big_event", blob="small", n=3)
    finally:
        assert emitter.stop() == 0
    assert client.llen("big") == 2, "the events before and after the refused one are delivered"
    assert emitter.publisher.refused == 1
    store = failed_store_for(emitter.config, emitter.celery_app)
    try:
        (record,) = store.records(event_id="big_event")
    finally:
        store.close()
    assert record["emission_id"] == refused
    assert record["listener"].endswith("on_big_event")
    assert "over this Redis server's limit of 1048576 bytes" in record["message"]
    assert "arguments not kept" in record["message"], "the arguments are too big for this Redis too"
    assert record["permanent"] is True
    client.close()
