"""Thin glue: installs the Celery emitter backend on Litestar's ``AppConfig``; nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar.plugins import CLIPluginProtocol, InitPluginProtocol

from litestar_celery_events.config import CeleryEventsConfig
from litestar_celery_events.emitter import CeleryEventEmitter

if TYPE_CHECKING:
    from click import Group
    from litestar import Litestar
    from litestar.config.app import AppConfig

__all__ = ("CeleryEventsPlugin",)


class CeleryEventsPlugin(InitPluginProtocol, CLIPluginProtocol):
    """Run Litestar event listeners on Celery workers: ``Litestar(plugins=[CeleryEventsPlugin(config)])``."""

    __slots__ = ("config",)

    def __init__(self, config: CeleryEventsConfig | None = None) -> None:
        self.config = config or CeleryEventsConfig()

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        # Litestar instantiates the backend with only ``listeners=``: the config rides on a subclass.
        # The dependencies dict is the one later plugins (advanced-alchemy's db_session) add to.
        app_config.event_emitter_backend = CeleryEventEmitter.bound_to(self.config, app_config.dependencies)
        app_config.on_startup.append(_warn_if_state_not_shared)
        if self.config.outbox is not None:
            from litestar_celery_events.outbox import remember_request_scope, start_outbox, stop_outbox

            app_config.middleware.insert(0, remember_request_scope)
            app_config.on_startup.append(start_outbox)
            app_config.on_shutdown.append(stop_outbox)
        return app_config

    def on_cli_init(self, cli: Group) -> None:
        from litestar_celery_events.cli import events_group

        cli.add_command(events_group)


def _warn_if_state_not_shared(app: Litestar) -> None:
    from litestar_celery_events.emitter import emitter_of
    from litestar_celery_events.stores.state import warn_if_not_shared

    emitter = emitter_of(app)
    warn_if_not_shared(emitter.config, emitter.celery_app, "web process")
