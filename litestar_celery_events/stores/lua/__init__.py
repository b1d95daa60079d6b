"""The stores' Redis scripts, one ``.lua`` file each (package data), registered once per process."""

from __future__ import annotations

import threading
from functools import cache
from importlib import resources
from typing import Any

__all__ = ("lua_script",)

_registered: dict[str, Any] = {}
_lock = threading.Lock()


@cache
def _source(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def lua_script(client: Any, name: str) -> Any:
    """The script ``<name>.lua`` as a ``redis.commands.core.Script`` (EVALSHA, reloaded on NOSCRIPT;
    usable in pipelines by passing ``client=``)."""
    with _lock:
        script = _registered.get(name)
        if script is None:
            script = _registered[name] = client.register_script(_source(name))
    return script
