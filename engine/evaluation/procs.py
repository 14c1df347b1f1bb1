"""Run the project's build/check/bench commands without ever leaving a process behind.

Why this module exists: user commands are arbitrary shell strings that may fork, daemonise,
ignore SIGTERM, print megabytes or hang. The engine must be able to stop any of them on a
timeout, on cancellation and when they exit normally but left something running, and must never
block its event loop while doing so. Three layers make that reliable:

1. the command runs in a *new session* (its own process group), so one ``killpg`` reaches the
   shell and everything it started in the ordinary way;
2. every process inherits the environment variable ``LOOPTREE_JOB=<job_tag>``; a scan of
   process environments (psutil) finds grandchildren that escaped the group with ``setsid()``
   or a double fork, and orphans of a crashed engine on resume (``kill_jobs_with_prefix``);
3. the shell gets ``PR_SET_PDEATHSIG=SIGKILL`` so it dies with the engine. (Linux sends it
   when the *thread* that forked exits; asyncio forks from the event-loop thread, which lives
   as long as the engine. Its descendants are then found by tag on the next resume.)

A process that rewrites its own environment (``env -i``) and leaves the group escapes layer 2;
that is why, by default, the command runs inside the run's sandbox (``engine.sandbox``: a
bubblewrap PID namespace whose init takes every process down with it). The three layers above
stay for ``sandbox.mode = "off"`` and as a second net.

Bounded resources: a memory ceiling per command (a cgroup v2 group when ``Limits.cgroup_parent``
names a writable one, ``RLIMIT_DATA`` otherwise; never ``RLIMIT_AS``, which breaks CUDA), and a
log cap (``Limits.log_bytes``): while the command runs, the middle of an over-long output is
punched out of the file, and at the end the head and the tail are kept with a line saying how
many bytes were cut. ``RLIMIT_DATA`` bounds each process alone (four children, or one shared
mapping, went past it), ``RLIMIT_NPROC`` does not hold for a command mapped to root, and nothing
bounded the disk: so a watchdog looks at the running command every ``MEMORY_CHECK_S`` and kills
its tree when the memory of all its processes together (PSS) passes the ceiling, when it runs
more than ``Limits.processes`` processes and threads, or when it takes the file system of its
worktree, HOME or extra writable folders below ``Limits.disk_free_mb`` free (or below
``Limits.disk_free_inodes`` free inodes); ``run_limits`` sets these caps.

Output goes to a log *file* (never a pipe): no deadlock on chatty output, and the log is kept
for ``looptree show``. Each call appends a header line (the command) and a footer line (rc,
duration), so one log can hold several repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import resource
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from looptree.engine.evaluation.sandbox import MemoryPlan, Sandbox, SandboxRefused, memory_plan

__all__ = [
    "JOB_ENV",
    "Limits",
    "ProcResult",
    "find_job_pids",
    "kill_job",
    "kill_jobs_with_prefix",
    "run_command",
    "run_limits",
]

JOB_ENV = "LOOPTREE_JOB"
"""The environment variable that tags every process a job started."""

TAIL_BYTES = 4096
"""How much of the end of the output ``ProcResult.tail`` keeps (enough for a failure reason)."""

TERM_GRACE_S = 0.5
"""How long a timed-out process group gets between SIGTERM and SIGKILL (the brief caps it at 1 s)."""

REAP_TIMEOUT_S = 5.0
"""How long to wait for the SIGKILLed direct child to be reaped before giving up on its rc."""

_SWEEP_ROUNDS = 4
"""A tagged process may fork while we scan; repeat the scan until it comes back empty."""

_PR_SET_PDEATHSIG = 1

_running: dict[str, bool] = {}
"""Tags of the commands running now -> whether kill_job/kill_jobs_with_prefix hit them. Lets
run_command report ``cancelled=True`` for a node the user killed (``looptree ctl kill``)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to the shell (and inherited by everything it starts).

    ``None`` leaves the engine's own limit in place. A limit above the engine's hard limit is
    clamped to it (an unprivileged process cannot raise its hard limit).
    """

    cpu_seconds: int | None = None  # RLIMIT_CPU: SIGXCPU at the limit, SIGKILL one second later
    address_space_mb: int | None = None  # RLIMIT_AS (breaks CUDA: only for tests and CPU tools)
    open_files: int | None = 4096  # RLIMIT_NOFILE
    core_dump: bool = False  # RLIMIT_CORE is 0 unless True: a crashing bench must not fill the disk
    memory_mb: int | None = None  # the memory ceiling: a cgroup v2 group, else RLIMIT_DATA
    cgroup_parent: str | None = None  # a writable cgroup v2 folder with the memory controller on
    log_bytes: int | None = None  # output kept per command (head + tail); None keeps everything
    processes: int | None = None  # RLIMIT_NPROC: tasks (processes and threads) at once; a fork bomb stops there
    disk_free_mb: int | None = None  # the free space the command may not take its folders' file systems below
    disk_free_inodes: int | None = None  # likewise for free inodes (a million empty files fill a disk too)


def default_processes(cpus: int | None = None, pid_max: int | None = None) -> int:
    """Tasks one command may run at once (RLIMIT_NPROC and the watchdog, threads included).

    A fork or thread bomb stops there instead of exhausting the machine's PIDs (``pid_max`` is
    32768 on many kernels), while a parallel build or a bench with a thread per core in each of
    its processes stays below it: 64 per CPU, at least 8192, at most half of ``pid_max``.
    """
    cpus = cpus or os.cpu_count() or 1
    if pid_max is None:
        try:
            with open("/proc/sys/kernel/pid_max") as fh:
                pid_max = int(fh.read())
        except (OSError, ValueError):
            pid_max = 32768
    return max(1024, min(max(8192, 64 * cpus), pid_max // 2))


DEFAULT_PROCESSES = default_processes()

DEFAULT_DISK_FREE_MB = 1024
"""A command that takes the file system holding its worktree (or HOME, or extra writable folders)
below this much free space is stopped: a candidate must never fill the user's disk."""

