"""The dashboard's keys and what they do: control commands, navigation, replay, help.

Why a separate module: this is the part a user touches. Each key has a Binding with an `id`
(remappable through Textual's keymap), shows in the footer, the help screen and the command
palette, and is greyed out (`check_action` → None) when it makes no sense for the selection or
the run, or hidden (False) in the other mode. Commands go through `engine.control` exactly as
`looptree ctl` sends them; the dashboard never changes the run itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.binding import Binding, BindingType

from looptree.app.model import RUNNING, RunView
from looptree.app.replay import ReplayCursor, parse_seek
from looptree.app.screens import ConfirmScreen, HelpScreen, PromptScreen
from looptree.engine.core.state import NodeState
from looptree.engine.errors import LooptreeError
from looptree.engine.run.control import append_control, make_command

if TYPE_CHECKING:
    from textual.app import App

    from looptree.app.replay import Seek
    from looptree.app.widgets.run_tree import RunTree

    _AppBase = App[int]  # so type checkers see notify, push_screen, set_timer… on the mixin
else:
    _AppBase = object

#: Actions that write to control.jsonl or otherwise only make sense on a live run.
LIVE_ACTIONS = frozenset({"prune", "pin", "fork", "pause_resume", "kill", "stop", "budget", "detach"})
REPLAY_ACTIONS = frozenset({"play_pause", "step", "seek_by", "seek_to", "seek_prompt", "speed", "quit_replay"})
CONTROL_ACTIONS = frozenset({"prune", "pin", "fork", "pause_resume", "kill", "stop", "budget"})
OWN_ACTIONS = LIVE_ACTIONS | REPLAY_ACTIONS | {"best", "goto", "help"}

BINDINGS: list[BindingType] = [
    Binding("p", "prune", "Prune", id="looptree.prune", tooltip="Prune the selected node and its subtree"),
    Binding("P", "pin", "Pin", id="looptree.pin", tooltip="Pin or unpin the selected node"),
    Binding("f", "fork", "Fork", id="looptree.fork", tooltip="Fork the selected node with a hint for the agent"),
    Binding("space", "pause_resume", "Pause", id="looptree.pause", tooltip="Pause or resume the run"),
    Binding("space", "play_pause", "Play", id="looptree.replay.play", tooltip="Play or pause the replay"),
    Binding("k", "kill", "Kill", id="looptree.kill", tooltip="Kill the selected running node"),
    Binding("S", "stop", "Stop", id="looptree.stop", tooltip="Stop the run (asks first)"),
    Binding("plus", "budget(1)", "Budget+", id="looptree.budget_up", tooltip="Raise the token cap by 10%", show=False),
    Binding("minus", "budget(-1)", "Budget-", id="looptree.budget_down", tooltip="Lower the token cap by 10%",
            show=False),
    Binding("b", "best", "Best", id="looptree.best", tooltip="Select the best node"),
    Binding("slash", "goto", "Go to", id="looptree.goto", tooltip="Select a node by its ID"),
    Binding("full_stop,n", "step", "Step", id="looptree.replay.step", tooltip="Apply the next event"),
    Binding("left_square_bracket", "seek_by(-10)", "-10%", id="looptree.replay.back", tooltip="Seek back 10%"),
    Binding("right_square_bracket", "seek_by(10)", "+10%", id="looptree.replay.forward", tooltip="Seek forward 10%"),
    Binding("home", "seek_to(0)", "Start", id="looptree.replay.start", show=False, tooltip="Seek to the start"),
    Binding("end", "seek_to(100)", "End", id="looptree.replay.end", show=False, tooltip="Seek to the end"),
    Binding("g", "seek_prompt", "Seek", id="looptree.replay.seek", tooltip="Seek to a percentage or event number"),
    Binding("greater_than_sign", "speed(2)", "×2", id="looptree.replay.faster", tooltip="Double the replay speed"),
    Binding("less_than_sign", "speed(0.5)", "÷2", id="looptree.replay.slower", tooltip="Halve the replay speed"),
    Binding("q", "detach", "Detach", id="looptree.detach", tooltip="Leave the dashboard; the run goes on"),
    Binding("q", "quit_replay", "Quit", id="looptree.quit", tooltip="Quit the replay"),
    Binding("question_mark", "help", "Help", id="looptree.help", tooltip="Show every key"),
]


class DashboardActions(_AppBase):
    """Mixed into `LooptreeApp`: the action_* methods its bindings call, and their enabled state."""

    if TYPE_CHECKING:  # provided by LooptreeApp
        run_dir: Path
        mode: str
        view: RunView
        cursor: ReplayCursor | None
        loaded: bool
        _selected_id: str | None
        _binding_sig: Any
        _footer_pending: bool
        _last_tick: float

        @property
        def run_tree(self) -> RunTree: ...
        @property
        def selected_node(self) -> NodeState | None: ...

        def _select(self, node_id: str) -> None: ...
        def _log_lines(self, lines: list[tuple[str, str]]) -> None: ...
        def _apply_seek(self, seek: Seek) -> None: ...
        def _post_frame(self, *, force: bool = False, reset: bool = False) -> None: ...
        def _tick(self) -> None: ...
        def _alive(self) -> bool: ...

    # -- actions: enabled or not ---------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in LIVE_ACTIONS and self.mode != "live":
            return False
        if action in REPLAY_ACTIONS and self.mode != "replay":
            return False
        if action not in OWN_ACTIONS or action in ("detach", "quit_replay", "help"):
            return True
        return True if self._enabled(action, parameters) else None

    def _enabled(self, action: str, parameters: tuple[object, ...] = ()) -> bool:
        if not self.loaded:
            return False
        state = self.view.state
        node = self.selected_node
        if action in CONTROL_ACTIONS and (state.finished or state.run is None):
            return False
        if action == "prune":
            return node is not None and node.parent is not None and not node.pruned
        if action == "pin":
            return node is not None
        if action == "fork":
            return node is not None and node.ok and bool(node.commit)
        if action == "kill":
            return node is not None and node.status in RUNNING
        if action == "stop":
            return not state.stop_requested
        if action == "pause_resume":
            return True
        if action == "budget":
            step = self._budget_step()
            direction = parameters[0] if parameters else 1
            return step > 0 and (direction > 0 or (state.max_tokens or 0) - step > state.tokens_spent)  # type: ignore[operator]
        if action == "best":
            return self.view.best_id is not None
        if action == "goto":
            return bool(state.nodes)
        cursor = self.cursor
        if cursor is None or cursor.total == 0:
            return False
        if action == "step":
            return not cursor.at_end
        if action == "play_pause":
            return cursor.playing or not cursor.at_end
        if action == "speed":
            factor = float(parameters[0]) if parameters else 2.0  # type: ignore[arg-type]
            return (cursor.speed < 256.0) if factor > 1 else (cursor.speed > 0.25)
        return True

    def _refresh_footer(self) -> None:
        """Refresh the footer only when some action's enabled state actually flipped."""
        sig = tuple(self._enabled(action, params) for action, params in (
            ("prune", ()), ("pin", ()), ("fork", ()), ("kill", ()), ("stop", ()), ("pause_resume", ()),
            ("budget", (1,)), ("budget", (-1,)), ("best", ()), ("goto", ()), ("step", ()), ("play_pause", ()),
            ("speed", (2,)), ("speed", (0.5,))))
        if sig != self._binding_sig:
            self._binding_sig = sig
            # Refreshing bindings recomposes the footer (tens of ms): coalesce bursts of flips.
            if not self._footer_pending:
                self._footer_pending = True
                self.set_timer(0.15, self._footer_now, name="footer")

    def _footer_now(self) -> None:
        self._footer_pending = False
        if self._alive():  # the timer may fire while the app shuts down
            self.refresh_bindings()

    # -- actions: control commands (live) ------------------------------------------------
    def _send(self, cmd: str, node_id: str | None = None, **fields: Any) -> bool:
        """Validate and append one command to control.jsonl; the engine answers with events."""
        try:
            record = make_command(cmd, node_id, **fields)
            append_control(self.run_dir, record)
        except (LooptreeError, OSError) as exc:
            self.notify(str(exc), title="command not sent", severity="error")
            return False
        what = " ".join(str(v) for v in (cmd, node_id, fields.get("tokens"), fields.get("hint")) if v)
        self._log_lines([(f"→ sent: {what}", "sent")])
        self.notify(f"sent: {what}", timeout=3)
        return True

    def action_prune(self) -> None:
        node = self.selected_node
        if node is not None:
            self._send("prune", node.id)

    def action_pin(self) -> None:
        node = self.selected_node
        if node is not None:
            self._send("unpin" if node.pinned else "pin", node.id)

    def action_fork(self) -> None:
        node = self.selected_node
        if node is None:
            return
        node_id = node.id

        def done(hint: str | None) -> None:
            if hint is not None:
                self._send("fork", node_id, hint=hint.strip())

        self.push_screen(PromptScreen(f"Fork {node_id}: a hint for the agent (enter to send, escape to cancel)",
                                      placeholder="e.g. try a blocked layout for the inner loop", id="fork-modal"), done)

    def action_pause_resume(self) -> None:
        self._send("resume" if self.view.state.paused else "pause")

    def action_kill(self) -> None:
        node = self.selected_node
        if node is not None:
            self._send("kill", node.id)

    def action_stop(self) -> None:
        def done(yes: bool | None) -> None:
            if yes:
                self._send("stop")

        self.push_screen(ConfirmScreen("Stop the run? Running nodes are killed; `looptree resume` can continue it later.",
                                       yes="Stop the run", no="Keep running"), done)

    def _budget_step(self) -> int:
        cap = self.view.state.max_tokens or 0
        return int(round(cap * 0.10))

    def action_budget(self, direction: int) -> None:
        step = self._budget_step()
        if step > 0:
            self._send("budget", tokens=f"{'+' if direction > 0 else '-'}{step}")

    # -- actions: navigation -------------------------------------------------------------
    def action_best(self) -> None:
        best = self.view.best_id
        if best is not None and self.run_tree.select_id(best):
            self._select(best)

    def action_goto(self) -> None:
        nodes = self.view.state.nodes

        def validate(text: str) -> str | None:
            node_id = text.strip()
            return None if node_id in nodes else f"no node {node_id!r} in this run"

        def done(text: str | None) -> None:
            node_id = (text or "").strip()
            if node_id in self.view.state.nodes and self.run_tree.select_id(node_id):
                self._select(node_id)

        self.push_screen(PromptScreen("Go to node (e.g. 5.3.1)", placeholder="node ID", validate=validate,
                                      id="goto-modal"), done)

    def action_detach(self) -> None:
        self.exit(0)

    def action_quit_replay(self) -> None:
        self.exit(0)

    def action_help(self) -> None:
        rows = []
        for key, binding, _ in self._own_bindings():
            state = self.check_action(*_split_action(binding.action))
            if state is False:
                continue
            rows.append((key, binding.tooltip or binding.description, binding.id or "", bool(state)))
        self.push_screen(HelpScreen(rows, self.mode), lambda _: None)

    def _own_bindings(self) -> list[tuple[str, Binding, str]]:
        """(shown key, binding, action) for each dashboard binding, honouring the keymap."""
        out = []
        for binding in type(self).BINDINGS:
            if not isinstance(binding, Binding) or not binding.id or not binding.id.startswith("looptree."):
                continue
            keys = self._keymap.get(binding.id, binding.key)
            shown = ",".join(self.get_key_display(Binding(k.strip(), "")) for k in keys.split(","))
            out.append((shown, binding, binding.action))
        return out

    def palette_actions(self) -> list[tuple[str, str, str]]:
        """(key, description, action) of every enabled dashboard action, for the command palette."""
        out = []
        for key, binding, action in self._own_bindings():
            name, params = _split_action(action)
            if self.check_action(name, params):
                out.append((key, binding.tooltip or binding.description, action))
        return out

    # -- actions: replay -----------------------------------------------------------------
    def action_play_pause(self) -> None:
        cursor = self.cursor
        if cursor is None:
            return
        cursor.toggle()
        self._last_tick = time.monotonic()
        self._tick()  # the header's ▶/⏸ and the keys

    def action_step(self) -> None:
        if self.cursor is not None:
            self.cursor.playing = False
            self.view.apply_all(self.cursor.step())
            self._post_frame(force=True)

    def action_seek_by(self, percent: float) -> None:
        cursor = self.cursor
        if cursor is not None:
            self._apply_seek(cursor.seek(cursor.position + round(cursor.total * percent / 100.0)))

    def action_seek_to(self, percent: float) -> None:
        if self.cursor is not None:
            self._apply_seek(self.cursor.seek_percent(percent))

    def action_seek_prompt(self) -> None:
        cursor = self.cursor
        if cursor is None:
            return
        total = cursor.total

        def validate(text: str) -> str | None:
            try:
                parse_seek(text, total)
            except ValueError as exc:
                return str(exc)
            return None

        def done(text: str | None) -> None:
            if text is not None and self.cursor is not None:
                self._apply_seek(self.cursor.seek(parse_seek(text, total)))

        self.push_screen(PromptScreen(f"Seek to a percentage (50%) or an event number (0–{total})",
                                      placeholder="50%", validate=validate, id="seek-modal"), done)

    def action_speed(self, factor: float) -> None:
        if self.cursor is not None:
            speed = self.cursor.change_speed(float(factor))
            self._tick()
            self.notify(f"replay speed ×{speed:g}", timeout=2)


def _split_action(action: str) -> tuple[str, tuple[object, ...]]:
    """`budget(1)` → ("budget", (1,)); enough for this App's own binding strings."""
    if "(" not in action:
        return action, ()
    name, _, rest = action.partition("(")
    raw = rest.rstrip(")").strip()
    if not raw:
        return name, ()
    try:
        value: object = float(raw) if "." in raw else int(raw)
    except ValueError:
        value = raw
    return name, (value,)
