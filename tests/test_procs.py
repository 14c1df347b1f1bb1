"""The subprocess runner: exit codes, timeouts and whole-tree kills, rlimits, logs, ticks.

Every check is made on real processes (psutil), never on mocks. PID 1 in some containers never
reaps orphans, so a killed orphan may linger as a zombie: a zombie counts as gone.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from looptree.engine.evaluation.procs import (
    JOB_ENV,
    Limits,
    ProcResult,
    find_job_pids,
    kill_job,
    kill_jobs_with_prefix,
    run_command,
)

PY = shlex.quote(sys.executable)
ROOT = Path(__file__).resolve().parents[1]


def _tag() -> str:
    return f"test-procs-{uuid.uuid4().hex[:10]}"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return _gone(pid)


def _read_pid(path: Path) -> int:
    text = path.read_text().strip()
    assert text, f"{path} is empty"
    return int(text)


async def _wait_file(path: Path, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.02)


@pytest.fixture
def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != JOB_ENV}


async def _run(tmp_path: Path, env: dict[str, str], command: str, **kw: object) -> ProcResult:
    kw.setdefault("timeout", 10.0)
    kw.setdefault("job_tag", _tag())
    return await run_command(
        command, cwd=tmp_path, env=env, log_path=tmp_path / "logs" / "run.log", **kw  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------- basics


async def test_normal_exit_and_log_header_footer(tmp_path: Path, env: dict[str, str]) -> None:
    res = await _run(tmp_path, env, "echo out; echo err >&2")
    assert (res.rc, res.timed_out, res.cancelled, res.ok) == (0, False, False, True)
    assert res.tail == "out\nerr\n"
    assert res.log_path == tmp_path / "logs" / "run.log"
    lines = res.log_path.read_text().splitlines()
    assert lines[0].startswith("### looptree ") and f"cwd={tmp_path}" in lines[0]
    assert lines[1] == "$ echo out; echo err >&2"
    assert lines[2:4] == ["out", "err"]
    assert lines[4].startswith("### looptree exited rc=0 duration=")
    assert 0 <= res.duration_s < 5


async def test_nonzero_rc_and_log_appends(tmp_path: Path, env: dict[str, str]) -> None:
    first = await _run(tmp_path, env, "echo one")
    res = await _run(tmp_path, env, "printf 'no newline'; exit 7")
    assert (res.rc, res.ok, res.timed_out) == (7, False, False)
    assert res.tail == "no newline"
    text = res.log_path.read_text()
    assert text.count("### looptree exited") == 2  # one log, two runs
    assert "one\n" in text
    assert re.search(r"\nno newline\n### looptree exited rc=7 duration=\d+\.\d{3}s\n\Z", text)
    assert first.rc == 0


async def test_env_is_given_env_plus_tag(tmp_path: Path, env: dict[str, str]) -> None:
    tag = _tag()
    env = dict(env, LT_TEST_VAR="hello")
    os.environ["LT_TEST_NOT_PASSED"] = "leak"
    try:
        res = await _run(
            tmp_path, {k: v for k, v in env.items() if k != "LT_TEST_NOT_PASSED"},
            'echo "$LOOPTREE_JOB|$LT_TEST_VAR|${LT_TEST_NOT_PASSED:-unset}"', job_tag=tag,
        )
    finally:
        del os.environ["LT_TEST_NOT_PASSED"]
    assert res.tail == f"{tag}|hello|unset\n"


async def test_cwd_missing_gives_rc_none(tmp_path: Path, env: dict[str, str]) -> None:
    res = await run_command(
        "true", cwd=tmp_path / "nope", env=env, timeout=5, log_path=tmp_path / "l.log",
        job_tag=_tag(),
    )
    assert res.rc is None and not res.ok
    assert "could not start the command" in res.tail and "nope" in res.tail
    assert "failed to start rc=None" in (tmp_path / "l.log").read_text()


async def test_rlimits_applied(tmp_path: Path, env: dict[str, str]) -> None:
    res = await _run(tmp_path, env, "ulimit -n; ulimit -Hn", limits=Limits(open_files=123))
    assert res.tail == "123\n123\n"


async def test_core_dumps_off_unless_asked(tmp_path: Path, env: dict[str, str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if hard == 0:
        pytest.skip("core dumps are hard-limited to 0 here")
    want = 32768 if hard == resource.RLIM_INFINITY else min(hard, 32768)
    resource.setrlimit(resource.RLIMIT_CORE, (want, hard))  # so "0" can only come from Limits
    try:
        off = await _run(tmp_path, env, "ulimit -c")
        on = await _run(tmp_path, env, "ulimit -c", limits=Limits(core_dump=True))
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    assert off.tail == "0\n"
    assert on.tail == f"{want // 512}\n"  # ulimit -c counts 512-byte blocks


async def test_address_space_limit(tmp_path: Path, env: dict[str, str]) -> None:
    cmd = f"{PY} -c 'b = bytearray(2 * 1024**3)' 2>&1 | tail -1"
    res = await _run(tmp_path, env, cmd, limits=Limits(address_space_mb=512))
    assert res.tail.strip() == "MemoryError"


@pytest.mark.slow
async def test_cpu_limit_kills_a_spinner(tmp_path: Path, env: dict[str, str]) -> None:
    res = await _run(tmp_path, env, f"exec {PY} -c 'while True: pass'", timeout=20,
                     limits=Limits(cpu_seconds=1))
    assert res.rc in (-signal.SIGXCPU, -signal.SIGKILL)
    assert not res.timed_out


async def test_chatty_output_does_not_deadlock(tmp_path: Path, env: dict[str, str]) -> None:
    script = "import sys\nfor i in range(4000):\n    sys.stdout.write('x' * 1000 + '\\n'); " \
             "sys.stderr.write('e' * 100 + '\\n')\nprint('END')\n"
    (tmp_path / "chatty.py").write_text(script)
    res = await _run(tmp_path, env, f"{PY} chatty.py", timeout=20)
    assert res.rc == 0
    assert res.log_path.stat().st_size > 4_000_000
    assert res.tail.endswith("END\n")
    assert len(res.tail.encode()) <= 4096
    assert res.tail.split("\n")[0] in ("x" * 1000, "e" * 100)  # whole lines only


async def test_on_tick_called_while_running(tmp_path: Path, env: dict[str, str]) -> None:
    ticks: list[float] = []

    async def tick() -> None:
        ticks.append(time.monotonic())

    res = await _run(tmp_path, env, "sleep 0.4", on_tick=tick, tick_interval=0.05)
    assert res.rc == 0
    assert 3 <= len(ticks) <= 10


# ---------------------------------------------------------------------------- killing trees


async def test_timeout_kills_sleep_tree(tmp_path: Path, env: dict[str, str]) -> None:
    tag = _tag()
    t0 = time.monotonic()
    res = await _run(tmp_path, env, "sleep 30 & sleep 30 & echo $! > bg.pid; sleep 30",
                     timeout=0.5, job_tag=tag)
    elapsed = time.monotonic() - t0
    assert res.timed_out and not res.ok and not res.cancelled
    assert res.rc is not None and res.rc < 0
    assert elapsed < 2.0
    assert _wait_gone(_read_pid(tmp_path / "bg.pid"))
    assert find_job_pids(tag) == []
    assert "### looptree timed out" in res.log_path.read_text()


TERM_HANDLER = textwrap.dedent(
    """
    import signal, sys, time
    def bye(*_):
        open("bye.txt", "w").write("clean exit")
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    open("ready.txt", "w").write("1")
    time.sleep(60)
    """
)


async def test_timeout_gives_term_grace_then_kills(tmp_path: Path, env: dict[str, str]) -> None:
    """SIGTERM first (a bench may clean up), SIGKILL for whoever ignores it, within ~0.5 s."""
    (tmp_path / "handler.py").write_text(TERM_HANDLER)
    tag = _tag()
    cmd = f"{PY} handler.py & (trap '' TERM; sleep 30 & echo $! > stubborn.pid; wait) & wait"
    t0 = time.monotonic()
    res = await _run(tmp_path, env, cmd, timeout=1.0, job_tag=tag)
    elapsed = time.monotonic() - t0
    assert res.timed_out
    assert (tmp_path / "ready.txt").exists(), "the handler did not start in time"
    assert (tmp_path / "bye.txt").read_text() == "clean exit"
    assert _wait_gone(_read_pid(tmp_path / "stubborn.pid"))
    assert 1.0 <= elapsed < 2.5
    assert find_job_pids(tag) == []


DAEMON = textwrap.dedent(
    """
    import os, sys, time
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    with open(sys.argv[1] + '.tmp', 'w') as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + '.tmp', sys.argv[1])
    time.sleep(60)
    """
)


async def test_timeout_kills_setsid_grandchild_and_daemon(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Escapees from the process group (setsid, double fork) are found by their job tag."""
    (tmp_path / "daemon.py").write_text(DAEMON)
    tag = _tag()
    code = (
        "import os,time; os.setsid(); "
        "open('gc.txt','w').write(f'{os.getpid()} {os.getsid(0)}'); time.sleep(60)"
    )
    cmd = f'{PY} -c "{code}" & {PY} daemon.py d.pid; sleep 60'
    res = await _run(tmp_path, env, cmd, timeout=1.0, job_tag=tag)
    assert res.timed_out
    pid, sid = map(int, (tmp_path / "gc.txt").read_text().split())
    assert sid == pid  # it really left the command's session (and process group)
    daemon = _read_pid(tmp_path / "d.pid")
    assert _wait_gone(pid)
    assert _wait_gone(daemon)
    assert find_job_pids(tag) == []


