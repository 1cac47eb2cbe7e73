"""What the HTTP frontend's shared routes act through: reloads (one process's, or every
worker's together) and the state a gateway's workers share (metrics, feedback, links)."""

from __future__ import annotations

from typing import Any, Protocol

from ensemble.control.reload import ReloadResult
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.links import Link


class Reloads(Protocol):
    """Applies configs to the gateway: ``control.reload.Reloader`` in one process, all
    workers together in several."""

    async def reload_text(self, text: str) -> ReloadResult: ...

    async def reload_file(self) -> ReloadResult: ...


class SharedRoutes(Protocol):
    """The routes whose state a gateway's workers share; ``LocalRoutes`` serves one process."""

    async def exposition(self) -> tuple[bytes, str]:
        """`/metrics`: the body and content type (the whole gateway's counts)."""
        ...

    async def feedback(self, name: str, body: bytes) -> dict[str, Any]:
        """A feedback post joined to its answer, wherever that answer is kept."""
        ...

    def change_link(self, link: Link, changes: dict[str, Any] | None) -> Link:
        """Override ``link``'s settings (None: back to the config's) in every worker; the
        link as it is now. ValueError or pydantic's ValidationError, changing nothing, when
        the changes are not valid."""
        ...


class LocalRoutes:
    """One gateway process: its own metrics, answers and links are all there is."""

    def __init__(self, dispatcher: Dispatcher, metrics: GatewayMetrics) -> None:
        self._dispatcher, self._metrics = dispatcher, metrics

    async def exposition(self) -> tuple[bytes, str]:
        return self._metrics.exposition()

    async def feedback(self, name: str, body: bytes) -> dict[str, Any]:
        return self._dispatcher.feedback.submit(name, body)

    def change_link(self, link: Link, changes: dict[str, Any] | None) -> Link:
        link.change(changes)
        return link
