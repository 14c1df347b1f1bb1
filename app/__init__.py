"""The Textual dashboard: a viewer of a run's events.jsonl that writes control.jsonl.

`run_dashboard` is what the CLI calls; `LooptreeApp` is the App itself (for tests and embedding).
Both are imported lazily so that `import looptree.app` does not import Textual before the colour options
are applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from looptree.app.dashboard import LooptreeApp
    from looptree.app.main import run_dashboard

__all__ = ["LooptreeApp", "run_dashboard"]


def __getattr__(name: str) -> Any:
    if name == "run_dashboard":
        from looptree.app.main import run_dashboard

        return run_dashboard
    if name == "LooptreeApp":
        from looptree.app.dashboard import LooptreeApp

        return LooptreeApp
    raise AttributeError(f"module 'app' has no attribute {name!r}")