async def test_normal_exit_sweeps_daemon_leftover(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "daemon.py").write_text(DAEMON)
    tag = _tag()
    cmd = f"{PY} daemon.py d.pid; while [ ! -s d.pid ]; do sleep 0.01; done; echo started"
    res = await _run(tmp_path, env, cmd, timeout=10, job_tag=tag)
    assert (res.rc, res.timed_out, res.tail) == (0, False, "started\n")
    assert _wait_gone(_read_pid(tmp_path / "d.pid"))
    assert find_job_pids(tag) == []


async def test_cancellation_kills_tree_and_reraises(tmp_path: Path, env: dict[str, str]) -> None:
    tag = _tag()
    task = asyncio.create_task(
        _run(tmp_path, env, "sleep 60 & echo $! > bg.pid; sleep 60", timeout=30, job_tag=tag)
    )
    await _wait_file(tmp_path / "bg.pid")
    bg = _read_pid(tmp_path / "bg.pid")
    assert not _gone(bg)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert _wait_gone(bg)
    assert find_job_pids(tag) == []
    assert "### looptree cancelled" in (tmp_path / "logs" / "run.log").read_text()


async def test_on_tick_error_kills_and_propagates(tmp_path: Path, env: dict[str, str]) -> None:
    tag = _tag()
    calls = 0

    async def tick() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("tail broke")

    with pytest.raises(RuntimeError, match="tail broke"):
        await _run(tmp_path, env, "sleep 30 & sleep 30", timeout=20, job_tag=tag,
                   on_tick=tick, tick_interval=0.05)
    assert find_job_pids(tag) == []
    assert "### looptree aborted" in (tmp_path / "logs" / "run.log").read_text()


