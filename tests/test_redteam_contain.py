"""Red team: hostile candidates that the other containment tests do not try, run for real.

Why these tests: every promise of the sandbox and the evaluator (engine/evaluation/) was tried
by code an agent could write: valid edits whose build, check or bench then misbehave. Each test
lays out a real project, git repository and linked worktree the way a run does
(`<project>/.looptree/runs/1/worktrees/1.1`), runs the hostile command through the real runner
inside bubblewrap (or the real Evaluator), and checks the promise from outside. The attacks
here each succeeded before their fix:

- the engine (outside the sandbox) followed a symlink the bench left as its metrics file and read
  the user's hidden file into the node's metrics, or blocked for ever on a FIFO left there;
- removing the old metrics file followed a folder the build had turned into a link and deleted
  the run's own `metrics.csv`;
- a link planted in one stage made the next stage's sandbox bind the run directory writable
  (through a relative `sandbox.writable` path): `events.jsonl` forged, `control.key` readable;
- a read-only file in a subfolder was replaced by renaming its folder aside;
- `RLIMIT_DATA` bounded each process alone: four children, or one shared mapping, took more than
  the memory limit; no cap on processes (a fork bomb), none on disk;
- a `usercustomize.py` written into the private HOME ran first in every later Python command.

The last test keeps attacks that failed as regressions: the environment of PID 1 and of the
shell's parent, the engine's PID, the terminal (TIOCSTI needs one), an abstract socket, `kill -1`
and hard links out of the worktree (refused across mounts).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from looptree.engine.core.config import validate_config
from looptree.engine.evaluation.evaluator import EvalOutcome, Evaluator
from looptree.engine.evaluation.procs import DEFAULT_PROCESSES, Limits, ProcResult, run_command, run_limits
from looptree.engine.evaluation.sandbox import (
    Sandbox,
    active_roots,
    command_env,
    find_bwrap,
    private_entries,
    register_roots,
    resolve_sandbox,
)

BWRAP, _WHY = find_bwrap()
if BWRAP is None:  # a declared dependency: its absence is a broken install
    raise RuntimeError(f"tests/test_redteam_contain.py needs bubblewrap: {_WHY}")

HIDDEN_ROWS = "iteration,score\n1,4242.5\n"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """A project with a hidden CSV and a read-only checker in a subfolder, and a run's worktree."""
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "a.py").write_text("x = 1\n")
    (project / "hidden.csv").write_text(HIDDEN_ROWS)
    (project / "tests" / "check.py").write_text("print('honest check')\n")
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "base")
    run_dir = project / ".looptree" / "runs" / "1"
    (run_dir / "nodes" / "1.1").mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("iteration,node,score\n1,1,1.0\n")
    (run_dir / "events.jsonl").write_text("")
    wt = run_dir / "worktrees" / "1.1"
    git(project, "worktree", "add", "-q", "--detach", str(wt), "HEAD")
    (wt / "hidden.csv").unlink()  # as AccessPolicy.drop_hidden leaves it
    return {"project": project, "run": run_dir, "wt": wt, "node": run_dir / "nodes" / "1.1"}


def sandbox_for(layout: dict[str, Path], **kw: Any) -> Sandbox:
    assert BWRAP is not None
    return Sandbox(bwrap=BWRAP, hide=(str(layout["project"]),), **kw)


def run(sandbox: Sandbox | None, command: str, cwd: Path, log: Path, *, limits: Limits | None = None,
        timeout: float = 60, protect: tuple[str, ...] = (), private: Path | None = None) -> ProcResult:
    return asyncio.run(run_command(command, cwd=cwd, env=command_env(os.environ), timeout=timeout, log_path=log,
                                   job_tag=f"lt-rt-{uuid.uuid4().hex[:8]}", limits=limits or Limits(),
                                   sandbox=sandbox, protect=protect, private_dir=private))


def output(result: ProcResult) -> str:
    lines = result.log_path.read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith(("### looptree 2", "$ ")))


