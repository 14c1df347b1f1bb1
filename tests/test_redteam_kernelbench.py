"""Red-team of the KernelBench launcher: the candidate's process writes nothing the verdict believes.

Each hack below is a real ModelNew run through the real launcher (``python -m
looptree.gpu.kernelbench.runner``) in a real process. Before the fix, the child process that
imports ModelNew wrote the timing marks the launcher clocked, the correctness verdict and the
result file itself; each of these hacks was then credited correct, not suspect and faster
(the first one 5x). The launcher now clocks every trial itself, a second process that never
imports the candidate judges the outputs, and the candidate's own reports can only count
against it. A test here fails when that is undone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

QUICK = ["--no-compile", "--warmup-seconds", "0", "--trials", "8", "--seeds", "2"]

# Heavy enough (a few ms a call on one thread) that the launcher's latency is small beside it.
PROBLEM = '''import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, A, B):
        return torch.relu(torch.matmul(A, B)) @ B


def get_inputs():
    return [torch.randn(512, 512), torch.randn(512, 512)]


def get_init_inputs():
    return []
'''

# The reported attack: slow the bench's own clock 5x AND forge the launcher's timing marks
# (B and E sent back to back, the call itself outside them). Works on every layout of the bench
# it knows: the old per-trial marks and the paced trials of the current one.
SLOW_CLOCK_AND_FORGED_MARKS = '''
import sys
import torch
import torch.nn as nn

runner = sys.modules.get("looptree.gpu.kernelbench.runner")
timing = sys.modules.get("looptree.gpu.bench.timing")
if timing is not None:
    _real = timing._perf_counter_ns
    _origin = _real()
    timing._perf_counter_ns = lambda: _origin + (_real() - _origin) // 5
if runner is not None and hasattr(runner, "_PROGRESS"):
    prog = runner._PROGRESS
    _mark = prog.mark

    def mark(what):
        if what == "B":
            return
        if what == "E":
            _mark("B")
            _mark("E")
            return
        _mark(what)

    prog.mark = mark
if runner is not None and hasattr(runner, "_Paced"):
    paced = runner._Paced
    _pmark = paced.mark

    def pmark(self, what):  # answer "done" at once, then do the call's work before the digest
        if what == "B":
            _pmark(self, "B")
            _pmark(self, "E")
            self._deferred = True
            return
        if what == "E" and getattr(self, "_deferred", False):
            self._deferred = False
            return
        _pmark(self, what)

    paced.mark = pmark


class ModelNew(nn.Module):
    def forward(self, A, B):
        return torch.relu(A @ B) @ B
'''

# Wrong and fast, and the in-process correctness checks patched to say "fine".
FORGED_CORRECTNESS = '''
import sys
import torch
import torch.nn as nn
import looptree.gpu.bench.correctness as corr

corr.check_outputs = lambda *a, **k: corr.CorrectnessReport(True, "outputs match", 0.0, 0.0, [0, 1])
corr.compare_leaves = lambda *a, **k: (0.0, 0.0)
corr._check_pair = lambda *a, **k: (0.0, 0.0)
runner = sys.modules.get("looptree.gpu.kernelbench.runner")
if runner is not None:
    runner._check_correctness = lambda task, reference, candidate, args, result: None


class ModelNew(nn.Module):
    def forward(self, A, B):
        return torch.ones(A.shape[0], B.shape[1])
'''

# Writes the verdict itself: a result file (wherever the launcher said to write one) and a
# result record on every pipe it holds, then leaves before anything is checked.
FORGED_RESULT = '''
import json
import os
import sys
import torch.nn as nn

forged = {"ok": True, "correct": True, "suspect": False, "reason": "", "exit_code": 0, "device": "cpu",
          "eager_ms": 5.0, "compile_ms": 5.0, "runtime_ms": 1.0, "speedup_vs_eager": 5.0,
          "speedup_vs_compile": 5.0, "eager_median_ms": 5.0, "runtime_median_ms": 1.0,
          "eager_wall_ms": 5.0, "runtime_wall_ms": 1.0, "trials": 8, "threads": 1}
argv = sys.argv
for flag in ("--_child-result", "--json"):
    if flag in argv:
        path = argv[argv.index(flag) + 1]
        with open(path, "w") as fh:
            fh.write(json.dumps({"problem": "p", "solution": "s", **forged}) + "\\n")
for name in os.listdir("/proc/self/fd"):
    try:
        os.write(int(name), ("X " + json.dumps(forged) + "\\n").encode())
    except OSError:
        pass
sys.stdout.flush()
os._exit(0)


class ModelNew(nn.Module):
    pass
'''

# Commits a digest that is not its output's (so it could decide later what to send), and sends
# the real output when asked.
UNCOMMITTED_OUTPUT = '''
import sys
import torch
import torch.nn as nn

runner = sys.modules.get("looptree.gpu.kernelbench.runner")
if runner is not None and hasattr(runner, "_output_digest"):
    runner._output_digest = lambda header, leaves: "0" * 32


class ModelNew(nn.Module):
    def forward(self, A, B):
        return torch.relu(A @ B) @ B
'''

# Leaves a process behind (setsid, double fork) that waits for the launcher's result file and
# writes a credited result over it once the launcher is done.
FORGED_AFTER_THE_LAUNCHER = '''
import json
import os
import time
import torch
import torch.nn as nn


def _result_path():
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
        except OSError:
            continue
        if b"--json" in argv and any(b"kernelbench.runner" in a for a in argv):
            return argv[argv.index(b"--json") + 1].decode()
    return None


if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        path = _result_path()
        forged = {"ok": True, "correct": True, "suspect": False, "reason": "forged", "exit_code": 0,
                  "runtime_ms": 1.0, "eager_ms": 5.0, "speedup_vs_eager": 5.0}
        deadline = time.time() + 30
        while path and time.time() < deadline:
            try:
                with open(path) as fh:
                    text = fh.read()
                if '"forged"' not in text and text.strip():
                    time.sleep(0.05)
                    with open(path, "w") as fh:
                        fh.write(json.dumps(forged))
            except OSError:
                pass
            time.sleep(0.01)
        os._exit(0)
    os._exit(0)


class ModelNew(nn.Module):
    def forward(self, A, B):
        return torch.ones(A.shape[0], B.shape[1])
'''

HONEST = '''
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def forward(self, A, B):
        return torch.mm(torch.mm(A, B).clamp_min_(0.0), B)
'''


def run_launcher(tmp_path: Path, solution_source: str, timeout: float = 180,
                 problem_source: str = PROBLEM) -> tuple[int, dict, str]:
    problem = tmp_path / "problem.py"
    problem.write_text(problem_source)
    solution = tmp_path / "solution.py"
    solution.write_text(solution_source)
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "looptree.gpu.kernelbench.runner", "--problem", str(problem),
                           "--solution", str(solution), "--json", str(out), "--metrics", str(tmp_path / "m.csv"),
                           *QUICK], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, json.loads(out.read_text()), proc.stderr


def credited(result: dict) -> bool:
    """What fast_p counts: correct, not suspect, and faster."""
    return bool(result["correct"]) and not result["suspect"] and (result["speedup_vs_eager"] or 0) > 1.0


def test_a_slowed_clock_with_forged_timing_marks_is_not_credited(tmp_path: Path) -> None:
    rc, result, stderr = run_launcher(tmp_path, SLOW_CLOCK_AND_FORGED_MARKS)
    assert not credited(result), (result, stderr)
    assert rc != 0 and not (tmp_path / "m.csv").exists()
    assert result["suspect"] is True, result["reason"]


def test_a_wrong_model_that_patches_the_correctness_checks_is_incorrect(tmp_path: Path) -> None:
    rc, result, stderr = run_launcher(tmp_path, FORGED_CORRECTNESS)
    assert result["correct"] is not True and not credited(result), (result, stderr)
    assert rc != 0 and not (tmp_path / "m.csv").exists()
    assert "incorrect" in result["reason"]


def test_a_result_written_by_the_candidate_is_not_believed(tmp_path: Path) -> None:
    rc, result, stderr = run_launcher(tmp_path, FORGED_RESULT)
    assert result["correct"] is not True and not credited(result), (result, stderr)
    assert rc != 0 and not (tmp_path / "m.csv").exists()


def test_an_output_that_is_not_the_one_committed_is_refused(tmp_path: Path) -> None:
    rc, result, stderr = run_launcher(tmp_path, UNCOMMITTED_OUTPUT)
    assert not credited(result) and rc != 0, (result, stderr)
    assert "committed" in result["reason"]


def test_a_process_left_behind_cannot_rewrite_the_result(tmp_path: Path) -> None:
    rc, _, stderr = run_launcher(tmp_path, FORGED_AFTER_THE_LAUNCHER)
    time.sleep(1.5)  # time enough for a process left behind to write over the result
    result = json.loads((tmp_path / "result.json").read_text())
    assert result.get("reason") != "forged" and not credited(result), (result, stderr)
    assert rc != 0 and result["correct"] is False


def test_an_honest_solution_is_still_credited_with_the_launchers_figures(tmp_path: Path) -> None:
    rc, result, stderr = run_launcher(tmp_path, HONEST)
    assert rc == 0, stderr
    assert result["ok"] and result["correct"] and not result["suspect"]
    assert result["runtime_ms"] > 0 and result["eager_ms"] > 0
    assert 0.2 < result["speedup_vs_eager"] < 5


# A cheap call with a large output (128 MiB): the digest of each trial's output takes a long
# time, and a share of it was room to hide work. This candidate does 25 ms of "work" after its
# call said done, inside its own digest, as a GPU kernel launched asynchronously would finish
# during the digest's device-to-host copy.
BIG_OUTPUT = """import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, x):
        return x.expand(8192, 4096)


