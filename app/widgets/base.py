"""What every widget that shows the run shares: it subscribes itself to the App's frames.

Why a mixin and a signal: Textual messages bubble up, so a `RunChanged` posted to the App never
reaches the widgets below it. The App republishes each one on its `run_changed` signal; a widget
with this mixin subscribes in `on_mount` and draws its own slice in `draw`. Adding a widget is
then composing it: nothing in the App names it.

The subscription is *immediate*: every widget draws inside the App's one `batch_update()` per
frame, as the measured design requires (one repaint per frame, not one per widget). Textual's
signal logs and drops a subscriber's exception; `_deliver` hands it to the App instead, so a
broken widget fails as loudly as a broken message handler.

A widget inside a tab (`TabbedContent` > `TabPane`) also learns when its tab is opened
(`on_tab_shown`), by watching the `active` reactive of its `TabbedContent`: the panels draw only
while they are visible, and catch up when shown.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from textual.signal import Signal
from textual.widgets import TabbedContent, TabPane

from looptree.app.messages import RunChanged
from looptree.app.model import RunView

if TYPE_CHECKING:
    from textual.widget import Widget

    _WidgetBase = Widget  # so type checkers see app, watch, ancestors… on the mixin
else:
    _WidgetBase = object

RUN_CHANGED = "run_changed"  # the App's attribute holding its Signal[RunChanged]


class RunWidget(_WidgetBase):
    """Mixed into a widget (first, before the Textual base): `draw` is called with every frame.

    A widget's own `on_mount` needs no `super()` call: Textual runs the handler of every class in
    the MRO that defines one, this mixin's included.
    """

    def on_mount(self) -> None:
        signal = getattr(self.app, RUN_CHANGED, None)
        if isinstance(signal, Signal):
            signal.subscribe(self, self._deliver, immediate=True)
        tabs, _pane = self._tab()
        if tabs is not None:
            self.watch(tabs, "active", self._tab_activated, init=False)

    def _deliver(self, frame: RunChanged) -> None:
        try:
            self.draw(frame)
        except Exception as error:  # noqa: BLE001 - re-raised through the App, as a handler's would be
            self.app._handle_exception(error)

    def draw(self, frame: RunChanged) -> None:
        """Redraw what `frame` changed of this widget's slice (compare with what is shown first)."""
        raise NotImplementedError

    def on_tab_shown(self) -> None:
        """The widget's tab was just opened: draw what was skipped while it was hidden."""

    @property
    def shown(self) -> bool:
        """False while the widget sits in a tab that is not the open one."""
        tabs, pane = self._tab()
        return tabs is None or pane is None or tabs.active == pane.id

    def _tab(self) -> tuple[TabbedContent | None, TabPane | None]:
        pane = next((node for node in self.ancestors if isinstance(node, TabPane)), None)
        tabs = next((node for node in self.ancestors if isinstance(node, TabbedContent)), None)
        return (tabs, pane) if pane is not None else (None, None)

    def _tab_activated(self, active: str) -> None:
        _tabs, pane = self._tab()
        if pane is not None and active == pane.id:
            self.on_tab_shown()


class ThrottledRunWidget(RunWidget):
    """A panel too costly to redraw on every frame: it marks itself dirty and redraws at most
    once per `PERIOD_S`, and only while its tab is shown (then at once when the tab opens).

    A subclass says which frames concern it (`concerns`) and how to draw the view (`sync`).
    """

    PERIOD_S = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the Textual base's arguments
        self._view: RunView | None = None
        self._dirty = True
        self._at = 0.0

    def concerns(self, frame: RunChanged) -> bool:
        """True when `frame` changed what this panel shows."""
        raise NotImplementedError

    def forget(self) -> None:
        """A replay seeked back (`frame.reset`): drop what is shown before the view is drawn anew."""

    def sync(self, view: RunView) -> object:
        raise NotImplementedError

    def draw(self, frame: RunChanged) -> None:
        self._view = frame.view
        if frame.reset:
            self.forget()
        if self.concerns(frame) or frame.reset:
            self._dirty = True
        self._maybe(force=frame.force)

    def on_tab_shown(self) -> None:
        self._maybe(force=True)

    def _maybe(self, force: bool = False) -> None:
        if not (self._dirty or force) or self._view is None or not self.shown:
            return  # drawn when its tab is shown
        now = time.monotonic()
        if not force and now - self._at < self.PERIOD_S:
            return
        self._at = now
        self._dirty = False
        self.sync(self._view)
