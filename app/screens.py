"""Modal screens: a one-line prompt (fork hint, go to node, seek), a yes/no confirm, and help.

Why one generic prompt: the three questions differ only in wording and validation, and a
validator that returns an error line keeps a typo from ever reaching `control.jsonl`.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

Validator = Callable[[str], str | None]  # returns an error message, or None when the text is fine


class PromptScreen(ModalScreen[str | None]):
    """Ask for one line of text; dismiss with it (enter) or with None (escape)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="looptree.modal.cancel")]

    def __init__(self, title: str, *, placeholder: str = "", value: str = "", validate: Validator | None = None,
                 note: str = "", id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id, classes="looptree-modal")
        self.title_text = title
        self.placeholder = placeholder
        self.initial = value
        self.validate_text = validate
        self.note = note

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(value=self.initial, placeholder=self.placeholder, id="prompt-input")
            yield Static(self.note, id="prompt-error", classes="dialog-note")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        error = self.validate_text(event.value) if self.validate_text else None
        if error:
            self.query_one("#prompt-error", Static).update(Text(error, style="bold red"))
            return
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no with the safe answer focused: stopping a run is not undoable."""

    BINDINGS = [Binding("escape", "answer(False)", "Cancel", id="looptree.modal.cancel"),
                Binding("y", "answer(True)", "Yes", id="looptree.modal.yes"),
                Binding("n", "answer(False)", "No", id="looptree.modal.no")]

    def __init__(self, question: str, *, yes: str = "Yes", no: str = "No") -> None:
        super().__init__(classes="looptree-modal")
        self.question = question
        self.yes, self.no = yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-title")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.no, id="no", variant="primary")
                yield Button(self.yes, id="yes", variant="error")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    """Every key, what it does, whether it applies now, and its keymap ID for remapping."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "Close", id="looptree.modal.close")]

    def __init__(self, rows: list[tuple[str, str, str, bool]], mode: str) -> None:
        super().__init__(classes="looptree-modal")
        self.rows = rows
        self.mode = mode

    def compose(self) -> ComposeResult:
        table = Table(box=None, pad_edge=False, expand=False, show_header=True, header_style="bold")
        table.add_column("key")
        table.add_column("action")
        table.add_column("keymap id", style="grey50")
        for key, description, binding_id, enabled in self.rows:
            table.add_row(key, Text(description, style="" if enabled else "grey50"), binding_id)
        with Vertical(classes="dialog help"):
            yield Label(f"looptree dashboard · {self.mode} · keys (greyed: not applicable now)", classes="dialog-title")
            with VerticalScroll():
                yield Static(table)
            yield Static("The dashboard only views the run: detaching (q) never stops it. Remap keys with "
                         "Textual's keymap by binding id. Ctrl+P opens the command palette.", classes="dialog-note")

    def action_close(self) -> None:
        self.dismiss(None)