def evaluate(layout: dict[str, Path], *, bench: str, build: str | None = None, check: str | None = None,
             metrics: str = "metrics.csv", sandbox: Sandbox | None = None) -> tuple[EvalOutcome, list[tuple[str, dict]]]:
    data: dict[str, Any] = {
        "project": {"goal": "g", "writable": ["a.py"], "readonly": ["tests/**"], "hidden": ["hidden.csv"]},
        "bench": {"command": bench, "metrics": metrics, "repeats": 1, "compare": "off", "timeout": 60}}
    if build:
        data["build"] = {"command": build}
    if check:
        data["check"] = {"command": check}
    evaluator = Evaluator(validate_config(data), sandbox=sandbox or sandbox_for(layout))
    events: list[tuple[str, dict]] = []
    outcome = asyncio.run(evaluator.evaluate(
        node_id="1.1", project_dir=layout["wt"], node_dir=layout["node"], run_dir=layout["run"],
        job_tag=f"lt-rt-{uuid.uuid4().hex[:8]}", emit=lambda kind, **fields: events.append((kind, fields))))
    return outcome, events


# --------------------------------------------------------------------------------------------
# The engine's own file access in the worktree


def test_a_metrics_symlink_never_makes_the_engine_read_outside_the_worktree(layout: dict[str, Path]) -> None:
    # Inside the sandbox the hidden file is masked; the engine outside is not, and used to follow the link.
    outcome, events = evaluate(layout, bench=f"ln -sf {layout['project'] / 'hidden.csv'} metrics.csv")
    assert not outcome.ok and outcome.stage == "metrics"
    assert "symlink" in (outcome.reason or "")
    assert outcome.aggregate is None
    assert not [e for e in events if e[0] == "metric_row"]  # 4242.5 never became a metric


def test_a_metrics_link_swapped_in_while_the_bench_runs_is_refused(layout: dict[str, Path]) -> None:
    # Honest rows first, then the file becomes a link to the hidden rows while the engine tails it.
    bench = ("printf 'iteration,score\\n1,1.0\\n' > metrics.csv; sleep 0.6; "
             f"ln -sf {layout['project'] / 'hidden.csv'} m2 && mv -f m2 metrics.csv; sleep 0.6")
    outcome, events = evaluate(layout, bench=bench)
    assert not outcome.ok and outcome.stage == "metrics", outcome
    assert all(e[1]["values"] != {"score": 4242.5} for e in events if e[0] == "metric_row")


def test_a_metrics_fifo_never_blocks_the_engine(layout: dict[str, Path]) -> None:
    # open() of a FIFO with no writer blocks: the event loop, and the whole run, would hang.
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(result=evaluate(layout, bench="mkfifo metrics.csv")),
                              daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the engine blocked opening a FIFO left as the metrics file"
    outcome, _ = box["result"]
    assert not outcome.ok and "FIFO" in (outcome.reason or "")


def test_removing_the_old_metrics_never_follows_a_linked_folder(layout: dict[str, Path]) -> None:
    outcome, _ = evaluate(layout, build=f"ln -sfn {layout['run']} out", bench="true", metrics="out/metrics.csv")
    assert (layout["run"] / "metrics.csv").exists(), "the run's metrics.csv was deleted through the link"
    assert not outcome.ok and "symlink" in (outcome.reason or "")


def test_an_honest_bench_in_a_subfolder_is_read_as_before(layout: dict[str, Path]) -> None:
    outcome, events = evaluate(layout, bench="mkdir -p out && printf 'iteration,score\\n1,2.0\\n2,3.0\\n' > out/m.csv",
                               metrics="out/m.csv")
    assert outcome.ok, outcome.reason
    assert outcome.aggregate is not None and outcome.aggregate.values == {"score": 2.5}
    assert len([e for e in events if e[0] == "metric_row"]) == 2


