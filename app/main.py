"""`run_dashboard`: what `looptree run/attach/replay` call to show the dashboard.

Why colour handling lives here: Textual reads `TEXTUAL_COLOR_SYSTEM` and `NO_COLOR` when it is
imported and when the App is built, and over SSH `COLORTERM` is usually not forwarded, so a
truecolor-capable terminal is often detected as 256 colours (or the reverse on an old tmux). The
`color` option sets those variables before anything from Textual is imported or built.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

from looptree.engine.core.events import EVENTS_NAME
from looptree.engine.errors import LooptreeError

#: how far `pick_view` reads for the first event (one line: settings and task names)
FIRST_EVENT_BYTES = 1 << 20

COLOR_SYSTEMS = {"auto": None, "truecolor": "truecolor", "256": "256", "16": "standard", "none": None}


def apply_color_option(color: str | None) -> None:
    """Set TEXTUAL_COLOR_SYSTEM / NO_COLOR for `color` (auto, truecolor, 256, 16, none)."""
    if color is None:
        return
    if color not in COLOR_SYSTEMS:
        raise LooptreeError(f"--color must be one of {', '.join(COLOR_SYSTEMS)}, not {color!r}")
    if color == "none":
        os.environ["NO_COLOR"] = "1"
        return
    os.environ.pop("NO_COLOR", None)
    system = COLOR_SYSTEMS[color]
    if system is None:
        os.environ.pop("TEXTUAL_COLOR_SYSTEM", None)
    else:
        os.environ["TEXTUAL_COLOR_SYSTEM"] = system
    constants = sys.modules.get("textual.constants")
    if constants is not None:  # already imported (tests, or a CLI that imported Textual early)
        constants.COLOR_SYSTEM = system or "auto"  # type: ignore[attr-defined]


def pick_view(run_dir: Path) -> Literal["experiment", "run"]:
    """Which viewer a directory gets: the experiment view when its log starts with `experiment_started`.

    Why the first line only: a run's log starts with `run_started`, a `looptree ab` out
    directory's with `experiment_started`; one bounded read keeps `attach` instant on a huge log.
    Textual is not imported here (the colour options must be set first).
    """
    try:
        with open(Path(run_dir) / EVENTS_NAME, "rb") as fh:
            head = fh.read(FIRST_EVENT_BYTES)
        first = json.loads(head.split(b"\n", 1)[0])
    except (OSError, ValueError):
        return "run"
    return "experiment" if isinstance(first, dict) and first.get("type") == "experiment_started" else "run"


def run_dashboard(run_dir: Path, *, mode: Literal["live", "replay"] = "live", speed: float = 1.0,
                  color: str | None = None) -> int:
    """Show the dashboard on `run_dir` until the user detaches or quits; return an exit code.

    Live: the run may still be starting (no events yet) and goes on after `q`. Replay: the
    log must exist. Errors reading the log come back as exit code 2 with one line on stderr.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LooptreeError(f"{run_dir} is not a run directory (expected .looptree/runs/<N>/)")
    if mode == "replay" and not (run_dir / EVENTS_NAME).is_file():
        raise LooptreeError(f"{run_dir} has no {EVENTS_NAME} to replay")
    apply_color_option(color)
    if pick_view(run_dir) == "experiment":
        from looptree.app.experiment import run_experiment_view  # after the colour variables are set

        return run_experiment_view(run_dir)
    from looptree.app.dashboard import LooptreeApp  # after the colour variables are set

    app = LooptreeApp(run_dir, mode=mode, speed=speed, freeze_gc=True)
    app.run()
    code = app.return_code or 0
    if app.error:
        print(f"looptree: error: {app.error}", file=sys.stderr)
    elif mode == "live" and code == 0:
        finished = app.view.state.finished
        if finished is not None:  # nothing goes on: say how it ended and where to look
            print(f"looptree: run {run_dir.name} finished: {finished}; "
                  f"see `looptree tree {run_dir}`", file=sys.stderr)
        else:
            print(f"looptree: dashboard detached; the run goes on. Reattach with: looptree attach {run_dir}",
                  file=sys.stderr)
    return code
