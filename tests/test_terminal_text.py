"""Text from a run reaches the user's terminal with its escape sequences shown, never obeyed.

The attack: the candidate's bench prints `ESC ] 2 ; … ESC \\` (retitle the window) or `ESC ] 52`
(set the clipboard), or names a metric column that way; the dashboard shows the node's log
tail and its metrics, `looptree show` prints the logs, `--no-tui` prints the failure reason.
Textual and Rich strip only BEL, BS, VT, FF and CR, so before this the sequence went out to the
terminal whole (a tmux pane's title was set from a log line shown in the dashboard).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fixtures.terminal import Terminal

from looptree.app.synthetic import COLUMNS, demo_run, write_events
from looptree.engine.core.events import EVENTS_NAME, EventTail, iter_run
from looptree.engine.core.terminal import SafeStream, safe_text, safe_value

ROOT = Path(__file__).resolve().parents[1]
TITLE = "\x1b]2;PWNED_TITLE\x1b\\"  # OSC 2, string-terminated: sets the window title
CLIPBOARD = "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # OSC 52: puts "echo pwned" in the clipboard
BIDI = "\u202e"  # right-to-left override: a line that reads as another


def test_control_and_format_characters_are_shown_not_kept() -> None:
    assert safe_text("plain text, é, 中文") == "plain text, é, 中文"
    assert safe_text(f"a{TITLE}b") == "a\\x1b]2;PWNED_TITLE\\x1b\\b"
    assert safe_text("csi \x9b31m c1 del \x7f") == "csi \\x9b31m c1 del \\x7f"
    assert safe_text(f"x{BIDI}y") == "x\\u202ey"
    assert safe_text("two\nlines\tand a tab") == "two\nlines\tand a tab"
    assert safe_text("one\nline", keep="") == "one\\x0aline"
    event = {"type": "message", "text": f"bench said {CLIPBOARD}", f"k{BIDI}": [TITLE, 3, None]}
    assert "\x1b" not in json.dumps(safe_value(event), ensure_ascii=False)
    assert safe_value(event)["k\\u202e"][1:] == [3, None]


def test_the_cli_streams_escape_what_they_print(capsys) -> None:
    stream = SafeStream(sys.stdout)
    print(f"reason: {TITLE}{CLIPBOARD}", file=stream)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "PWNED_TITLE" in out


def test_viewers_read_the_log_with_escapes_made_visible(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "5"
    events = demo_run()
    events.append({"seq": len(events), "ts": events[-1]["ts"] + 1, "type": "message", "text": f"hi {TITLE}"})
    write_events(run_dir / EVENTS_NAME, events)
    for read in (EventTail(run_dir / EVENTS_NAME).poll(), list(iter_run(run_dir))):
        assert read[-1]["text"] == "hi \\x1b]2;PWNED_TITLE\\x1b\\"
        assert len(read) == len(events)


def _hostile_run(tmp_path: Path) -> Path:
    """The demo run with a metric column and the baseline's build log written by hostile code."""
    run_dir = tmp_path / "runs" / "5"
    column = f"time{TITLE}_ms (lower is better)"
    raw = json.dumps(demo_run(finished=True)).replace(json.dumps(COLUMNS[0])[1:-1], json.dumps(column)[1:-1])
    write_events(run_dir / EVENTS_NAME, json.loads(raw))
    logs = run_dir / "nodes" / "5"
    logs.mkdir(parents=True)
    (logs / "build.log").write_text(f"compiling\nPWNED_LOG{TITLE}{CLIPBOARD}{BIDI}done\n")
    return run_dir


def test_the_dashboard_on_a_real_terminal_never_sends_the_runs_escape_sequences(tmp_path: Path) -> None:
    run_dir = _hostile_run(tmp_path)
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="160", LINES="50", LOOPTREE_FROZEN_TIME="1700000100")
    code = f"import sys; from looptree.app import run_dashboard; sys.exit(run_dashboard({str(run_dir)!r}))"
    terminal = Terminal([sys.executable, "-c", code], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (b"PWNED_LOG" in terminal.screen
                                                   and b"PWNED_TITLE" in terminal.screen):
            time.sleep(0.1)
        terminal.type(b"q")
        terminal.process.wait(timeout=30)
    finally:
        terminal.close()
    shown = bytes(terminal.screen)
    assert b"PWNED_LOG" in shown and b"PWNED_TITLE" in shown, "the hostile text was not drawn at all"
    assert b"\x1b]2;PWNED" not in shown and b"\x1b]52;" not in shown
    assert "\u202e".encode() not in shown
    assert b"\\x1b]2;PWNED_TITLE" in shown  # shown to the user as text


def test_show_and_the_headless_replay_print_escapes_as_text(tmp_path: Path) -> None:
    run_dir = _hostile_run(tmp_path)
    env = {**os.environ, "LOOPTREE_FROZEN_TIME": "1700000100"}
    for argv in (["show", str(run_dir), "5"], ["replay", str(run_dir), "--no-tui", "--speed", "1000"],
                 ["tree", str(run_dir)]):
        out = subprocess.run([sys.executable, "-m", "looptree.engine.cli", *argv], cwd=ROOT, env=env,
                             capture_output=True, timeout=120)
        printed = out.stdout + out.stderr
        assert out.returncode == 0, printed[-2000:]
        assert b"\x1b]" not in printed and b"\x07" not in printed, argv
        assert b"PWNED" in printed, argv  # the hostile text was printed, made visible
