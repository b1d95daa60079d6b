"""The durable local spool: events wait on disk, not only in memory, while the broker is away.

Each process spools into a SQLite file of its own under ``<data_dir>/spool/`` and holds an
exclusive ``flock`` on a companion ``.lock`` file for as long as it lives. A process that starts
with the spool on adopts every spool whose lock it can take (its owner died: a crash, a
``kill -9``, a deploy) and publishes those events first, oldest first, then deletes the file.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed event survives the process being
killed; it may not survive the machine losing power.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kombu.utils import json as kombu_json

from litestar_celery_events.contract.message import Emission
from litestar_celery_events.errors import EventBufferFullError

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Collection, Iterable

    from litestar_celery_events.config import CeleryEventsConfig

__all__ = ("Spool", "SpoolFile", "spool_depth")

logger = logging.getLogger("litestar_celery_events.stores.spool")

SPOOL_FOLDER = "spool"
SQLITE_BUSY_TIMEOUT_S = 30.0
SPOOL_CACHE_KIB = 256
"""SQLite page cache of a spool connection, in KiB."""
_COLUMNS = (
    "event_id, emission_id, task_name, body, queue, emitted_at, eta, countdown, listeners, retries, extra_headers"
)
_MARKS = ", ".join("?" * len(_COLUMNS.split(",")))


def _row(emission: Emission) -> tuple[Any, ...]:
    return (
        emission.event_id,
        emission.emission_id,
        emission.task_name,
        emission.body,
        emission.queue,
        emission.emitted_at,
        emission.eta,
        emission.countdown,
        None if emission.listeners is None else kombu_json.dumps(list(emission.listeners)),
        emission.retries,
        None if not emission.extra_headers else kombu_json.dumps(emission.extra_headers),
    )


def _emission(row: tuple[Any, ...]) -> Emission:
    event_id, emission_id, task_name, body, queue, emitted_at, eta, countdown, listeners, retries, extra = row
    body = bytes(body)
    try:
        args, kwargs = kombu_json.loads(body)[:2]  # only for argsrepr/kwargsrepr: the body is sent as is
    except Exception:  # noqa: BLE001 - a message must not be stuck on its repr
        args, kwargs = (), {}
    return Emission(
        event_id=event_id,
        emission_id=emission_id,
        task_name=task_name,
        body=body,
        args=tuple(args),
        kwargs=dict(kwargs),
        queue=queue,
        emitted_at=emitted_at,
        eta=eta,
        countdown=countdown,
        listeners=None if listeners is None else tuple(kombu_json.loads(listeners)),
        retries=retries,
        extra_headers=None if extra is None else dict(kombu_json.loads(extra)),
    )


class SpoolFile:
    """One SQLite spool file and the ``flock`` that says its owner is alive."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self._db = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # A small page cache: the spool only appends and reads its head, so a big one buys nothing and
        # only grows the web process (SQLite's default is 2 MB per connection).
        self._db.execute(f"PRAGMA cache_size=-{SPOOL_CACHE_KIB}")
        self._db.execute(f"CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, {_COLUMNS})")
        self.count = int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    @staticmethod
    def lock_path(path: Path) -> Path:
        return path.with_suffix(".lock")

    @classmethod
    def try_open(cls, path: Path) -> SpoolFile | None:
        """Open ``path`` if no live process holds its lock (else ``None``)."""
        import fcntl  # POSIX only: imported where used, so the CLI still loads elsewhere

        fd = os.open(cls.lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return cls(path, fd)

    def put(self, emissions: Iterable[Emission]) -> int:
        rows = [_row(e) for e in emissions]
        if rows:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(f"INSERT INTO spool ({_COLUMNS}) VALUES ({_MARKS})", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self.count += len(rows)
        return len(rows)

    def oldest(self, limit: int) -> list[tuple[int, Emission]]:
        rows = self._db.execute(f"SELECT seq, {_COLUMNS} FROM spool ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [(int(row[0]), _emission(tuple(row[1:]))) for row in rows]

    def discard(self, emission_ids: Collection[str]) -> int:
        ids = list(emission_ids)
        removed = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            removed += int(self._db.execute(f"DELETE FROM spool WHERE emission_id IN ({marks})", chunk).rowcount)
        self.count = max(0, self.count - removed)
        return removed

    def remove_through(self, seq: int) -> None:
        removed = self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,)).rowcount
        self.count = max(0, self.count - int(removed))

    def close(self, delete_if_empty: bool = True) -> None:
        empty = self.count == 0
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if empty and delete_if_empty:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}{suffix}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path(self.path))
        os.close(self._lock_fd)  # releases the flock: another process may now adopt what is left


