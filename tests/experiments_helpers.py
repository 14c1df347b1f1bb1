"""Shared pieces of the `looptree ab` tests: a tiny suite of CPU tasks and scripted arms.

The two arms talk to two real OpenAI-compatible servers (tests/llm_server.py). Every reply is
the same text, so the order in which runs ask does not matter (a resumed experiment asks
again): a bulleted list (read as the ideas) followed by one SEARCH/REPLACE block (read as the
change). The test arm's change lowers VALUE, which the bench prints as its runtime; the control
arm's change only edits a comment, so it never improves anything.
"""

from __future__ import annotations

from pathlib import Path

# Shell, not Python: a bench run costs a millisecond, so the experiment's time is looptree's own.
BENCH = """\
. ./solver.sh
printf 'iteration,runtime_ms (lower is better)\\n0,%s\\n' "$VALUE" > "${LOOPTREE_METRICS:-metrics.csv}"
"""

IMPROVING = ("- Halve VALUE\n- Halve VALUE again\n\nsolver.sh\n<<<<<<< SEARCH\n# knob\n=======\n"
             "VALUE=$((VALUE / 2))\n# knob\n>>>>>>> REPLACE\n")
USELESS = ("- Reword the comment\n- Reword it again\n\nsolver.sh\n<<<<<<< SEARCH\n# knob\n=======\n"
           "# knob (reworded)\n>>>>>>> REPLACE\n")


def task_config(name: str) -> str:
    return f"""\
[project]
goal = "Make runtime_ms of task {name} lower by lowering VALUE in solver.sh."
writable = ["solver.sh"]
readonly = ["bench.sh"]

[bench]
command = "sh bench.sh"
repeats = 5
max_repeats = 5
timeout = 60
device = "cpu"
memory_limit_mb = 0

[agent]
provider = "local"
model = "scripted"
max_tokens = 300
request_timeout = 20
max_retries = 1

[search]
num_samples = 2
num_phases = 1
num_workers = 2
max_fix_attempts = 0
early_stop_patience = 0

[budget]
max_tokens = 200000
requests_per_minute = 0

[gpu]
devices = "none"
telemetry = "none"
"""


def make_suite(root: Path, n: int) -> Path:
    suite = root / "suite"
    for i in range(n):
        task = suite / f"task{i}"
        task.mkdir(parents=True)
        (task / "solver.sh").write_text(f"VALUE={100 * (i + 1)}\n# knob\n")
        (task / "bench.sh").write_text(BENCH)
        (task / "looptree.toml").write_text(task_config(f"task{i}"))
    return suite


def write_overlay(path: Path, base_url: str, experiment: str = "") -> Path:
    path.write_text(f'[agent]\nbase_url = "{base_url}"\n' + experiment)
    return path
