"""Helpers of the operations tests: any command as a real process with its output in a log file."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoggedProcess:
    """``argv`` in its own session (so ``stop`` ends its children too), output in ``log``."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_output(self, marker: str, timeout: float = 60.0) -> None:
        def seen() -> bool:
            if marker in self.output():
                return True
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args} exited with {self.proc.returncode}:\n{self.output()}")
            return False

        wait_for(seen, timeout=timeout, what=f"{marker!r} in {self.log.name}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()


def http_get(url: str, auth: tuple[str, str] | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    """``(status, decoded JSON or text)`` of a GET; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode(errors="replace")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def http_up(url: str) -> bool:
    try:
        http_get(url, timeout=1.0)
    except OSError:
        return False
    return True