def test_other_columns_than_the_parents_fail_the_node_not_the_run(layout: dict[str, Path]) -> None:
    # Interleaved (the default): the verdict looked the candidate's lead column up in the parent's
    # rows; a KeyError there ended the whole run with a traceback.
    ref = layout["run"] / "worktrees" / "1.ref"
    git(layout["project"], "worktree", "add", "-q", "--detach", str(ref), "HEAD")
    (layout["wt"] / "cols.txt").write_text("forged (lower is better)")
    (ref / "cols.txt").write_text("score (lower is better)")
    config = validate_config({"project": {"goal": "g", "writable": ["a.py"]},
                              "bench": {"command": "printf \"iteration,$(cat cols.txt)\\n1,1.0\\n\" > metrics.csv",
                                        "repeats": 2, "compare": "interleaved", "timeout": 60}})
    outcome = asyncio.run(Evaluator(config, sandbox=sandbox_for(layout)).evaluate(
        node_id="1.1", project_dir=layout["wt"], node_dir=layout["node"], run_dir=layout["run"],
        job_tag=f"lt-rt-{uuid.uuid4().hex[:8]}", emit=lambda *a, **k: None, reference_dir=ref))
    assert not outcome.ok and outcome.stage == "metrics"
    assert "differ from the parent" in (outcome.reason or "")


def test_a_flood_of_rows_never_floods_the_event_log(layout: dict[str, Path]) -> None:
    flood = (f"{sys.executable} -c \"import os\nwith open(os.environ['LOOPTREE_METRICS'], 'w') as fh:\n"
             "    fh.write('iteration,score\\n')\n    fh.writelines(f'{i},1.5\\n' for i in range(1, 50001))\"")
    outcome, events = evaluate(layout, bench=flood)
    assert outcome.ok and outcome.aggregate is not None and outcome.aggregate.values == {"score": 1.5}
    assert len(outcome.rows[0]) == 50000  # every row counts
    live = [e for e in events if e[0] == "metric_row"]
    assert len(live) == 2000
    assert any(e[0] == "message" and "not shown live" in e[1]["text"] for e in events)


def test_a_readonly_file_swapped_by_renaming_its_folder_fails_the_stage(layout: dict[str, Path]) -> None:
    # tests/check.py is bound read-only, but its folder is not: rename it aside, put a look-alike in place.
    swap = "mv tests tests_old && mkdir tests && echo \"print('forged verdict: correct')\" > tests/check.py"
    outcome, _ = evaluate(layout, build=swap, check="python3 tests/check.py", bench="true")
    assert not outcome.ok and outcome.stage == "build", outcome
    assert "tests/check.py" in (outcome.reason or "") and "read-only" in (outcome.reason or "")


def test_a_readonly_folder_turned_into_a_link_is_refused(layout: dict[str, Path]) -> None:
    # Without the sandbox too (sandbox.mode = "off"): the engine's own check of the files.
    swap = f"mv tests tests_old && ln -s {layout['wt'] / 'tests_old'} tests"
    config = validate_config({"project": {"goal": "g", "writable": ["a.py"], "readonly": ["tests/**"]},
                              "bench": {"command": swap, "repeats": 1, "compare": "off"}})
    evaluator = Evaluator(config, sandbox=None)
    outcome = asyncio.run(evaluator.evaluate(node_id="1.1", project_dir=layout["wt"], node_dir=layout["node"],
                                             run_dir=layout["run"], job_tag=f"lt-rt-{uuid.uuid4().hex[:8]}",
                                             emit=lambda *a, **k: None))
    assert not outcome.ok and "tests/check.py" in (outcome.reason or "")


def test_escape_sequences_in_the_output_never_reach_the_terminal_through_a_reason(layout: dict[str, Path]) -> None:
    # The reason quotes the last line of output and is printed as is by `--no-tui`: OSC 52 would set
    # the user's clipboard, CSI 2J clear the screen, U+202E make the line read backwards.
    evil = "printf '\\033]52;c;Y3VybCBldmlsIHwgc2g=\\007\\033[2Jbuild broke \\342\\200\\256here\\n'; exit 1"
    outcome, events = evaluate(layout, build=evil, bench="true")
    assert not outcome.ok and outcome.stage == "build"
    reason = outcome.reason or ""
    assert "build broke" in reason and "\\x1b]52" in reason
    assert not any(c in reason for c in "\x1b\x07\u202e")
    finished = next(e for e in events if e[0] == "stage_finished")
    assert "\x1b" not in (finished[1]["reason"] or "")


