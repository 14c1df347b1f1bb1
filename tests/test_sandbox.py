"""The sandbox around project commands, tried with real contained processes.

Why these tests: the promises of engine/evaluation/sandbox.py (what a candidate's build, check and bench can
read, write, reach and leave behind) only hold if bubblewrap really enforces them on this kernel,
as root too (CI runs as root). Every test here starts real commands through `procs.run_command`
with the sandbox on, against a real git repository with a linked worktree laid out the way a
run lays it out (`<project>/.looptree/runs/1/worktrees/1.1`, its `.git` a file pointing into the
project's `.git/worktrees/`). The tree lives under pytest's tmp_path, which the default masks
hide wholesale (/tmp); the confinement tests also run with the system masks left out, so that
what they see is the project-root, home and worktree policy itself. The GPU bind list is checked
by construction with the fake telemetry backend (no GPU in CI).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from looptree.engine.core.config import validate_config
from looptree.engine.errors import ConfigError
from looptree.engine.evaluation.evaluator import Evaluator, _failure_reason
from looptree.engine.evaluation.procs import Limits, ProcResult, run_command, run_limits
from looptree.engine.evaluation.sandbox import (
    SANDBOX_UID,
    SYSTEM_MASKS,
    Sandbox,
    cgroup_v2_parent,
    command_env,
    describe_host,
    find_bwrap,
    gpu_device_nodes,
    interpreter_paths,
    memory_plan,
    resolve_sandbox,
)
from looptree.gpu.devices.telemetry import FakeBackend

BWRAP, _WHY = find_bwrap()
if BWRAP is None:  # the dependency is declared in pyproject.toml: its absence is a broken install
    raise RuntimeError(f"tests/test_sandbox.py needs bubblewrap: {_WHY}")


def config(**sections: Any):
    data: dict[str, Any] = {"project": {"goal": "g", "writable": ["a.py"]}, "bench": {"command": "true"}}
    data.update(sections)
    return validate_config(data)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A project with a secret, a fake HOME with ~/.ssh, and a run's linked worktree."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE-KEY-MATERIAL\n")
    monkeypatch.setenv("HOME", str(home))
    project = tmp_path / "project"
    project.mkdir()
    (project / "a.py").write_text("print('hi')\n")
    (project / "secret.txt").write_text("TOP-SECRET-PROJECT-FILE\n")
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "base")
    run_dir = project / ".looptree" / "runs" / "1"
    (run_dir / "nodes" / "1.1").mkdir(parents=True)
    (run_dir / "control.jsonl").write_text("")
    worktree = run_dir / "worktrees" / "1.1"
    git(project, "worktree", "add", "-q", "--detach", str(worktree), "HEAD")
    return {"home": home, "project": project, "run": run_dir, "wt": worktree, "node": run_dir / "nodes" / "1.1",
            "tmp": tmp_path}


def sandbox_for(layout: dict[str, Path], masks: tuple[str, ...] = SYSTEM_MASKS, **kw: Any) -> Sandbox:
    assert BWRAP is not None
    return Sandbox(bwrap=BWRAP, hide=(str(layout["project"]),), system_masks=masks, **kw)


def run(sandbox: Sandbox | None, command: str, cwd: Path, log: Path, *, env: dict[str, str] | None = None,
        timeout: float = 30, limits: Limits | None = None, private: Path | None = None) -> ProcResult:
    return asyncio.run(run_command(command, cwd=cwd, env=env if env is not None else command_env(os.environ),
                                   timeout=timeout, log_path=log, job_tag=f"lt-test-{uuid.uuid4().hex[:8]}",
                                   limits=limits or Limits(), sandbox=sandbox, private_dir=private))


def output(result: ProcResult) -> str:
    """What the command printed: the log without its header (which repeats the command line)."""
    lines = result.log_path.read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith(("### looptree 2", "$ ")))


BOTH_MASKS = pytest.mark.parametrize("masks", [SYSTEM_MASKS, ()], ids=["default-masks", "no-system-masks"])


@BOTH_MASKS
def test_writes_outside_the_worktree_fail(layout: dict[str, Path], masks: tuple[str, ...]) -> None:
    project, wt, run_dir, home = layout["project"], layout["wt"], layout["run"], layout["home"]
    targets = {
        "root": project / "planted.txt",
        "tracked": project / "a.py",
        "gitconfig": project / ".git" / "config",
        "ref": project / ".git" / "refs" / "heads" / "main",
        "hook": project / ".git" / "hooks" / "post-checkout",
        "wtgit": project / ".git" / "worktrees" / "1.1" / "HEAD",
        "run": run_dir / "control.jsonl",
        "home": home / "planted.txt",
        "hosttmp": layout["tmp"] / "planted.txt",
        "slash": Path("/planted-by-sandbox"),
        "dotgit": wt / ".git",
    }
    before = {k: p.read_bytes() if p.exists() else None for k, p in targets.items()}
    script = "".join(f"(echo X >> {p}) 2>/dev/null && echo WROTE-{k}; " for k, p in targets.items())
    script += "echo ok > inside.txt && echo WROTE-worktree"
    result = run(sandbox_for(layout, masks), script, wt, layout["node"] / "w.log", private=layout["node"] / "priv")
    text = output(result)
    assert "WROTE-worktree" in text and (wt / "inside.txt").read_text() == "ok\n"
    wrote = {line[6:] for line in text.splitlines() if line.startswith("WROTE-")} - {"worktree"}
    # With the default masks the whole test tree sits in the private /tmp: writes there land in
    # the command's own tmpfs and vanish with it (the host files are compared below).
    assert wrote <= ({"hosttmp", "home", "root", "tracked", "gitconfig", "ref", "hook", "wtgit", "run"}
                     if masks else set()), wrote
    after = {k: p.read_bytes() if p.exists() else None for k, p in targets.items()}
    assert after == before
    # The engine's git, outside, still finds the worktree's repository.
    assert git(wt, "rev-parse", "HEAD").strip() == git(project, "rev-parse", "HEAD").strip()


@BOTH_MASKS
def test_project_root_and_home_are_unreadable(layout: dict[str, Path], masks: tuple[str, ...]) -> None:
    project, home = layout["project"], layout["home"]
    script = (f"cat {project / 'secret.txt'}; cat {home / '.ssh' / 'id_rsa'}; cat {project / '.git' / 'config'}; "
              f"ls {project / '.git' / 'objects'}; cat a.py; echo HOME=$HOME")
    result = run(sandbox_for(layout, masks), script, layout["wt"], layout["node"] / "r.log",
                 private=layout["node"] / "priv")
    text = output(result)
    assert "TOP-SECRET-PROJECT-FILE" not in text and "PRIVATE-KEY-MATERIAL" not in text
    assert "[core]" not in text and "print('hi')" in text
    assert f"HOME={layout['node'] / 'priv' / 'home'}" in text


def test_home_and_project_are_masked_by_construction(layout: dict[str, Path]) -> None:
    masks = sandbox_for(layout, ()).masks()
    assert str(layout["home"]) in masks and str(layout["project"]) in masks


def test_private_tmp_is_private_and_capped(layout: dict[str, Path]) -> None:
    marker = layout["tmp"].parent / f"lt-sandbox-{uuid.uuid4().hex}"
    sandbox = sandbox_for(layout, tmp_size_mb=16)
    result = run(sandbox, f"touch {marker} && echo MADE; head -c 40000000 /dev/zero > /tmp/big; echo rc=$?",
                 layout["wt"], layout["node"] / "t.log")
    text = output(result)
    assert "MADE" in text and not marker.exists()  # written in the private /tmp, gone with it
    assert "rc=1" in text and "No space left on device" in text


def test_no_network_unless_allowed(layout: dict[str, Path]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    accepted: list[int] = []

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                accepted.append(1)
                conn.close()
            except OSError:
                continue

    stop = threading.Event()
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    probe = (f"{sys.executable} -c \"import socket; s=socket.socket(); s.settimeout(3); "
             f"s.connect(('127.0.0.1', {port})); print('CONNECTED')\"")
    try:
        closed = run(sandbox_for(layout), probe, layout["wt"], layout["node"] / "n.log")
        assert "CONNECTED" not in output(closed) and closed.rc != 0 and accepted == []
        opened = run(sandbox_for(layout, network=True), probe, layout["wt"], layout["node"] / "n2.log")
        assert "CONNECTED" in output(opened) and accepted == [1]  # the test can tell the difference
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_daemons_die_with_the_command(layout: dict[str, Path]) -> None:
    token = uuid.uuid4().hex
    sleeper = f"{sys.executable} -c 'import time; time.sleep(120)' {token}"
    double_fork = (f"{sys.executable} -c \"import os, subprocess; "
                   f"os.fork() == 0 and (os.setsid(), os.fork() == 0 and os.execvp('sh', "
                   f"['sh', '-c', 'sleep 120; echo {token}'])); os._exit(0)\"")
    script = f"setsid {sleeper} & env -i {sleeper} & nohup setsid env -i {sleeper} >/dev/null 2>&1 & {double_fork}; echo started"
    # The job tag is the uncontained runner's way of finding leftovers: take it away so only the
    # sandbox's PID namespace can explain their deaths.
    result = run(sandbox_for(layout), script, layout["wt"], layout["node"] / "d.log")
    assert result.rc == 0 and "started" in output(result)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        left = [p for p in psutil.process_iter(["cmdline"]) if token in " ".join(p.info["cmdline"] or [])]
        if not left:
            break
        time.sleep(0.05)
    assert left == []


def test_root_cannot_remount_or_write_slash(layout: dict[str, Path]) -> None:
    # The mount(8) tool refuses a non-root caller by itself: the raw system call is tried too.
    raw = (f"{sys.executable} -c \"import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
           f"rc = libc.mount(b'none', b'/', None, 32, None); "  # MS_REMOUNT, read-write
           f"print('RAW-MOUNT', rc, os.strerror(ctypes.get_errno()))\"")
    script = ("id -u; grep CapEff /proc/self/status; mount -o remount,rw / && echo REMOUNTED; "
              f"touch /sandbox-escape && echo WROTE-SLASH; mount -t tmpfs none /mnt && echo MOUNTED; {raw}; "
              "unshare -U -r true && echo NESTED-USERNS")
    result = run(sandbox_for(layout), script, layout["wt"], layout["node"] / "m.log")
    text = output(result)
    assert text.splitlines()[0] == str(SANDBOX_UID)
    assert "RAW-MOUNT -1 Operation not permitted" in text
    assert "CapEff:\t0000000000000000" in text
    assert "REMOUNTED" not in text and "WROTE-SLASH" not in text and "MOUNTED" not in text
    assert "NESTED-USERNS" not in text  # no user namespace inside to win capabilities back in
    assert not Path("/sandbox-escape").exists()


def test_environment_is_an_allow_list_without_secrets(layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_API_KEY", "sk-leak-1")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-leak-2")
    monkeypatch.setenv("db_password", "leak-3")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leak-4")
    monkeypatch.setenv("MY_LLM_PASS", "leak-5")  # no secret word: secret because api_key_env names it
    monkeypatch.setenv("LOOPTREE_RUN_DIR", str(layout["run"]))
    monkeypatch.setenv("UNLISTED_VARIABLE", "leak-6")
    monkeypatch.setenv("ASKED_FOR", "visible")
    monkeypatch.setenv("ASKED_TOKEN", "leak-7")  # asked for in sandbox.env: still never passed
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    cfg = config(agent={"api_key_env": "MY_LLM_PASS"}, sandbox={"env": ["ASKED_FOR", "ASKED_TOKEN"]})
    evaluator = Evaluator(cfg, sandbox=sandbox_for(layout))
    env = evaluator._env("1.1", layout["run"], layout["wt"] / "metrics.csv", {})
    result = run(evaluator.sandbox, "env", layout["wt"], layout["node"] / "e.log", env=env)
    text = output(result)
    assert "leak" not in text and str(layout["run"]) + "\n" not in text.replace("LOOPTREE_METRICS", "")
    assert "LOOPTREE_RUN_DIR" not in text
    assert "ASKED_FOR=visible" in text and "OMP_NUM_THREADS=3" in text and "PATH=" in text
    assert f"LOOPTREE_METRICS={layout['wt'] / 'metrics.csv'}" in text


def test_a_venv_under_the_masked_home_still_runs_python(layout: dict[str, Path]) -> None:
    venv = layout["home"] / ".venvs" / "proj"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    prefixes, dirs = interpreter_paths([str(venv), sys.base_prefix], f"{venv / 'bin'}:/usr/bin:/bin")
    sandbox = sandbox_for(layout, (), readable=prefixes, path_dirs=dirs)
    env = command_env(os.environ)
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    result = run(sandbox, "python -c 'import sys, json; print(\"PREFIX\", sys.prefix)'; ls ~/.ssh",
                 layout["wt"], layout["node"] / "v.log", env=env, private=layout["node"] / "priv")
    text = output(result)
    assert f"PREFIX {venv}" in text
    assert "id_rsa" not in text  # the venv is visible, the rest of the home is not


def test_memory_ceiling_stops_a_hog_with_a_clear_reason(layout: dict[str, Path]) -> None:
    limits = Limits(memory_mb=300)
    hog = f"{sys.executable} -c 'b = bytearray(800 * 1024 * 1024); print(\"ALLOCATED\")'"
    result = run(sandbox_for(layout), hog, layout["wt"], layout["node"] / "h.log", limits=limits)
    assert result.rc != 0 and "ALLOCATED" not in output(result)
    reason = _failure_reason("bench", "python hog.py", result, 60)
    assert "memory limit of 300 MiB" in reason, reason
    fine = run(sandbox_for(layout), f"{sys.executable} -c 'b = bytearray(50 * 1024 * 1024); print(\"OK\")'",
               layout["wt"], layout["node"] / "h2.log", limits=limits)
    assert fine.rc == 0 and fine.note == ""


def test_memory_plan_defaults_and_cgroup_detection(tmp_path: Path) -> None:
    plan = memory_plan(config())
    assert plan.limit_mb and plan.limit_mb > 0 and plan.mechanism in ("cgroup v2", "RLIMIT_DATA")
    assert memory_plan(config(bench={"command": "true", "memory_limit_mb": 0})).mechanism == "none"
    assert run_limits(config(bench={"command": "true", "memory_limit_mb": 512}))[0].memory_mb == 512
    # A delegated cgroup v2 folder, by construction: a fake /proc/self and cgroup file system.
    proc, cg = tmp_path / "proc", tmp_path / "cgroupfs"
    (cg / "user.slice" / "session.scope").mkdir(parents=True)
    for folder in (cg / "user.slice", cg / "user.slice" / "session.scope"):
        (folder / "cgroup.procs").write_text("")
    (cg / "user.slice" / "session.scope" / "cgroup.subtree_control").write_text("")
    (cg / "user.slice" / "cgroup.subtree_control").write_text("cpu memory pids\n")
    proc.mkdir()
    (proc / "cgroup").write_text("0::/user.slice/session.scope\n")
    (proc / "mountinfo").write_text(f"30 23 0:26 / {cg} rw,nosuid - cgroup2 cgroup2 rw\n")
    # Our own scope has no controllers to hand out; its parent slice has memory on: use the slice.
    assert cgroup_v2_parent(proc) == (str(cg / "user.slice"), "")
    (cg / "user.slice" / "session.scope" / "cgroup.subtree_control").write_text("memory\n")
    assert cgroup_v2_parent(proc) == (str(cg / "user.slice" / "session.scope"), "")
    for folder in (cg / "user.slice", cg / "user.slice" / "session.scope"):
        (folder / "cgroup.subtree_control").write_text("cpu pids\n")
    assert cgroup_v2_parent(proc)[0] is None
    # The limits then name the group folder; a command's group is made there (memory.max set).
    limits = Limits(memory_mb=64, cgroup_parent=str(cg / "user.slice"))
    from looptree.engine.evaluation.procs import _drop_cgroup, _make_cgroup

    group = _make_cgroup(limits, "lt-x:1.1:bench")
    assert group is not None and (group / "memory.max").read_text() == str(64 * 1024 * 1024)
    for leftover in group.iterdir():  # a real cgroup folder empties itself; the fake one does not
        leftover.unlink()
    _drop_cgroup(group)
    assert not group.exists()


def test_log_cap_keeps_head_and_tail(layout: dict[str, Path]) -> None:
    script = (f"{sys.executable} -c \"import sys; w = sys.stdout.write; w('HEAD-MARK\\n'); "
              f"[w('x' * 99 + '\\n') for _ in range(200000)]; w('TAIL-MARK\\n')\"")
    cap = 64 * 1024
    result = run(sandbox_for(layout), script, layout["wt"], layout["node"] / "bench.log",
                 limits=Limits(log_bytes=cap))
    text = output(result)
    assert result.rc == 0 and result.cut_bytes > 19_000_000
    assert "HEAD-MARK" in text and "TAIL-MARK" in text and "TAIL-MARK" in result.tail
    assert f"{result.cut_bytes} bytes of output cut" in text
    assert result.log_path.stat().st_size < cap + 2048


def test_gpu_bind_list_by_construction(tmp_path: Path, layout: dict[str, Path]) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidia3", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
        (dev / name).write_text("")
    # CUDA/NVML index 0 is the card whose device node is /dev/nvidia3, index 1 is /dev/nvidia1.
    fake = FakeBackend([{"name": "Fake A", "minor_number": 3}, {"name": "Fake B", "minor_number": 1}])
    assert gpu_device_nodes(fake, 0, dev) == [str(dev / n) for n in ("nvidia3", "nvidiactl", "nvidia-uvm",
                                                                      "nvidia-uvm-tools")]
    assert gpu_device_nodes(fake, None, dev) == []
    assert gpu_device_nodes(FakeBackend([{"name": "no minor known"}]), 0, dev) == []  # fake driver: no number
    decision = resolve_sandbox(config(), telemetry=fake, devices=[0, 1], dev=dev)
    assert decision.sandbox is not None
    argv, env = decision.sandbox.wrap(["true"], cwd=layout["wt"], env={"CUDA_VISIBLE_DEVICES": "1"}, device=1)
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--dev-bind-try"]
    assert str(dev / "nvidia1") in binds and str(dev / "nvidiactl") in binds
    assert all("nvidia3" not in b and "nvidia0" not in b for b in binds)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-fake-0001"  # the held card by UUID, not by CUDA index
    cpu_argv, cpu_env = decision.sandbox.wrap(["true"], cwd=layout["wt"], env={"CUDA_VISIBLE_DEVICES": ""})
    assert "--dev-bind-try" not in cpu_argv and cpu_env["CUDA_VISIBLE_DEVICES"] == ""


def test_modes_auto_on_off() -> None:
    off = resolve_sandbox(config(sandbox={"mode": "off"}))
    assert off.sandbox is None and off.record == {"mechanism": "off", "reason": 'sandbox.mode = "off"'}
    assert off.line and "not sandboxed" in off.line
    # A bwrap that cannot contain anything (/bin/false): "auto" runs uncontained and says why ...
    auto = resolve_sandbox(config(), bwrap="/bin/false")
    assert auto.sandbox is None and auto.record["mechanism"] == "off" and "bwrap failed" in auto.record["reason"]
    assert auto.line and auto.line.startswith("not sandboxed: ")
    # ... "on" refuses to start, in one line.
    with pytest.raises(ConfigError, match='sandbox.mode = "on" but commands cannot be contained here'):
        resolve_sandbox(config(sandbox={"mode": "on"}), bwrap="/bin/false")
    on = resolve_sandbox(config(sandbox={"mode": "on"}))
    assert on.sandbox is not None and on.record["mechanism"] == "bubblewrap" and on.line is None


def test_describe_host_rows() -> None:
    rows = describe_host(config())
    labels = [label for label, _, _ in rows]
    assert labels == ["sandbox binary", "sandbox", "memory limit"]
    assert all(isinstance(value, str) and "\n" not in value for _, value, _ in rows)
    assert rows[1][2] is True and "bubblewrap" in rows[1][1]
    off = describe_host(config(sandbox={"mode": "off"}))
    assert off[1][2] is False and "off" in off[1][1]


def test_unsandboxed_runner_is_unchanged(layout: dict[str, Path]) -> None:
    """Mode "off" keeps the old runner: the command sees the host as it is (the opt-out is real)."""
    result = run(None, f"cat {layout['project'] / 'secret.txt'}", layout["wt"], layout["node"] / "o.log")
    assert "TOP-SECRET-PROJECT-FILE" in output(result)


@pytest.mark.slow
def test_sample_project_builds_checks_and_benches_inside_the_sandbox(tmp_path: Path) -> None:
    sample = Path(__file__).resolve().parents[1] / "sample_projects" / "hotloop"
    project = tmp_path / "hotloop"
    shutil.copytree(sample, project, ignore=shutil.ignore_patterns(".looptree", "__pycache__", "metrics.csv"))
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "base")
    run_dir = project / ".looptree" / "runs" / "1"
    wt = run_dir / "worktrees" / "1"
    git(project, "worktree", "add", "-q", "--detach", str(wt), "HEAD")
    cfg = config(build={"command": "python -m py_compile solver.py"}, check={"command": "python check.py"},
                 bench={"command": "python bench.py", "repeats": 1})
    decision = resolve_sandbox(cfg, hide=[project])
    assert decision.sandbox is not None
    events: list[tuple[str, dict[str, Any]]] = []
    outcome = asyncio.run(Evaluator(cfg, run_limits(cfg)[0], sandbox=decision.sandbox).evaluate(
        node_id="1", project_dir=wt, node_dir=run_dir / "nodes" / "1", run_dir=run_dir, job_tag="lt-test-sample",
        emit=lambda kind, **f: events.append((kind, f))))
    assert outcome.ok, (outcome.stage, outcome.reason, outcome.log_tail)
    assert "sandbox=bubblewrap" in (run_dir / "nodes" / "1" / "bench.log").read_text()


def test_tree_and_dashboard_header_say_not_sandboxed() -> None:
    from looptree.app.labels import header_text
    from looptree.app.model import RunView
    from looptree.engine.run.report import render_tree

    def view_of(record: dict[str, Any] | None) -> RunView:
        view = RunView()
        event = {"seq": 0, "ts": 1.0, "type": "run_started", "run": 1, "project": "/p", "config": {}}
        if record is not None:
            event["sandbox"] = record
        view.apply(event)
        # The state fold keeps `run_started.sandbox` (engine/core/state.py); set here as the fold would.
        view.state.sandbox = record  # type: ignore[attr-defined]
        return view

    off = view_of({"mechanism": "off", "reason": "bwrap failed: no user namespaces"})
    assert "not sandboxed: bwrap failed: no user namespaces" in render_tree(off.state)
    assert "not sandboxed" in header_text(off, now=2.0, engine_alive=True).plain
    on = view_of({"mechanism": "bubblewrap", "version": "0.11.0"})
    assert "sandboxed" not in render_tree(on.state) and "sandboxed" not in header_text(on, now=2.0, engine_alive=True).plain


@pytest.mark.parametrize("mode", ["auto", "off"])
async def test_run_started_records_the_containment_applied(tmp_path: Path, mode: str) -> None:
    from looptree.engine.core.events import read_events
    from looptree.engine.run.engine import Engine

    project = tmp_path / "proj"
    project.mkdir()
    (project / "a.py").write_text("x = 1\n")
    (project / "cassette.jsonl").write_text("")
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "base")
    cfg = config(agent={"cassette": "cassette.jsonl"}, sandbox={"mode": mode},
                 bench={"command": "true", "memory_limit_mb": 1024})
    engine = await Engine.create(project, cfg)
    try:
        events = list(read_events(engine.run_dir / "events.jsonl"))
    finally:
        engine.log.close()
        engine.lock.release()
    started = events[0]
    assert started["type"] == "run_started"
    assert started["memory"]["limit_mb"] == 1024 and started["memory"]["mechanism"] in ("cgroup v2", "RLIMIT_DATA")
    messages = [e["text"] for e in events if e["type"] == "message"]
    if mode == "off":
        assert started["sandbox"] == {"mechanism": "off", "reason": 'sandbox.mode = "off"'}
        assert len(messages) == 1 and messages[0].startswith("not sandboxed: ")
        assert engine.evaluator.sandbox is None
    else:
        assert started["sandbox"]["mechanism"] == "bubblewrap" and started["sandbox"]["network"] is False
        assert messages == [] and engine.evaluator.sandbox is not None


def test_readonly_and_hidden_files_stay_read_only_inside_the_worktree(layout: dict[str, Path]) -> None:
    wt = layout["wt"]
    (wt / "bench.py").write_text("open('metrics.csv', 'w').write('iteration,t (lower is better)\\n0,1.0\\n')\n")
    (wt / "hidden").mkdir()
    (wt / "hidden" / "answers.txt").write_text("42\n")
    cfg = config(project={"goal": "g", "writable": ["a.py"], "readonly": ["bench.py"], "hidden": ["hidden/**"],
                          "hidden_needed": ["hidden/answers.txt"]},
                 bench={"command": "echo hacked >> bench.py; echo 0 > hidden/answers.txt; echo ok >> a.py; "
                                   f"{sys.executable} bench.py", "repeats": 1, "compare": "off"})
    evaluator = Evaluator(cfg, sandbox=sandbox_for(layout))
    outcome = asyncio.run(evaluator.evaluate(node_id="1.1", project_dir=wt, node_dir=layout["node"],
                                             run_dir=layout["run"], job_tag="lt-test-ro", emit=lambda *a, **k: None))
    assert outcome.ok, outcome.reason
    assert "hacked" not in (wt / "bench.py").read_text() and (wt / "hidden" / "answers.txt").read_text() == "42\n"
    assert (wt / "a.py").read_text().endswith("ok\n")  # the writable file is still writable
    assert "Read-only file system" in (layout["node"] / "bench.log").read_text()


def test_a_command_run_in_the_masked_project_itself_can_write_there(tmp_path: Path) -> None:
    """`kernelbench --eval-only` runs in its task project, which is also the folder hidden from others."""
    assert BWRAP is not None
    project = tmp_path / "task"
    project.mkdir()
    (project / ".git").mkdir()
    (project / ".git" / "config").write_text("[core]\n")
    sandbox = Sandbox(bwrap=BWRAP, hide=(str(project),), system_masks=())
    result = run(sandbox, "echo data > out.json && echo WROTE; echo x >> .git/config || echo GIT-RO", project,
                 tmp_path / "k.log", private=tmp_path / "priv")
    text = output(result)
    assert "WROTE" in text and (project / "out.json").read_text() == "data\n"
    assert "GIT-RO" in text and (project / ".git" / "config").read_text() == "[core]\n"
