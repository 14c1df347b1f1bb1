"""The dashboard is a viewer: killing it mid-run leaves the engine running to the end, and a
new process attaching afterwards sees the same tree as `looptree tree`.

`looptree run` is started on a real pseudo-terminal (so it takes the dashboard path: engine in
its own session, dashboard in the foreground), then the dashboard process is SIGKILLed the way a
dropped SSH connection would end it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.terminal import Terminal

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_projects" / "hotloop"
QUICK = ["bench.repeats=1", "bench.compare=off", "search.num_phases=2"]

pytestmark = pytest.mark.slow

ATTACH_SCRIPT = r"""
import asyncio, json, sys
from pathlib import Path
from looptree.app.dashboard import LooptreeApp

async def main():
    app = LooptreeApp(Path(sys.argv[1]), mode="live", frozen_time=0.0)
    async with app.run_test(size=(160, 50)) as pilot:
        for _ in range(50):
            await pilot.pause(0.05)
        ids = sorted(app.view.state.nodes)
        best = app.view.state.best()
        print(json.dumps({"ids": ids, "best": best.id if best else None,
                          "finished": app.view.state.finished}))

asyncio.run(main())
"""


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_killing_the_dashboard_leaves_the_engine_running(tmp_path: Path) -> None:
    project = tmp_path / "hotloop"
    shutil.copytree(SAMPLE, project, ignore=shutil.ignore_patterns(".looptree", "__pycache__", "metrics.csv"))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40")
    terminal = Terminal([sys.executable, "-m", "looptree.app.cli", "run", str(project), *QUICK], cwd=REPO, env=env)
    dashboard = terminal.process
    run_dir = project / ".looptree" / "runs" / "1"
    try:
        _wait(lambda: any(e["type"] == "node_evaluated" for e in _events(run_dir)), 120)
        assert b"looptree" in bytes(terminal.screen)  # the dashboard really drew on the terminal
        assert dashboard.poll() is None
        os.killpg(dashboard.pid, signal.SIGKILL)  # the SSH session drops: the dashboard dies
        dashboard.wait(timeout=10)
        assert not any(e["type"] == "run_finished" for e in _events(run_dir))
        _wait(lambda: any(e["type"] == "run_finished" for e in _events(run_dir)), 240)
    finally:
        terminal.close()
    finished = [e for e in _events(run_dir) if e["type"] == "run_finished"][-1]
    assert finished["reason"] == "phases done"

    tree = json.loads(subprocess.run([sys.executable, "-m", "looptree.engine.cli", "tree", str(run_dir), "--json"],
                                     cwd=REPO, capture_output=True, text=True, check=True).stdout)
    attached = subprocess.run([sys.executable, "-c", ATTACH_SCRIPT, str(run_dir)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert attached.returncode == 0, attached.stderr[-2000:]
    seen = json.loads(attached.stdout.strip().splitlines()[-1])
    assert seen["ids"] == sorted(n["id"] for n in tree["nodes"])
    assert seen["best"] == tree["best"]
    assert seen["finished"] == "phases done"