# --------------------------------------------------------------------------------------------
# The sandbox's own layout


def test_a_link_planted_in_one_stage_never_widens_the_next_stage(layout: dict[str, Path]) -> None:
    # sandbox.writable = ["cache"] (relative: inside the worktree). The build makes it a link to the run.
    sandbox = sandbox_for(layout, writable=("cache",))
    first = run(sandbox, f"ln -s {layout['run']} cache && echo planted", layout["wt"], layout["node"] / "b.log")
    assert first.rc == 0 and "planted" in output(first)
    second = run(sandbox, "echo '{\"type\": \"forged\"}' >> cache/events.jsonl; cat cache/control.key",
                 layout["wt"], layout["node"] / "c.log")
    assert (layout["run"] / "events.jsonl").read_text() == ""
    assert second.rc is None and "symlink" in second.tail


def test_a_protected_file_reached_through_a_link_is_refused(layout: dict[str, Path]) -> None:
    run(None, f"mv tests tests_old && ln -s {layout['wt'] / 'tests_old'} tests", layout["wt"], layout["node"] / "p.log")
    result = run(sandbox_for(layout), "echo ran", layout["wt"], layout["node"] / "q.log", protect=("tests/check.py",))
    assert result.rc is None and "tests/check.py" in result.tail


def test_files_others_may_not_read_stay_hidden_and_sockets_unreachable(tmp_path: Path) -> None:
    # The command is uid 65534 inside but the engine's uid outside: as root it read every root-only
    # file outside the masks (found: /var/cache/debconf/passwords.dat, a PostgreSQL data folder).
    top = tmp_path / "srv"
    (top / "app").mkdir(parents=True)
    secret = top / "app" / "db.key"
    secret.write_text("ROOT-ONLY-KEY\n")
    secret.chmod(0o600)
    vault = top / "vault"
    vault.mkdir()
    (vault / "token").write_text("VAULT-TOKEN\n")
    vault.chmod(0o700)
    (top / "app" / "readme").write_text("PUBLIC-README\n")
    daemon = socket.socket(socket.AF_UNIX)
    daemon.bind(str(top / "app" / "daemon.sock"))  # a local daemon: no network namespace closes a path
    daemon.listen(1)
    try:
        entries = private_entries([str(top)], skip=())
        assert set(entries) == {str(secret), str(vault), str(top / "app" / "daemon.sock")}
        assert BWRAP is not None
        # /tmp left unmasked so that the test's folders are the host's; the policy under test is `private`.
        sandbox = Sandbox(bwrap=BWRAP, system_masks=(), private=entries)
        work = tmp_path / "work"
        work.mkdir()
        probe = (f"cat {secret}; cat {vault}/token; cat {top}/app/readme; {sys.executable} -c \"import socket; "
                 f"s = socket.socket(socket.AF_UNIX); s.connect('{top}/app/daemon.sock'); print('DAEMON-' + 'REACHED')\"")
        result = run(sandbox, probe, work, tmp_path / "p.log", private=tmp_path / "private")
    finally:
        daemon.close()
    text = output(result)
    assert "PUBLIC-README" in text
    assert "ROOT-ONLY-KEY" not in text and "VAULT-TOKEN" not in text and "DAEMON-REACHED" not in text