async def test_slow_on_tick_counts_as_timeout(tmp_path: Path, env: dict[str, str]) -> None:
    async def tick() -> None:
        await asyncio.sleep(30)

    t0 = time.monotonic()
    res = await _run(tmp_path, env, "sleep 30", timeout=0.5, on_tick=tick, tick_interval=0.05)
    assert res.timed_out and time.monotonic() - t0 < 2.5


async def test_kill_job_while_running_reports_cancelled(
    tmp_path: Path, env: dict[str, str]
) -> None:
    tag = _tag()
    task = asyncio.create_task(_run(tmp_path, env, "echo go > go; sleep 60", job_tag=tag))
    await _wait_file(tmp_path / "go")
    killed = await asyncio.to_thread(kill_job, tag)
    assert killed >= 2  # the shell and its sleep
    res = await asyncio.wait_for(task, 5)
    assert res.cancelled and not res.timed_out and res.rc == -signal.SIGKILL
    assert "killed on request" in res.log_path.read_text()


# ---------------------------------------------------------------------------- orphans / resume


def test_kill_jobs_with_prefix_finds_orphans(env: dict[str, str]) -> None:
    prefix = _tag() + "/"
    orphans = [
        subprocess.Popen(["sleep", "60"], env=dict(env, **{JOB_ENV: prefix + str(i)}),
                         start_new_session=True)
        for i in range(2)
    ]
    other = subprocess.Popen(["sleep", "60"], env=dict(env, **{JOB_ENV: _tag()}),
                             start_new_session=True)
    try:
        assert sorted(find_job_pids(prefix, prefix=True)) == sorted(p.pid for p in orphans)
        assert find_job_pids(prefix + "0") == [orphans[0].pid]
        assert find_job_pids(prefix) == []  # exact match needs the whole tag
        assert kill_jobs_with_prefix(prefix) == 2
        for p in orphans:
            assert p.wait(5) == -signal.SIGKILL
        assert other.poll() is None  # another job's process is untouched
    finally:
        for p in [*orphans, other]:
            p.kill()
            p.wait(5)