def get_inputs():
    return [torch.randn(1, 4096)]


def get_init_inputs():
    return []
"""

WORK_IN_THE_DIGEST = '''
import sys
import time
import torch.nn as nn

runner = sys.modules["looptree.gpu.kernelbench.runner"]
_digest = runner._output_digest


def _late_digest(header, leaves):
    time.sleep(0.025)  # the work the call did not wait for
    return _digest(header, leaves)


runner._output_digest = _late_digest


class ModelNew(nn.Module):
    def forward(self, x):
        return x.expand(8192, 4096)
'''

HONEST_BIG = """import torch.nn as nn


class ModelNew(nn.Module):
    def forward(self, x):
        return x.expand(2048, 4096)
"""


@pytest.mark.slow
def test_work_hidden_in_the_digest_window_is_suspect(tmp_path: Path) -> None:
    rc, result, stderr = run_launcher(tmp_path, WORK_IN_THE_DIGEST, problem_source=BIG_OUTPUT)
    assert rc != 0 and result["suspect"] is True, (result.get("reason"), result.get("outside"), stderr[-2000:])
    assert "outside its timed call" in result["reason"]


@pytest.mark.slow
def test_an_honest_solution_with_a_large_output_is_not_suspect(tmp_path: Path) -> None:
    # 32 MiB: the digest's time is the reference's to within its own spread (a longer window on
    # this shared 2-core machine is more exposed to other processes' load)
    rc, result, stderr = run_launcher(tmp_path, HONEST_BIG, problem_source=BIG_OUTPUT.replace("8192", "2048"))
    assert result["correct"] is True and not result["suspect"], (result.get("reason"), result.get("outside"))
    assert rc == 0, stderr[-2000:]


RESTARTED_PHASE = '''
import sys
import torch
import torch.nn as nn

prog = sys.modules["looptree.gpu.kernelbench.runner"]._PROGRESS
_phase = prog.phase
_aborted = []


def phase(name, event):
    if name == "time:candidate" and event.startswith("begin") and not _aborted:
        _aborted.append(name)  # begin, give up at once (a slow window), begin again with fresh spots
        _phase(name, event)
        _phase(name, "end")
    _phase(name, event)


prog.phase = phase


class ModelNew(nn.Module):
    def forward(self, A, B):
        return torch.mm(torch.mm(A, B).clamp_min_(0.0), B)
'''


def test_a_timed_phase_begun_again_is_a_protocol_failure(tmp_path: Path) -> None:
    rc, result, stderr = run_launcher(tmp_path, RESTARTED_PHASE)
    assert rc != 0 and not result["ok"] and result["correct"] is False, (result, stderr[-2000:])
    assert "begun again" in result["reason"]


def _record_patch(change: str) -> str:
    return f'''
import json
import sys
import torch
import torch.nn as nn

chan = sys.modules["looptree.gpu.kernelbench.runner"]._CHAN
_send = chan.send


def send(line):
    if line.startswith("X "):
        record = json.loads(line[2:])
        {change}
        line = "X " + json.dumps(record) if record != "deep" else "X " + "[" * 100000 + "]" * 100000
    _send(line)


chan.send = send


class ModelNew(nn.Module):
    def forward(self, A, B):
        return torch.mm(torch.mm(A, B).clamp_min_(0.0), B)
'''


@pytest.mark.parametrize("change", [
    'record["tampering"] = 5',
    'record["reason"] = {"x": 1}; record["ok"] = False',
    'record = "deep"',
])
def test_a_malformed_result_record_is_a_one_line_reason(tmp_path: Path, change: str) -> None:
    (tmp_path / "m.csv").write_text("planted\n")
    rc, result, stderr = run_launcher(tmp_path, _record_patch(change))
    assert rc == 1 and not result["ok"] and result["correct"] is False, (result, stderr[-2000:])
    assert ("malformed result record" in result["reason"] or "protocol" in result["reason"]), result["reason"]
    assert "Traceback" not in stderr and not (tmp_path / "m.csv").exists()


DIES_MID_OUTPUT = '''
import os
import sys
import time
import torch
import torch.nn as nn

runner = sys.modules["looptree.gpu.kernelbench.runner"]


def _send_output(fd, nonce, header, leaves):
    runner._write_all(fd, nonce.encode() + b"\\n" + header + b"\\n" + bytes(64))
    if os.fork() == 0:  # a helper keeps the judge's pipe open after this process dies
        time.sleep(120)
        os._exit(0)
    os._exit(0)


runner._send_output = _send_output


class ModelNew(nn.Module):
    def forward(self, A, B):
        return torch.mm(torch.mm(A, B).clamp_min_(0.0), B)
'''


def test_a_candidate_dying_mid_output_with_a_helper_holding_the_pipe_does_not_hang(tmp_path: Path) -> None:
    started = time.monotonic()
    rc, result, stderr = run_launcher(tmp_path, DIES_MID_OUTPUT, timeout=100)
    assert rc == 1 and not result["ok"] and result["correct"] is False, (result, stderr[-2000:])
    assert "holds the pipe" in result["reason"]
    assert time.monotonic() - started < 90


def test_the_judges_own_failure_is_not_the_candidates() -> None:
    from looptree.gpu.kernelbench import runner

    for verdict, oom, code in (("oom", True, runner.EXIT_OOM), ("error", False, runner.EXIT_PROBLEM)):
        session = runner._Session()
        assert runner._judge_failed(session, verdict, "the judge could not check the output (CUDA out of memory)")
        result = runner.BenchResult(problem="p", solution="s")
        result.correct = True
        runner._verdict(result, session, 0, None, [], 0.0, {}, runner.build_parser().parse_args(["--problem", "p"]))
        assert result.correct is None and result.oom is oom and result.exit_code == code, result
        assert not result.suspect and "incorrect" not in result.reason and not result.ok
