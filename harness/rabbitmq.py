"""A private RabbitMQ node for one test: its own name, ports, data folder and settings.

The machine's RabbitMQ (5672) is shared: a broker-wide setting such as ``consumer_timeout`` must
not change there. This starts a second node of the installed RabbitMQ (about 4 s here) with
its own ``rabbitmq.conf`` and ``advanced.config``, no plugins, everything under one folder, and
stops it (its whole process group) at the end. It registers with the machine's ``epmd`` under
its own node name, as any second node does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path

from harness import LoggedProcess, free_port, port_open, wait_for

__all__ = ("PrivateRabbitMQ", "rabbitmq_binary")

_LIBEXEC = Path("/usr/lib/rabbitmq/bin")  # Debian's: the /usr/sbin wrappers switch to the rabbitmq user


def rabbitmq_binary(name: str) -> str | None:
    """``rabbitmq-server`` / ``rabbitmqctl`` run as the current user (so they use this node's cookie)."""
    direct = _LIBEXEC / name
    return str(direct) if direct.exists() else shutil.which(name)


class PrivateRabbitMQ:
    """``rabbitmq-server`` on free ports, with ``settings`` (rabbitmq.conf lines) and ``rabbit_env`` (app env)."""

    def __init__(self, folder: Path, settings: Mapping[str, str], rabbit_env: Mapping[str, int | str]) -> None:
        server = rabbitmq_binary("rabbitmq-server")
        if server is None:
            raise FileNotFoundError("rabbitmq-server is not installed")
        self.folder = folder
        self.port = free_port()
        self.node = f"lce-{uuid.uuid4().hex[:8]}@localhost"
        conf = {"listeners.tcp.default": f"127.0.0.1:{self.port}", **settings}
        (folder / "rabbitmq.conf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
        terms = ", ".join(f"{{{k}, {v}}}" for k, v in rabbit_env.items())
        (folder / "advanced.config").write_text(f"[{{rabbit, [{terms}]}}].\n")
        (folder / "enabled_plugins").write_text("[].\n")  # no management listener on the shared 15672
        (folder / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")  # not /etc/rabbitmq's node name
        self.env = {
            "HOME": str(folder),  # the Erlang cookie of this node and of rabbitmqctl
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.process = LoggedProcess([server], self.env, folder / "rabbitmq-server.log")
        try:
            wait_for(self._up, timeout=60, what=f"private RabbitMQ node {self.node}")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _up(self) -> bool:
        if self.process.proc.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited: {self.process.output()[-2000:]}")
        return port_open(self.port)

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl -n <this node> ...``'s output."""
        ctl = rabbitmq_binary("rabbitmqctl") or "rabbitmqctl"
        out = subprocess.run(
            [ctl, "-n", self.node, "-q", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout

    def stop(self) -> None:
        self.process.stop(timeout=30)