def test_another_running_projects_root_is_hidden(tmp_path: Path) -> None:
    # Two runs on one machine: the first one's hidden answers and run folder were readable by the
    # second one's candidates whenever the first project lived outside every home (/work, /scratch).
    other = tmp_path / "other-project"
    (other / ".looptree" / "runs" / "1").mkdir(parents=True)
    (other / "answers.txt").write_text("OTHER-PROJECT-ANSWERS\n")
    (other / ".looptree" / "runs" / "1" / "control.key").write_text("OTHER-RUN-KEY\n")
    work = tmp_path / "work"
    work.mkdir()
    assert BWRAP is not None
    sandbox = Sandbox(bwrap=BWRAP, system_masks=(), private=())  # /tmp unmasked: the registry is what hides
    probe = f"cat {other}/answers.txt {other}/.looptree/runs/1/control.key 2>&1; echo probed"
    unregister = register_roots([str(other)])
    try:
        inside = output(run(sandbox, probe, work, tmp_path / "a.log", private=tmp_path / "private"))
    finally:
        unregister()
    assert "probed" in inside and "OTHER-PROJECT-ANSWERS" not in inside and "OTHER-RUN-KEY" not in inside
    after = output(run(sandbox, probe, work, tmp_path / "b.log", private=tmp_path / "private"))
    assert "OTHER-PROJECT-ANSWERS" in after  # the mask came from the registry, and left with the run


def test_the_registry_trusts_only_live_runs_and_never_hides_the_system(tmp_path: Path) -> None:
    from looptree.gpu.devices.locks import lock_dir

    folder = lock_dir() / "projects"
    folder.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = folder / f"{dead.pid}-deadbeef.roots"
    stale.write_text(f"{tmp_path / 'stale'}\n")
    hostile = folder / f"{os.getpid()}-hostile.roots"
    hostile.write_text("/usr\n/\n/etc\nrelative/path\n")
    try:
        from looptree.engine.evaluation import sandbox as sandbox_module

        sandbox_module._registry_cache.clear()
        roots = active_roots()
        assert str(tmp_path / "stale") not in roots and not stale.exists()
        assert not {"/usr", "/", "/etc", "relative/path"} & set(roots)
    finally:
        hostile.unlink(missing_ok=True)
        stale.unlink(missing_ok=True)


def test_a_run_announces_its_project_while_its_containment_lives(tmp_path: Path) -> None:
    import gc

    from looptree.engine.evaluation import sandbox as sandbox_module

    project = tmp_path / "proj"
    project.mkdir()
    config = validate_config({"project": {"goal": "g", "writable": ["a.py"]}, "bench": {"command": "true"}})
    decision = resolve_sandbox(config, hide=[project])
    assert decision.sandbox is not None
    sandbox_module._registry_cache.clear()
    assert str(project.resolve()) in active_roots()
    del decision
    gc.collect()
    sandbox_module._registry_cache.clear()
    assert str(project.resolve()) not in active_roots()


# --------------------------------------------------------------------------------------------
# Resources


CHILDREN = f"""{sys.executable} -c "
import os, time
kids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(150 * 1024 * 1024)
        for j in range(0, len(block), 4096):
            block[j] = 1
        time.sleep(3)
        os._exit(0)
    kids.append(pid)
for k in kids:
    os.waitpid(k, 0)
print('all children ' + 'finished')
" """

SHARED = f"""{sys.executable} -c "
import mmap, time
m = mmap.mmap(-1, 600 * 1024 * 1024, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
for j in range(0, len(m), 4096):
    m[j] = 1
time.sleep(3)
print('shared mapping ' + 'finished')
" """


@pytest.mark.parametrize("hog", [CHILDREN, SHARED], ids=["four-children", "shared-mapping"])
def test_the_memory_limit_holds_for_the_whole_tree(layout: dict[str, Path], hog: str) -> None:
    # 600 MiB in all under a 256 MiB ceiling; RLIMIT_DATA alone let both through.
    result = run(sandbox_for(layout), hog, layout["wt"], layout["node"] / "m.log", limits=Limits(memory_mb=256))
    assert result.rc != 0 and " finished" not in output(result)
    assert "memory limit of 256 MiB" in result.note and "together" in result.note


def test_a_tree_within_the_memory_limit_runs(layout: dict[str, Path]) -> None:
    # Forked children share their parent's pages: counted once (PSS), not once per child.
    shared_parent = CHILDREN.replace("150 * 1024 * 1024", "8 * 1024 * 1024")
    result = run(sandbox_for(layout), shared_parent, layout["wt"], layout["node"] / "ok.log",
                 limits=Limits(memory_mb=256))
    assert result.rc == 0 and "all children finished" in output(result), output(result)