DEFAULT_DISK_FREE_INODES = 50_000
"""Likewise for inodes, on file systems that have a fixed number (ext4): empty files cost no bytes."""

MEMORY_CHECK_S = 0.25
"""How often the memory of a command's whole process tree is summed when no cgroup bounds it."""


def run_limits(config: Any) -> tuple[Limits, MemoryPlan]:
    """The limits every project command of a run gets (run, ``eval`` and ``kernelbench`` alike),
    and how its memory ceiling is enforced (recorded in ``run_started.memory``)."""
    plan = memory_plan(config)
    bench = config.bench
    limits = Limits(cpu_seconds=bench.cpu_limit_s or None, open_files=bench.open_files,
                    memory_mb=plan.limit_mb, cgroup_parent=plan.cgroup_parent,
                    log_bytes=int(bench.log_limit_mb * 1024 * 1024), processes=default_processes(),
                    disk_free_mb=DEFAULT_DISK_FREE_MB, disk_free_inodes=DEFAULT_DISK_FREE_INODES)
    return limits, plan


@dataclass
class ProcResult:
    """What happened to one command.

    ``rc`` is the shell's exit status (negative: killed by that signal), or ``None`` when the
    command could not be started at all or its shell was never reaped.
    """

    rc: int | None
    timed_out: bool
    cancelled: bool  # killed on request (kill_job / kill_jobs_with_prefix) while it ran
    duration_s: float
    log_path: Path
    tail: str  # last ~4 KB of combined stdout+stderr, for failure reasons
    note: str = ""  # a limit the command ran into ("exceeded the memory limit ..."), for the reason
    cut_bytes: int = 0  # output bytes dropped from the middle of the log by the log cap

    @property
    def ok(self) -> bool:
        """True when the command ran to completion and exited 0."""
        return self.rc == 0 and not self.timed_out and not self.cancelled


# --------------------------------------------------------------------------------------------
# Child set-up (runs between fork and exec: keep it to system calls)


def _load_prctl() -> Callable[..., int] | None:
    """Resolve libc's prctl once, in the parent, so the child only makes the call."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux, or no libc to load
        return None


_PRCTL = _load_prctl()

_FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_BLOCK = 4096
LOG_CHECK_S = 0.25
"""How often a capped log's size is looked at while its command runs (one fstat)."""