def test_empty_tag_refused() -> None:
    with pytest.raises(ValueError):
        find_job_pids("")
    with pytest.raises(ValueError):
        kill_jobs_with_prefix("")


ENGINE = textwrap.dedent(
    """
    import asyncio, os, sys
    sys.path.insert(0, sys.argv[1])
    from looptree.engine.evaluation.procs import run_command
    from pathlib import Path
    asyncio.run(run_command("sleep 60; true", cwd=Path.cwd(), env=dict(os.environ), timeout=60,
                            log_path=Path("engine.log"), job_tag=sys.argv[2]))
    """
)


def test_shell_dies_with_the_engine(tmp_path: Path, env: dict[str, str]) -> None:
    """PR_SET_PDEATHSIG: SIGKILL the engine and its shell goes too."""
    tag = _tag()
    (tmp_path / "engine_main.py").write_text(ENGINE)
    engine = subprocess.Popen([sys.executable, "engine_main.py", str(ROOT), tag], cwd=tmp_path,
                              env=env)
    try:
        deadline = time.monotonic() + 10
        shell = None
        while shell is None:
            assert time.monotonic() < deadline, "the engine never started its command"
            shell = next((p for p in find_job_pids(tag) if os.getsid(p) == p), None)
            time.sleep(0.02)
        engine.kill()
        engine.wait(5)
        assert _wait_gone(shell)
    finally:
        engine.kill()
        kill_job(tag)


# ---------------------------------------------------------------------------- sandbox and caps


def _sandbox(tmp_path: Path):
    from looptree.engine.evaluation.sandbox import Sandbox, find_bwrap

    bwrap, why = find_bwrap()
    assert bwrap is not None, why
    return Sandbox(bwrap=bwrap, hide=(str(tmp_path),))


async def test_sandboxed_timeout_kills_the_whole_namespace(tmp_path: Path, env: dict[str, str]) -> None:
    token = uuid.uuid4().hex
    sleeper = f"{sys.executable} -c 'import time; time.sleep(60)' {token}"
    command = f"env -i {sleeper} & setsid {sleeper} & exec {sleeper}"
    res = await _run(tmp_path, env, command, timeout=0.5, sandbox=_sandbox(tmp_path))
    assert res.timed_out and not res.ok and res.duration_s < 3
    await asyncio.sleep(0.2)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if token in " ".join(p.info["cmdline"] or [])]
    assert left == []