def test_a_fork_bomb_stops_at_the_process_cap(layout: dict[str, Path]) -> None:
    limits, _ = run_limits(validate_config({"project": {"goal": "g", "writable": ["a.py"]},
                                            "bench": {"command": "true"}}))
    assert limits.processes == DEFAULT_PROCESSES
    # Unbounded until stopped (a real bomb, minus the exponential part): the cap, not the timeout, ends it.
    script = "while true; do sleep 30 & done"
    result = run(sandbox_for(layout), script, layout["wt"], layout["node"] / "f.log",
                 limits=replace(limits, processes=200), timeout=30)
    assert not result.timed_out and result.rc != 0
    assert "more than 200 processes and threads" in result.note
    assert result.duration_s < 10


def test_a_thread_bomb_stops_at_the_same_cap(layout: dict[str, Path]) -> None:
    # Threads take PIDs too (32768 on this kind of kernel), and as root no RLIMIT_NPROC stops them.
    bomb = (f"{sys.executable} -c \"import threading, time\nwhile True:\n"
            "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\"")
    result = run(sandbox_for(layout), bomb, layout["wt"], layout["node"] / "t.log",
                 limits=Limits(processes=300), timeout=30)
    assert not result.timed_out and result.rc != 0
    assert "more than 300 processes and threads" in result.note


def test_filling_the_disk_is_stopped(layout: dict[str, Path]) -> None:
    free_mb = shutil.disk_usage(layout["wt"]).free // (1024 * 1024)
    limits = Limits(disk_free_mb=free_mb - 100)  # the floor sits 100 MiB under the free space now
    writer = f"{sys.executable} -c \"\nimport time\nwith open('big', 'wb') as fh:\n"
    writer += "    for i in range(60):\n        fh.write(b'x' * (8 << 20)); fh.flush(); time.sleep(0.02)\nprint('wrote it ' + 'all')\n\""
    result = run(sandbox_for(layout), writer, layout["wt"], layout["node"] / "d.log", limits=limits)
    assert result.rc != 0 and "wrote it all" not in output(result)
    assert "below" in result.note and "MiB free" in result.note
    small = run(sandbox_for(layout), "head -c 1048576 /dev/zero > small && echo fine", layout["wt"],
                layout["node"] / "s.log", limits=limits)
    assert small.rc == 0 and "fine" in output(small)


def test_using_up_the_inodes_is_stopped(layout: dict[str, Path]) -> None:
    # Empty files take no bytes: on ext4 a few million of them leave the disk unable to hold one more.
    free = os.statvfs(layout["wt"]).f_favail
    assert free > 20_000, "this file system has too few free inodes for the test"
    limits = Limits(disk_free_inodes=free - 5_000)
    touch = f"{sys.executable} -c \"import os\nos.mkdir('many')\nfor i in range(40000):\n    open(f'many/{{i}}', 'w').close()\nprint('made them ' + 'all')\""
    result = run(sandbox_for(layout), touch, layout["wt"], layout["node"] / "i.log", limits=limits)
    assert result.rc != 0 and "made them all" not in output(result)
    assert "free inodes" in result.note


# --------------------------------------------------------------------------------------------
# What survives from one stage to the next


def test_a_usercustomize_in_the_private_home_never_runs(layout: dict[str, Path]) -> None:
    # A Python outside any venv has a user site; the private HOME outlives the build.
    python = next((p for p in (os.path.join(sys.base_prefix, "bin", "python3"), "/usr/bin/python3")
                   if os.path.exists(p)), None)
    assert python is not None
    private = layout["node"] / "sandbox-candidate"
    plant = (f"d=$({python} -c 'import site; print(site.getusersitepackages())') && mkdir -p $d && "
             "echo 'print(\"HIJACKED \" + \"first\")' > $d/usercustomize.py && echo planted")
    env = command_env(os.environ)

    def stage(command: str, name: str) -> ProcResult:
        return asyncio.run(run_command(command, cwd=layout["wt"], env=env, timeout=60, log_path=layout["node"] / name,
                                       job_tag=f"lt-rt-{uuid.uuid4().hex[:8]}", sandbox=sandbox_for(layout),
                                       private_dir=private))

    assert "planted" in output(stage(plant, "u1.log"))
    second = stage(f"{python} -c 'print(\"bench \" + \"starts\")'", "u2.log")
    assert "bench starts" in output(second) and "HIJACKED first" not in output(second)