def _load_fallocate() -> Callable[..., int] | None:
    """libc's fallocate, to free the middle of an over-long log while it is still written."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        return fn  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_FALLOCATE = _load_fallocate()


USER_TASKS_TTL_S = 5.0
_user_tasks_cache: list[float] = []  # [when, count]


def _user_tasks() -> int:
    """Tasks (processes and threads) of this real user on the machine now, counted at most every
    USER_TASKS_TTL_S (a scan of /proc costs a few milliseconds; commands start often)."""
    now = time.monotonic()
    if _user_tasks_cache and now - _user_tasks_cache[0] < USER_TASKS_TTL_S:
        return int(_user_tasks_cache[1])
    uid, count = str(os.getuid()), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as fh:
                status = fh.read(4096)
        except OSError:
            continue
        fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
        if fields.get(b"Uid", b"").split()[:1] == [uid.encode()]:
            count += int(fields.get(b"Threads", b"1").strip() or 1)
    _user_tasks_cache[:] = [now, count]
    return count


def _rlimit_pairs(limits: Limits) -> list[tuple[int, tuple[int, int]]]:
    """Compute (resource, (soft, hard)) pairs in the parent, clamped to the current hard limits.

    Done before fork because an exception inside preexec_fn only surfaces as an opaque
    SubprocessError.
    """
    pairs: list[tuple[int, tuple[int, int]]] = []

    def clamp(res: int, soft: int, hard: int) -> None:
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        pairs.append((res, (soft, hard)))

    if limits.cpu_seconds is not None:
        cpu = max(1, int(limits.cpu_seconds))
        clamp(resource.RLIMIT_CPU, cpu, cpu + 1)
    if limits.address_space_mb is not None:
        as_bytes = max(1, int(limits.address_space_mb)) * 1024 * 1024
        clamp(resource.RLIMIT_AS, as_bytes, as_bytes)
    if limits.open_files is not None:
        nofile = max(3, int(limits.open_files))
        clamp(resource.RLIMIT_NOFILE, nofile, nofile)
    if limits.memory_mb is not None and limits.cgroup_parent is None:
        data = max(16, int(limits.memory_mb)) * 1024 * 1024
        clamp(resource.RLIMIT_DATA, data, data)
    if limits.processes is not None:
        # RLIMIT_NPROC counts every task of the *user*, not of this command: the cap is added to
        # what the user runs already (their desktop, other benches), so an honest command is not
        # refused a thread because of them. Root is exempt from it anyway (the watchdog counts).
        nproc = max(16, int(limits.processes)) + (_user_tasks() if os.geteuid() != 0 else 0)
        clamp(resource.RLIMIT_NPROC, nproc, nproc)
    if not limits.core_dump:
        _, core_hard = resource.getrlimit(resource.RLIMIT_CORE)
        pairs.append((resource.RLIMIT_CORE, (0, core_hard)))
    return pairs


def _make_preexec(limits: Limits, cgroup_procs: str | None = None) -> Callable[[], None]:
    pairs = _rlimit_pairs(limits)
    prctl = _PRCTL
    parent_pid = os.getpid()

    def preexec() -> None:  # runs in the forked child, before exec
        if cgroup_procs is not None:  # join the command's memory group before anything runs
            cg = os.open(cgroup_procs, os.O_WRONLY)
            try:
                os.write(cg, b"0")
            finally:
                os.close(cg)
        for res, value in pairs:
            resource.setrlimit(res, value)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            # The engine may have died between fork and prctl: then nobody would kill us.
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)

    return preexec


# --------------------------------------------------------------------------------------------
# Finding and killing tagged processes (synchronous: call through asyncio.to_thread in the loop)


def _protected_pids() -> set[int]:
    """This process and its ancestors: never kill them, even if an outer looptree tagged them."""
    pids = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        pids.update(p.pid for p in psutil.Process().parents())
    return pids


def find_job_pids(job_tag_or_prefix: str, prefix: bool = False) -> list[int]:
    """Live processes whose environment has ``LOOPTREE_JOB`` equal to the tag (or starting with it).

    Zombies are skipped (they are already dead and cannot be signalled); processes we may not
    read are skipped too (they cannot be ours).
    """
    if not job_tag_or_prefix:
        raise ValueError("find_job_pids needs a non-empty job tag or prefix")
    protected = _protected_pids()
    found: list[int] = []
    for proc in psutil.process_iter():
        if proc.pid in protected:
            continue
        try:
            tag = proc.environ().get(JOB_ENV)  # a zombie's environ reads as empty
            if tag is None:
                continue
            if tag == job_tag_or_prefix or (prefix and tag.startswith(job_tag_or_prefix)):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _signal_pids(pids: list[int], sig: int) -> int:
    """Signal each pid; return how many were still there to receive it."""
    count = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            count += 1
        except (ProcessLookupError, PermissionError):
            pass
    return count


def _sweep(job_tag_or_prefix: str, prefix: bool, sig: int) -> int:
    """Signal every tagged process; rescan until nothing new turns up (one may fork mid-scan).

    Returns how many distinct processes got the signal. A process killed in one round can
    still show up in the next (death is not instant), hence the ``done`` set.
    """
    done: set[int] = set()
    count = 0
    for _ in range(_SWEEP_ROUNDS):
        fresh = [p for p in find_job_pids(job_tag_or_prefix, prefix=prefix) if p not in done]
        if not fresh:
            break
        count += _signal_pids(fresh, sig)
        done.update(fresh)
        if sig != signal.SIGKILL:
            break  # a polite signal once is enough
    return count


def kill_job(job_tag: str, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to every process carrying ``LOOPTREE_JOB=job_tag``; return how many got it.

    Blocking (a process scan): from the event loop, call it through ``asyncio.to_thread``. The
    ``run_command`` waiting on this tag then returns with ``cancelled=True``.
    """
    if not job_tag:
        raise ValueError("kill_job needs a non-empty job tag")
    if job_tag in _running:
        _running[job_tag] = True
    return _sweep(job_tag, False, sig)


