"""The key footer, without the leak of Textual's own on every recompose.

Why: Textual's `Footer` recomposes whenever the screen's bindings change (here: every time an
action is enabled or disabled, e.g. a node selected, a tab switched). Each `FooterKey` it yields
is `data_bind`-ed to the footer's `compact` reactive, which registers a watcher closure on the
footer holding the key. Textual drops watchers of closed widgets only when the watched value
changes, and `compact` never does, so every recompose kept its ~10 keys (their styles, strips
and caches) alive for good: ~2 MiB a minute in a session where the user browses the tree
(benchmarks/soak_bench.py). After each recompose this footer drops the watchers of the keys
that are gone.
"""

from __future__ import annotations

from textual.widgets import Footer


class LeanFooter(Footer):
    """`Footer` that forgets the watchers of the keys each recompose removed."""

    recomposed = 0  # how many times it recomposed (the long-session test reads it)

    async def recompose(self) -> None:
        await super().recompose()
        self.recomposed += 1
        self.prune_watchers()

    def prune_watchers(self) -> int:
        """Drop watchers whose widget has closed or left the DOM; returns how many were dropped."""
        watchers = getattr(self, "__watchers", None)  # Textual's own attribute name (reactive._watch)
        if not isinstance(watchers, dict):
            return 0
        dropped = 0
        for name, entries in watchers.items():
            alive = [(node, callback) for node, callback in entries
                     if not (getattr(node, "_closing", False) or getattr(node, "_closed", False))
                     and (node is self or getattr(node, "is_attached", True))]
            dropped += len(entries) - len(alive)
            watchers[name] = alive
        return dropped
