"""Command palette provider: every dashboard action, by name, greyed ones left out.

Why: a performance engineer who forgot that `S` stops the run can type "stop" in Ctrl+P. The
hits are built from the App's own bindings, so a remapped key shows up here remapped too.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from looptree.app.dashboard import LooptreeApp


class LooptreeCommands(Provider):
    def _actions(self) -> list[tuple[str, str, str]]:
        app: LooptreeApp = self.app  # type: ignore[assignment]
        return [(description, action, key) for key, description, action in app.palette_actions()]

    async def discover(self) -> Hits:
        app = self.app
        for description, action, key in self._actions():
            yield DiscoveryHit(description, partial(app.run_action, action), help=f"key: {key}")

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        app = self.app
        for description, action, key in self._actions():
            score = matcher.match(description)
            if score > 0:
                yield Hit(score, matcher.highlight(description), partial(app.run_action, action),
                          text=description, help=f"key: {key}")