async def test_sandboxed_rc_and_signal_pass_through(tmp_path: Path, env: dict[str, str]) -> None:
    sandbox = _sandbox(tmp_path)
    assert (await _run(tmp_path, env, "exit 7", sandbox=sandbox)).rc == 7
    res = await _run(tmp_path, env, "kill -SEGV $$", sandbox=sandbox)
    assert res.rc in (-signal.SIGSEGV, 128 + signal.SIGSEGV)  # bwrap reports a signalled child as 128+N
    assert "sandbox=bubblewrap" in (tmp_path / "logs" / "run.log").read_text()


async def test_sandboxed_cancellation_kills_and_reraises(tmp_path: Path, env: dict[str, str]) -> None:
    token = uuid.uuid4().hex
    task = asyncio.ensure_future(_run(tmp_path, env, f"{sys.executable} -c 'import time; time.sleep(60)' {token}",
                                      timeout=30, sandbox=_sandbox(tmp_path)))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert [p for p in psutil.process_iter(["cmdline"]) if token in " ".join(p.info["cmdline"] or [])] == []


async def test_log_cap_frees_disk_while_the_command_runs(tmp_path: Path, env: dict[str, str]) -> None:
    """A chatty command's log keeps its head and tail; the middle's blocks are freed as it goes."""
    script = ("import sys, time\nsys.stdout.write('FIRST\\n')\nfor _ in range(400):\n"
              "    sys.stdout.write('y' * 99999 + '\\n')\nsys.stdout.flush()\ntime.sleep(1.0)\nprint('LAST')\n")
    (tmp_path / "chatty.py").write_text(script)
    log = tmp_path / "logs" / "run.log"
    on_disk: list[int] = []

    async def sample() -> None:
        if log.exists():
            on_disk.append(log.stat().st_blocks * 512)

    cap = 1 << 20
    res = await _run(tmp_path, env, f"{sys.executable} chatty.py", limits=Limits(log_bytes=cap), on_tick=sample)
    assert res.ok and res.cut_bytes > 38_000_000
    assert on_disk and min(on_disk[-3:]) < 4 * cap  # while it slept, the 40 MB were no longer on disk
    text = log.read_text()
    assert "FIRST" in text and "LAST" in text and f"{res.cut_bytes} bytes of output cut" in text
    assert log.stat().st_size < cap + 4096


async def test_rlimit_data_is_the_memory_ceiling_without_a_cgroup(tmp_path: Path, env: dict[str, str]) -> None:
    res = await _run(tmp_path, env, "ulimit -d", limits=Limits(memory_mb=256))
    assert (tmp_path / "logs" / "run.log").read_text().splitlines()[2].strip() == str(256 * 1024)
    assert res.ok


def test_the_task_cap_is_added_to_what_the_user_runs_already() -> None:
    """RLIMIT_NPROC counts the user's every task: ten more threads here raise the command's limit by ten."""
    import resource
    import threading

    from looptree.engine.evaluation import procs

    def nproc_limit() -> int:
        procs._user_tasks_cache.clear()
        pairs = dict(procs._rlimit_pairs(procs.Limits(processes=64)))
        return pairs[resource.RLIMIT_NPROC][0]

    stop = threading.Event()
    procs._user_tasks_cache.clear()
    base = procs._user_tasks()
    threads = [threading.Thread(target=stop.wait) for _ in range(10)]
    for thread in threads:
        thread.start()
    try:
        procs._user_tasks_cache.clear()
        assert procs._user_tasks() >= base + 10
        if os.geteuid() != 0:  # root is exempt from RLIMIT_NPROC: nothing is added there
            assert nproc_limit() >= 64 + base + 10
    finally:
        stop.set()
        for thread in threads:
            thread.join()