# --------------------------------------------------------------------------------------------
# Regressions: attacks that failed


def test_nothing_one_node_leaves_in_shm_tmp_or_its_home_reaches_the_next(layout: dict[str, Path]) -> None:
    sandbox = sandbox_for(layout)
    plant = ("echo poisoned > /dev/shm/cache.bin && echo poisoned > /tmp/cache.bin && mkdir -p ~/.cache/torch_extensions "
             "&& echo poisoned > ~/.cache/torch_extensions/op.so && echo planted")
    first = asyncio.run(run_command(plant, cwd=layout["wt"], env=command_env(os.environ), timeout=60,
                                    log_path=layout["node"] / "n1.log", job_tag=f"lt-rt-{uuid.uuid4().hex[:8]}",
                                    sandbox=sandbox, private_dir=layout["node"] / "sandbox-candidate"))
    assert "planted" in output(first)
    other = layout["run"] / "nodes" / "1.2"
    look = "cat /dev/shm/cache.bin /tmp/cache.bin ~/.cache/torch_extensions/op.so 2>&1; echo looked"
    second = asyncio.run(run_command(look, cwd=layout["wt"], env=command_env(os.environ), timeout=60,
                                     log_path=other / "n2.log", job_tag=f"lt-rt-{uuid.uuid4().hex[:8]}",
                                     sandbox=sandbox, private_dir=other / "sandbox-candidate"))
    assert "looked" in output(second) and "poisoned" not in output(second)


def test_the_engine_is_out_of_reach_from_proc_tty_and_sockets(layout: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPTREE_RT_SECRET_TOKEN", "sk-redteam-engine-secret")
    listener = socket.socket(socket.AF_UNIX)
    name = f"looptree-rt-{uuid.uuid4().hex[:8]}"
    listener.bind(b"\0" + name.encode())
    listener.listen(1)
    try:
        probe = (f"cat /proc/1/environ /proc/$PPID/environ | tr '\\0' '\\n'; ls /proc | grep -cE '^[0-9]+$'; "
                 # the shell holds its log as 1 and 2, /dev/null as 0, and nothing of the engine's
                 f"{sys.executable} -c \"import os; print('FDS', *sorted(os.listdir('/proc/%d/fd' % os.getppid())))\"; "
                 "exec 3</dev/tty && echo TTY-OPENED; "
                 f"{sys.executable} -c \"import socket; s = socket.socket(socket.AF_UNIX); "
                 f"s.connect(b'\\0{name}'); print('SOCKET-CONNECTED')\"; "
                 f"kill -9 -1; echo still-here {os.getpid()}; kill -0 {os.getpid()} && echo ENGINE-SIGNALLED; "
                 # a hard link would let the engine's later reads or removals reach a file outside
                 f"ln {layout['project'] / 'hidden.csv'} h1 || ln /etc/hostname h2 || ln tests/check.py h3 || true")
        result = run(sandbox_for(layout), probe, layout["wt"], layout["node"] / "r.log")
    finally:
        listener.close()
    text = output(result)
    assert "sk-redteam-engine-secret" not in text
    assert "TTY-OPENED" not in text and "SOCKET-CONNECTED" not in text and "ENGINE-SIGNALLED" not in text
    assert not any((layout["wt"] / name).exists() for name in ("h1", "h2", "h3"))
    fds = next(line.split()[1:] for line in text.splitlines() if line.startswith("FDS "))
    assert set(fds) <= {"0", "1", "2"}, fds
    count = int(next(line for line in text.splitlines() if line.strip().isdigit()))
    assert count < 10  # only the namespace's own processes are listed