def kill_jobs_with_prefix(prefix: str) -> int:
    """SIGKILL every process whose job tag starts with ``prefix``; return how many.

    Used on resume: benchmarks started by a crashed engine of the same run are orphans.
    Blocking, like ``kill_job``.
    """
    if not prefix:
        raise ValueError("kill_jobs_with_prefix needs a non-empty prefix")
    for tag in list(_running):
        if tag.startswith(prefix):
            _running[tag] = True
    return _sweep(prefix, True, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Log file helpers (small local writes; the end-of-run one shares a worker thread with the sweep)


def _open_log(log_path: Path, command: str, job_tag: str, cwd: Path, sandbox: str = "off") -> tuple[int, int]:
    """Open the log for appending, write the header; return (fd, offset where output starts).

    O_RDWR (not O_WRONLY) so the same descriptor can ``pread`` the tail afterwards; O_APPEND so
    the command's writes and ours never overwrite each other.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        header = f"### looptree {stamp} job={job_tag} cwd={cwd} sandbox={sandbox}\n$ {command}\n"
        os.write(fd, header.encode("utf-8", "replace"))
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


def _punch_middle(fd: int, start: int, cap: int, done: int) -> int:
    """Free the disk blocks of an over-long output's middle while the command still writes.

    The file keeps its size (a sparse hole), so the command's O_APPEND writes go on untouched;
    ``_compact`` rewrites it at the end. Returns the offset punched up to (``done`` if nothing).
    """
    if _FALLOCATE is None:
        return done
    size = os.fstat(fd).st_size
    if size - start <= cap:
        return done
    low = max(done, -(-(start + cap // 2) // _BLOCK) * _BLOCK)
    high = (size - (cap - cap // 2)) // _BLOCK * _BLOCK
    if high - low < 16 * _BLOCK:
        return done
    if _FALLOCATE(fd, _FALLOC_PUNCH, low, high - low) != 0:
        return done  # the file system cannot punch holes: the end-of-command compaction still cuts
    return high


def _compact(fd: int, start: int, cap: int) -> int:
    """Keep the first and the last ``cap/2`` bytes of the output, at line ends; return the bytes cut."""
    end = os.fstat(fd).st_size
    if end - start <= cap:
        return 0
    head_n, tail_n = cap // 2, cap - cap // 2
    head = os.pread(fd, head_n, start)
    if b"\n" in head[:-1]:
        head = head[: head.rindex(b"\n") + 1]
    tail = os.pread(fd, tail_n, end - tail_n)
    if b"\n" in tail[:-1]:
        tail = tail[tail.index(b"\n") + 1:]
    cut = (end - start) - len(head) - len(tail)
    os.ftruncate(fd, start + len(head))
    lead = b"" if not head or head.endswith(b"\n") else b"\n"
    marker = (f"### looptree: {cut} bytes of output cut here (log cap {cap} bytes; "
              f"kept the first {len(head)} and the last {len(tail)})\n").encode()
    os.write(fd, lead + marker + tail)
    return cut


def _finish_log(fd: int, start: int, rc: int | None, duration_s: float, status: str,
                cap: int | None = None) -> tuple[str, int]:
    """Cap the output, read its tail, append the footer, close the log; return (tail, bytes cut)."""
    cut = 0
    try:
        if cap is not None:
            try:
                cut = _compact(fd, start, cap)
            except OSError:
                cut = 0  # a log we cannot rewrite stays whole rather than losing the footer
        end = os.fstat(fd).st_size
        begin = max(start, end - TAIL_BYTES)
        data = os.pread(fd, end - begin, begin) if end > begin else b""
        tail = data.decode("utf-8", "replace")
        if begin > start and "\n" in tail[:-1]:  # cut mid-line: drop the partial first line
            tail = tail.split("\n", 1)[1]
        lead = "" if not data or data.endswith(b"\n") else "\n"
        os.write(fd, f"{lead}### looptree {status} rc={rc} duration={duration_s:.3f}s\n".encode())
        return tail, cut
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The runner


def _killpg(pgid: int, sig: int) -> bool:
    """Signal the group; False when it no longer exists (or is no longer ours)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _snapshot(job_tag: str) -> list[psutil.Process]:
    """The tagged processes as psutil handles (they detect pid reuse, unlike bare pids)."""
    procs: list[psutil.Process] = []
    for pid in find_job_pids(job_tag):
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    return procs


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def _terminate(proc: asyncio.subprocess.Process, job_tag: str) -> None:
    """SIGTERM the group and every tagged process, a short grace, then SIGKILL the group.

    The grace ends as soon as every process that got SIGTERM is gone (zombies count as gone:
    an init that never reaps must not stretch it), so a well-behaved command costs only a few
    milliseconds here. The final SIGKILL sweep by tag happens in ``_after_exit``.
    """
    pgid = proc.pid  # start_new_session: the shell leads its own group
    _killpg(pgid, signal.SIGTERM)
    victims = await asyncio.to_thread(_snapshot, job_tag)
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    while time.monotonic() < deadline and any(_alive(v) for v in victims):  # noqa: ASYNC110 - other processes: no event to wait on
        await asyncio.sleep(0.02)
    _killpg(pgid, signal.SIGKILL)


@dataclass
class _Run:
    """What one command's clean-up needs: its log, its memory group, its limits."""

    job_tag: str
    fd: int
    start: int
    limits: Limits
    cgroup: Path | None = None
    punched: int = 0
    sweep: bool = True  # scan the process table for tagged leftovers (a sandbox's PID namespace needs none)
    disk: dict[str, tuple[int, int]] = field(default_factory=dict)  # watched folder -> (free bytes, inodes) at start
    over: str = ""  # the limit the watchdog stopped the command at (memory summed over its tree, disk)


def _pss_kb(pid: int) -> int:
    """A process's proportional share of memory (shared pages split between their users), in KiB.

    PSS, not RSS: the pages a fork shares with its parent count once over the tree, while shared
    anonymous memory (``MAP_SHARED``, which ``RLIMIT_DATA`` does not count) counts in full.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            data = fh.read(4096)
        at = data.find(b"\nPss:")
        if at >= 0:
            return int(data[at + 5:].split(None, 1)[0])
    except (OSError, ValueError, IndexError):
        pass
    try:  # no smaps_rollup (old kernel, or not ours to read): resident size
        return int(psutil.Process(pid).memory_info().rss // 1024)
    except psutil.Error:
        return 0


def _children(pid: int, counted: list[int]) -> list[int] | None:
    """Direct children from ``/proc/<pid>/task/*/children`` (None: the kernel does not list them);
    ``counted[0]`` grows by the process's tasks (its threads: each takes a PID of the machine's)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []  # gone
    counted[0] += len(tasks)
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                found += [int(x) for x in fh.read().split()]
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}/children") and os.path.exists(f"/proc/{pid}/task/{tid}"):
                return None  # a kernel without CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return found


def _tree_pids(pid: int) -> tuple[list[int], int]:
    """(``pid`` and every descendant, their tasks counted with threads): a sandbox's daemons are
    descendants of its namespace's init.

    The kernel's per-task children lists cost in proportion to the tree, not to the machine's
    process table; psutil's full scan is the fallback.
    """
    tree: list[int] = []
    todo, counted = [pid], [0]
    while todo:
        current = todo.pop()
        tree.append(current)
        kids = _children(current, counted)
        if kids is None:
            try:
                procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
                return [p.pid for p in procs], sum(_threads(p) for p in procs)
            except psutil.Error:
                return [pid], 1
        todo += kids
    return tree, counted[0]


def _threads(proc: psutil.Process) -> int:
    try:
        return int(proc.num_threads())
    except psutil.Error:
        return 0


def _free(path: str) -> tuple[int, int] | None:
    """(free bytes, free inodes) of the file system holding ``path`` (what an unprivileged user may take)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_favail


def _disk_watch(limits: Limits, folders: Sequence[Path | None]) -> dict[str, tuple[int, int]]:
    """One folder per file system the command may write, with its free space and inodes now."""
    if limits.disk_free_mb is None and limits.disk_free_inodes is None:
        return {}
    watched: dict[str, tuple[int, int]] = {}
    devices: set[int] = set()
    for folder in folders:
        if folder is None:
            continue
        try:
            dev = os.stat(folder).st_dev
        except OSError:
            continue
        free = _free(str(folder))
        if dev not in devices and free is not None:
            devices.add(dev)
            watched[str(folder)] = free
    return watched


_DISK_SLACK = 16 * 1024 * 1024
_INODE_SLACK = 1000
"""Free space (inodes) a command may take below the floor when it started there already (its own logs)."""


def _over_limits(pid: int, run: _Run) -> str:
    """Why the running command must stop now ("" while it is within its limits).

    Memory: where no cgroup bounds the tree, ``RLIMIT_DATA`` bounds each process alone (eight
    children may each take it, and shared mappings escape it), so the tree is summed here. Disk:
    the worktree and HOME are the user's disk, which no candidate may fill.
    """
    limits = run.limits
    watch = limits.processes is not None or (limits.memory_mb is not None and run.cgroup is None)
    pids, tasks = _tree_pids(pid) if watch else ([], 0)
    # RLIMIT_NPROC does not hold for a command mapped to root (the kernel exempts root's user
    # however deep the namespace): counted here too, threads included (each takes a PID).
    if limits.processes is not None and tasks > limits.processes:
        return (f"killed: it ran more than {limits.processes} processes and threads at once (a fork or "
                "thread bomb?); the cap on a command's tasks")
    if limits.memory_mb is not None and run.cgroup is None:
        used = sum(_pss_kb(p) for p in pids) / 1024
        if used > limits.memory_mb:
            return (f"killed at the memory limit of {limits.memory_mb} MiB: its processes used {used:.0f} MiB "
                    "together (bench.memory_limit_mb, summed over the command's processes)")
    for folder, (bytes_then, inodes_then) in run.disk.items():
        now = _free(folder)
        if now is None:
            continue
        free, inodes = now
        if limits.disk_free_mb is not None and free < limits.disk_free_mb * 1024 * 1024 \
                and free < bytes_then - _DISK_SLACK:
            # Free space is the file system's, not this command's: say what fell, not who wrote it.
            return (f"killed: the disk holding {folder} fell below {limits.disk_free_mb} MiB free while it ran "
                    f"({(bytes_then - free) // (1024 * 1024)} MiB fewer free than when it started)")
        if limits.disk_free_inodes is not None and 0 < inodes_then and inodes < limits.disk_free_inodes \
                and inodes < inodes_then - _INODE_SLACK:
            return (f"killed: the disk holding {folder} fell below {limits.disk_free_inodes} free inodes while "
                    f"it ran ({inodes_then - inodes} fewer than when it started)")
    return ""


def _make_cgroup(limits: Limits, job_tag: str) -> Path | None:
    """A fresh cgroup v2 group with ``memory.max`` set for one command, or None if it cannot be made."""
    if limits.memory_mb is None or limits.cgroup_parent is None:
        return None
    global _cgroup_seq
    _cgroup_seq += 1
    safe = "".join(c if c.isalnum() else "-" for c in job_tag)[-60:]
    group = Path(limits.cgroup_parent) / f"looptree-{os.getpid()}-{_cgroup_seq}-{safe}"
    try:
        group.mkdir()
        (group / "memory.max").write_text(str(int(limits.memory_mb) * 1024 * 1024))
        with contextlib.suppress(OSError):
            (group / "memory.swap.max").write_text("0")
        return group
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        return None


_cgroup_seq = 0

_OOM_WORDS = ("memoryerror", "cannot allocate memory", "bad_alloc", "out of memory", "oom")


def _memory_note(run: _Run, rc: int | None, tail: str) -> str:
    """Say so when the command ran into the memory ceiling (the cgroup counts its OOM kills)."""
    mb = run.limits.memory_mb
    if mb is None or rc == 0:
        return ""
    if run.cgroup is not None:
        try:
            events = dict(line.split() for line in (run.cgroup / "memory.events").read_text().splitlines())
            if int(events.get("oom_kill", "0")) > 0:
                return f"killed at the memory limit of {mb} MiB: bench.memory_limit_mb, cgroup v2"
        except (OSError, ValueError):
            pass
        return ""
    if any(word in tail.lower() for word in _OOM_WORDS):
        return f"ran into the memory limit of {mb} MiB: bench.memory_limit_mb, RLIMIT_DATA"
    return ""


def _drop_cgroup(group: Path | None) -> None:
    """Kill what is left in the group and remove it (a group with members cannot be removed)."""
    if group is None:
        return
    with contextlib.suppress(OSError):  # no O_CREAT: kernels before 5.14 have no cgroup.kill
        fd = os.open(group / "cgroup.kill", os.O_WRONLY)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)
    for _ in range(50):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _after_exit(pgid: int, run: _Run, rc: int | None, duration_s: float, status: str) -> tuple[str, int, str]:
    """Everything that follows the shell's exit, in one worker-thread hop: kill leftovers, log.

    Runs on normal exit too: a daemonised leftover must not outlive its node.
    Returns (tail, bytes cut from the log, limit note).
    """
    tail, cut, note = "", 0, ""
    try:
        _killpg(pgid, signal.SIGKILL)
        if run.sweep:
            _sweep(run.job_tag, False, signal.SIGKILL)
    finally:
        try:
            tail, cut = _finish_log(run.fd, run.start, rc, duration_s, status, run.limits.log_bytes)
            note = _memory_note(run, rc, tail)
        finally:
            _drop_cgroup(run.cgroup)
    return tail, cut, note


async def _reap(wait_task: asyncio.Future[int]) -> None:
    """Wait (bounded) for the direct child; its rc stays None if it never goes."""
    if not wait_task.done():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(wait_task), REAP_TIMEOUT_S)
    if not wait_task.done():
        wait_task.cancel()


async def run_command(
    command: str,
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    log_path: Path,
    job_tag: str,
    limits: Limits = Limits(),
    on_tick: Callable[[], Awaitable[None]] | None = None,
    tick_interval: float = 0.25,
    sandbox: Sandbox | None = None,
    private_dir: Path | None = None,
    device: int | None = None,
    protect: Sequence[str] = (),
) -> ProcResult:
    """Run ``command`` with ``/bin/sh -c`` and make sure nothing it started survives it.

    The child's environment is exactly ``env`` plus ``LOOPTREE_JOB=job_tag`` (the caller decides
    what else leaks through). With a ``sandbox`` the shell runs contained (``engine.sandbox``):
    ``private_dir`` then holds its HOME and caches, ``device`` names the GPU it holds and
    ``protect`` lists files (relative to ``cwd``) that stay read-only inside the worktree.
    ``on_tick`` is awaited every ``tick_interval`` seconds while the
    command runs (the evaluator tails the metrics CSV with it); if it raises, the command is
    killed and the exception propagates; if it runs past the deadline, that is a timeout. On
    timeout the process tree is killed and the result says ``timed_out``; on cancellation the
    tree is killed and ``CancelledError`` propagates. A command that cannot be started at all
    (missing cwd, ...) gives ``rc=None`` with the reason in ``tail`` and in the log.
    """
    if not job_tag:
        raise ValueError("run_command needs a non-empty job_tag")
    cwd = Path(cwd)
    log_path = Path(log_path)
    child_env = dict(env)
    child_env[JOB_ENV] = job_tag
    argv = ["/bin/sh", "-c", command]
    refused = ""
    if sandbox is not None and cwd.is_dir():  # a missing cwd fails below, the same as uncontained
        try:
            argv, child_env = sandbox.wrap(argv, cwd=cwd, env=child_env, private_dir=private_dir, device=device,
                                           protect=protect)
        except SandboxRefused as exc:
            refused = str(exc)
    fd, start = _open_log(log_path, command, job_tag, cwd, "bubblewrap" if sandbox is not None else "off")
    if refused:  # never started: the reason is the log's only line and the failure's last one
        with contextlib.suppress(OSError):
            os.write(fd, f"looptree: the sandbox refused to run the command: {refused}\n".encode())
        tail, _ = _finish_log(fd, start, None, 0.0, "refused")
        return ProcResult(None, False, False, 0.0, log_path, tail)
    _running[job_tag] = False
    group = _make_cgroup(limits, job_tag)
    if group is None and limits.cgroup_parent is not None:  # no group after all: RLIMIT_DATA instead
        limits = replace(limits, cgroup_parent=None)
    # Contained, the command's processes all die with bwrap's PID namespace: no table scan needed.
    run = _Run(job_tag, fd, start, limits, group, sweep=sandbox is None)
    extra = [Path(p) if os.path.isabs(p) else cwd / p for p in (sandbox.writable if sandbox is not None else ())]
    run.disk = _disk_watch(limits, [cwd, private_dir, *extra])
    try:
        return await _run(argv, cwd, child_env, timeout, log_path, run, on_tick, tick_interval)
    finally:
        _running.pop(job_tag, None)


async def _run(
    argv: list[str], cwd: Path, child_env: dict[str, str], timeout: float, log_path: Path, run: _Run,
    on_tick: Callable[[], Awaitable[None]] | None, tick_interval: float,
) -> ProcResult:
    """The body of run_command; owns ``run.fd`` (closes it on every path)."""
    t0 = time.monotonic()
    job_tag, fd, start = run.job_tag, run.fd, run.start
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd, env=child_env, stdin=asyncio.subprocess.DEVNULL, stdout=fd,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=_make_preexec(run.limits, str(run.cgroup / "cgroup.procs") if run.cgroup else None),
        )
    except asyncio.CancelledError:
        # Cancelled mid-spawn: asyncio kills the shell itself; sweep in case it got further.
        try:
            _sweep(job_tag, False, signal.SIGKILL)
        finally:
            _finish_log(fd, start, None, time.monotonic() - t0, "cancelled")
            _drop_cgroup(run.cgroup)
        raise
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        with contextlib.suppress(OSError):
            os.write(fd, f"looptree: could not start the command: {exc}\n".encode())
        duration = time.monotonic() - t0
        tail, _ = _finish_log(fd, start, None, duration, "failed to start")
        _drop_cgroup(run.cgroup)
        return ProcResult(None, False, False, duration, log_path, tail)

    wait_task: asyncio.Future[int] = asyncio.ensure_future(proc.wait())
    timed_out = False
    status = "exited"
    handed_off = False  # _after_exit (which closes fd) has been given to a worker thread
    cap = run.limits.log_bytes
    watchdog = (run.limits.memory_mb is not None and run.cgroup is None) or bool(run.disk) \
        or run.limits.processes is not None
    try:
        deadline = t0 + timeout
        while not wait_task.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            step = remaining if on_tick is None else min(tick_interval, remaining)
            if cap is not None:
                step = min(step, LOG_CHECK_S)
            if watchdog:
                step = min(step, MEMORY_CHECK_S)
            await asyncio.wait({wait_task}, timeout=step)
            if cap is not None:
                with contextlib.suppress(OSError):
                    run.punched = _punch_middle(fd, start, cap, run.punched)
            if watchdog and not wait_task.done():
                run.over = await asyncio.to_thread(_over_limits, proc.pid, run)
                if run.over:
                    status = "stopped at a limit"
                    _killpg(proc.pid, signal.SIGKILL)  # no grace: memory or disk would go on growing
                    break
            if on_tick is not None and not wait_task.done():
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result and
                    # drops a cancellation that lands as the hook finishes, so a killed node ran on.
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                        await on_tick()
                except TimeoutError:
                    timed_out = True  # the hook ate the rest of the time budget
                    break
        if timed_out:
            status = "timed out"
            await _terminate(proc, job_tag)
        elif run.over:
            await _terminate(proc, job_tag)  # its group is dead; the tagged stragglers get the same
        await _reap(wait_task)
        duration = time.monotonic() - t0
        killed = _running.get(job_tag, False) and not timed_out
        if killed:
            status = "killed on request"
        after = asyncio.ensure_future(asyncio.to_thread(
            _after_exit, proc.pid, run, proc.returncode, duration, status))
        handed_off = True
        tail, cut, note = await asyncio.shield(after)
    except BaseException as exc:  # cancellation or on_tick failure: never leave it running
        if not handed_off:
            status = "cancelled" if isinstance(exc, asyncio.CancelledError) else "aborted"
        try:
            if not handed_off:
                await _terminate(proc, job_tag)
                await _reap(wait_task)
                after = asyncio.ensure_future(asyncio.to_thread(
                    _after_exit, proc.pid, run, proc.returncode, time.monotonic() - t0, status))
                handed_off = True
                await asyncio.shield(after)
        except BaseException:  # cancelled again mid-cleanup: finish the job synchronously
            _killpg(proc.pid, signal.SIGKILL)
            if not handed_off:
                with contextlib.suppress(Exception):
                    _after_exit(proc.pid, run, proc.returncode, time.monotonic() - t0, status)
        raise
    return ProcResult(proc.returncode, timed_out, killed, duration, log_path, tail, run.over or note, cut)
