"""`looptree tree` and `show` as text: failure reasons wrapped between words, every reply shown.

The event log is the hand-written fixture run (tests/fixtures/eng_run2_events.jsonl) plus a few
nodes a real run produces: an agent reply whose edits did not apply, and a benchmark that failed
with a long reason. `tree`/`show` go through the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from looptree.engine.core.state import RunState
from looptree.engine.run.printer import format_event
from looptree.engine.run.report import REASON_LINES, REASON_WIDTH, clip_words, wrap_reason

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "eng_run2_events.jsonl"

LONG_REASON = ("bench command exited with status 1: Traceback (most recent call last): File \"bench.py\", line 12, "
               "in <module> main() File \"bench.py\", line 9, in main total = solve(data) File \"solver.py\", "
               "line 4, in solve return numpy_accumulate(xs) NameError: name 'numpy_accumulate' is not defined")
REPLY_LINES = [f"line {i}: reasoning about the change, step {i}" for i in range(1, 61)]
EDIT_REASON = "edit block 1 for solver.py: the SEARCH text does not occur in the file"


def extra_events(seq: int, ts: float) -> list[dict]:
    def ev(type_: str, **fields) -> dict:
        nonlocal seq, ts
        seq, ts = seq + 1, ts + 0.1
        return {"seq": seq, "ts": ts, "type": type_, **fields}

    reply = "\n".join(REPLY_LINES)
    return [
        ev("node_created", id="2.3", parent="2", phase=0, kind="idea", idea="vectorise with numpy"),
        ev("agent_started", id="2.3", role="optimize"),
        ev("agent_finished", id="2.3", role="optimize", text=reply, description=REPLY_LINES[0],
           usage={"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}, model="m", prompt_hash="h"),
        ev("edits_rejected", id="2.3", reason=EDIT_REASON),
        ev("node_failed", id="2.3", stage="edit", reason=EDIT_REASON),
        ev("node_created", id="2.1.1", parent="2.1", phase=1, kind="improve"),
        ev("agent_started", id="2.1.1", role="optimize"),
        ev("agent_finished", id="2.1.1", role="optimize", text="Short reply.", description="Short reply.",
           usage={"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}, model="m", prompt_hash="h2"),
        ev("edits_applied", id="2.1.1", files=["solver.py"], commit="4" * 40, branch="looptree/2.1.1"),
        ev("node_failed", id="2.1.1", stage="bench", reason=LONG_REASON),
        ev("node_created", id="2.1.2", parent="2.1", phase=1, kind="improve"),
        ev("agent_started", id="2.1.2", role="optimize"),
        ev("agent_failed", id="2.1.2", role="optimize", reason="HTTP 500"),
        ev("node_failed", id="2.1.2", stage="agent", reason="HTTP 500"),
    ]


def make_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "proj" / ".looptree" / "runs" / "2"
    run_dir.mkdir(parents=True)
    events = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    last = events.pop()  # run_finished stays last
    events += extra_events(events[-1]["seq"], events[-1]["ts"])
    events.append({**last, "seq": events[-1]["seq"] + 1})
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    node = run_dir / "nodes" / "2.3"
    node.mkdir(parents=True)
    (node / "response.md").write_text("\n".join(REPLY_LINES))
    (run_dir / "ideas.md").write_text("1. use sum()\n2. cache results\n")
    return run_dir


def cli(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "LOOPTREE_"))}
    result = subprocess.run([sys.executable, "-m", "looptree.engine.cli", *args], cwd=ROOT, env=env, check=False,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return result.stdout


def words(text: str) -> list[str]:
    return text.split()


def test_tree_wraps_a_long_failure_reason_between_words(tmp_path: Path) -> None:
    out = cli("tree", str(make_run(tmp_path)))
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "2.1.1  FAILED" in line)
    first = lines[start]
    assert first.startswith("│   ├── 2.1.1  FAILED   bench: bench command exited")
    continuation = []
    for line in lines[start + 1:]:
        if not line.startswith("│   │       "):
            break
        continuation.append(line.removeprefix("│   │       "))
    assert continuation, out
    assert all(len(part) <= REASON_WIDTH for part in continuation)
    head = first.split("bench: ", 1)[1].split("  — improve:")[0]
    assert words(head + " " + " ".join(continuation)) == words(LONG_REASON)  # every word, whole, in order
    # the sibling below still hangs off the same branch
    assert lines[start + 1 + len(continuation)].startswith("│   └── 2.1.2  FAILED   agent: HTTP 500")
    assert "├── 2.2  FAILED   build: SyntaxError: invalid syntax  — idea: Cache the results." in out  # short: one line


def test_a_very_long_reason_ends_at_a_word_with_a_pointer_to_show() -> None:
    reason = " ".join(f"word{i:03d}" for i in range(400))
    lines = wrap_reason(reason, "7.4")
    assert len(lines) == REASON_LINES
    assert lines[-1].endswith("(the whole reason: `looptree show <run dir> 7.4`)")
    shown = words(" ".join(lines).split(" …")[0])
    assert shown == words(reason)[: len(shown)]


def test_clip_words_never_cuts_inside_a_word() -> None:
    text = "make the inner loop use numpy vectorised sums instead of python lists everywhere"
    clipped = clip_words(text, 40)
    assert len(clipped) <= 40 and clipped.endswith("…")
    assert text.startswith(clipped[:-1]) and text[len(clipped) - 1] == " "
    assert clip_words("short", 40) == "short"


def test_headless_lines_cut_between_words() -> None:
    state = RunState()
    line = format_event({"type": "node_failed", "id": "2.1", "stage": "bench", "reason": LONG_REASON * 3}, state)
    assert line is not None and line.endswith("…")
    last_word = line.removesuffix("…").split()[-1]
    assert last_word in words(LONG_REASON * 3)


def test_show_prints_the_reply_of_a_node_that_failed_at_the_edit_stage(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    out = cli("show", str(run_dir), "2.3")
    path = run_dir / "nodes" / "2.3" / "response.md"
    assert f"## agent reply (first 40 of 60 lines; the whole reply: {path})" in out
    assert REPLY_LINES[0] in out and REPLY_LINES[39] in out and REPLY_LINES[40] not in out
    assert f"… (20 more lines in {path})" in out
    assert f"## failure (edit)\n{EDIT_REASON}" in out


def test_show_prints_every_reply_it_has(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    # a reply known only from the event log (no response.md), on a node that failed later
    out = cli("show", str(run_dir), "2.1.1")
    assert "## agent reply (1 lines; from the event log)\nShort reply." in out
    assert re.search(r"## failure \(bench\)\n" + re.escape(LONG_REASON), out)
    assert "## agent reply" not in cli("show", str(run_dir), "2.1.2")  # the call failed: no reply
    assert "## agent reply (1 lines; from the event log)\nCache." in cli("show", str(run_dir), "2.2")
    base = cli("show", str(run_dir), "2")
    assert f"## ideas reply (asked on the baseline) (2 lines; the whole reply: {run_dir / 'ideas.md'})" in base