class Spool:
    """A process's view of the spool: its own file (created on first use) and adopted orphans.

    Thread-safe: ``emit`` writes from the caller's thread while the publisher thread drains.
    ``active`` is True while any event waits on disk; new events then go to disk too, so the
    order stays oldest first.
    """

    def __init__(self, config: CeleryEventsConfig) -> None:
        self.folder = config.resolved_data_dir / SPOOL_FOLDER
        self._max = config.max_spooled_events
        self._policy = config.spool_full_policy
        self._lock = threading.RLock()
        self._own: SpoolFile | None = None
        self._orphans: list[SpoolFile] = []
        self._pid = os.getpid()
        self.active = False
        self.dropped = 0

    @property
    def depth(self) -> int:
        return sum(f.count for f in self._files())

    def _files(self) -> list[SpoolFile]:
        return [*self._orphans, *([self._own] if self._own is not None else [])]

    def _forked(self) -> bool:
        if self._pid == os.getpid():
            return False
        # A forked child must not touch its parent's files or locks: start afresh.
        self._own, self._orphans, self._pid, self.active = None, [], os.getpid(), False
        self._lock = threading.RLock()
        return True

    def adopt_orphans(self) -> int:
        """Take over the spools of dead processes; return how many events they hold."""
        self._forked()
        if not self.folder.is_dir():
            return 0
        with self._lock:
            mine = {f.path for f in self._files()}
            for path in sorted(self.folder.glob("*.sqlite3"), key=lambda p: p.stat().st_mtime):
                if path in mine:
                    continue
                spool = SpoolFile.try_open(path)
                if spool is None:
                    continue
                if spool.count == 0:
                    spool.close()
                    continue
                logger.warning("adopted %d spooled event(s) from %s; publishing them first", spool.count, path)
                self._orphans.append(spool)
            self.active = self.depth > 0
            return self.depth

    def _own_file(self) -> SpoolFile:
        if self._own is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"spool-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.sqlite3"
            own = SpoolFile.try_open(self.folder / name)
            if own is None:  # pragma: no cover - a fresh random name is never locked
                raise RuntimeError(f"cannot lock a new spool file in {self.folder}")
            self._own = own
        return self._own

    def put(self, emissions: list[Emission]) -> list[Emission]:
        """Spool ``emissions``; return those refused because the spool is full (policy ``raise``)."""
        self._forked()
        with self._lock:
            room = self._max - self.depth
            if len(emissions) > room and self._policy == "drop_oldest":
                self._drop_oldest(len(emissions) - room)
                room = self._max - self.depth
            accepted, refused = emissions[: max(0, room)], emissions[max(0, room) :]
            self.active = True  # before the write: whoever sees the depth grow also sees spooling on
            self._own_file().put(accepted)
            return refused

    def spill(self, buffer: deque[Emission], skip: Collection[str] = ()) -> int:
        """Move everything in the memory ``buffer`` to disk (what does not fit stays in memory).

        Emissions whose id is in ``skip`` are already on disk: they are dropped from memory.
        """
        if not buffer:
            return 0
        with self._lock:
            was_active = self.active
            # Active before the buffer is emptied: an emit that appends meanwhile sees it and spills too.
            self.active = True
            moving = [buffer.popleft() for _ in range(len(buffer))]
            if skip:
                moving = [e for e in moving if e.emission_id not in skip]
            refused = self.put(moving)
            buffer.extendleft(reversed(refused))
            if not was_active:
                logger.warning(
                    "broker unreachable: %d event(s) now wait in the spool %s (events emitted meanwhile go there too)",
                    self.depth,
                    self.folder,
                )
            return len(moving) - len(refused)

    def discard(self, emission_ids: Collection[str]) -> int:
        """Remove these emissions from disk: a publish that stalled delivered them after all."""
        if self._forked() or not emission_ids:
            return 0
        with self._lock:
            removed = sum(spool.discard(emission_ids) for spool in self._files())
            self.active = self.depth > 0
            return removed

    def put_or_raise(self, emission: Emission) -> None:
        """``emit``'s path while spooling: on disk before ``emit`` returns."""
        if self.put([emission]):
            raise EventBufferFullError(
                f"cannot emit event {emission.event_id!r}: the spool in {self.folder} holds {self._max} events "
                "(max_spooled_events) and the broker is still unreachable"
            )

    def _drop_oldest(self, count: int) -> None:
        for spool in self._files():
            if count <= 0:
                break
            batch = spool.oldest(count)
            if batch:
                spool.remove_through(batch[-1][0])
                count -= len(batch)
                self.dropped += len(batch)
                logger.error(
                    "spool full (max_spooled_events=%d): dropped %d oldest event(s) (%s); %d dropped so far",
                    self._max,
                    len(batch),
                    ", ".join(sorted({e.event_id for _, e in batch})),
                    self.dropped,
                )

    def oldest(self, limit: int) -> tuple[SpoolFile | None, list[tuple[int, Emission]]]:
        """The oldest waiting batch and the file it is in."""
        if self._forked():
            return None, []
        with self._lock:
            for spool in self._files():
                if spool.count:
                    return spool, spool.oldest(limit)
            self.active = False
            return None, []

    def published(self, spool: SpoolFile, last_seq: int) -> None:
        with self._lock:
            spool.remove_through(last_seq)
            if spool is not self._own and spool.count == 0:
                spool.close()
                self._orphans.remove(spool)
            self.active = self.depth > 0

    def close(self) -> int:
        """Release the files (deleting empty ones); return how many events stay on disk."""
        if self._forked():
            return 0
        with self._lock:
            left = self.depth
            for spool in self._files():
                spool.close()
            self._own, self._orphans = None, []
            return left


def spool_depth(config: CeleryEventsConfig) -> int:
    """Events waiting in every spool file under ``config``'s data_dir (for ``events status``)."""
    folder = config.resolved_data_dir / SPOOL_FOLDER
    total = 0
    for path in folder.glob("*.sqlite3") if folder.is_dir() else ():
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
            try:
                total += int(db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
            finally:
                db.close()
    return total
