"""The `looptree` console script: the engine's CLI with the Textual dashboard plugged in.

Why here: the engine must not import the UI (checked by import-linter), so the composition
happens at the edge. Textual is imported only when a dashboard actually opens.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _dashboard(run_dir: Path, **kwargs: object) -> int:
    from looptree.app.main import run_dashboard

    return run_dashboard(run_dir, **kwargs)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    from looptree.engine.cli import main as engine_main

    return engine_main(argv, dashboard=_dashboard)


if __name__ == "__main__":
    sys.exit(main())
