"""The Ray executor: project commands run on long-lived worker actors of a Ray cluster.

Why Ray and not a queue of our own: it already places one actor per GPU (or per CPU bench slot)
across hosts, ships bytes through its object store, notices dead nodes and is what the people who
use looptree run (verl, OpenRLHF, SkyRL). What Ray does *not* do, this module does:

- **Code travels as a git bundle.** Each worker keeps a bare git mirror; the engine sends the
  commit under evaluation as a v2 bundle (only the objects the worker lacks) through the object
  store and the worker checks it out in a worktree of its own. No shared file system needed.
- **The same runner.** On the worker the command goes through ``engine.procs.run_command`` with
  the engine's limits and a sandbox of the worker's own (bubblewrap found and probed there).
- **Live rows.** While the command runs the engine polls the actor (an async actor, so polls run
  beside the command) for the new bytes of the log and of the metrics file, and appends them to
  the engine's own copies. The evaluator's CSV tail, forged-metric evidence and the dashboard's
  live rows read those copies exactly as they read a local bench.
- **Kills reach the tree.** Ray's cancel does not stop a running actor call, so the actor owns
  its commands: a cancelled ``run`` here sends ``kill(job_tag)`` there, which kills the whole
  tree by tag (``procs.kill_job``); closing the executor kills every job of the run on every
  worker before the actors go. A resume first sweeps every alive node for orphans of the run.
- **Dead workers.** A worker that dies mid-command fails that stage with a reason naming the
  worker; the worker is replaced (when the cluster can place one) and the run goes on.
- **Same software.** A worker whose looptree, Python, torch or CUDA version differs from the
  engine's is refused with one line that names the difference.
- **Device locks per host and GPU.** A GPU worker's command holds ``gpu/devices/locks.py``'s lock named
  after its host and GPU UUID, so a local looptree and a worker never time on one GPU at once,
  and workers on different hosts never wait for each other (even with a shared lock folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from looptree.engine.errors import LooptreeError
from looptree.engine.evaluation.executor import Worker, device_identity
from looptree.engine.evaluation.procs import (
    Limits,
    ProcResult,
    kill_job,
    kill_jobs_with_prefix,
    run_command,
)
from looptree.engine.evaluation.safefiles import UnsafePath, open_beneath, relative_beneath, unlink_beneath

__all__ = ["BenchWorker", "RayExecutor", "local_versions", "version_difference"]

CALL_TIMEOUT_S = 60.0
"""Bound on every actor call that is not the command itself (hello, poll, ship, kill)."""

HANG_GRACE_S = 60.0
"""How long past the command's own timeout the engine waits for a worker before calling it lost."""

GIT_TIMEOUT_S = 120.0
"""Bound on the engine's own git calls (rev-parse, pack-objects) and the worker's."""

START_TIMEOUT_S = 180.0
"""How long a new worker actor may take to be placed and answer (a busy cluster queues it)."""


def _ray() -> Any:
    """Import Ray, or say in one line how to get it (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise LooptreeError("cluster.backend = \"ray\" needs Ray: pip install \"looptree[ray]\"") from None
    return ray


# --------------------------------------------------------------------------------------------
# Versions: a worker must run the engine's software


def local_versions() -> dict[str, str | None]:
    """looptree, Python, torch and the CUDA torch was built for, read without importing torch."""

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = None
    with contextlib.suppress(Exception):
        text = Path(str(importlib.metadata.distribution("torch").locate_file("torch/version.py"))).read_text()
        found = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        cuda = found.group(1) if found else None
    return {"looptree": dist("looptree"), "python": platform.python_version(), "torch": dist("torch"), "cuda": cuda}


def version_difference(engine: Mapping[str, Any], worker: Mapping[str, Any]) -> str | None:
    """The first difference as words ("torch 2.3.0 there, 2.4.1 here"), or None when they agree."""
    for key in ("looptree", "python", "torch", "cuda"):
        if engine.get(key) != worker.get(key):
            return f"{key} {worker.get(key) or 'missing'} there, {engine.get(key) or 'missing'} here"
    return None


# --------------------------------------------------------------------------------------------
# The actor (a plain class: ray.remote is applied when the executor starts, so importing this
# module never needs Ray)


def _git(args: list[str], cwd: Path, data: bytes | None = None) -> bytes:
    """A git call on the worker (the actor runs it in a thread); raises with git's own words."""
    done = subprocess.run(["git", *args], cwd=cwd, input=data, capture_output=True, timeout=GIT_TIMEOUT_S,
                          check=False)
    if done.returncode != 0:
        raise LooptreeError(f"git {args[0]} failed on the worker: {done.stderr.decode(errors='replace').strip()[:300]}")
    return done.stdout


def _remove_stale_bases() -> None:
    """Drop the folders of workers that died without shutting down (killed engine, lost node)."""
    for path in Path(tempfile.gettempdir()).glob("looptree-worker-*-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class _Mirror:
    """One file a running command writes that the engine keeps a live copy of.

    A file in the candidate's worktree (``root`` and ``rel`` set: the metrics CSV) is opened
    beneath the worktree without following a link, non-blocking, and only when it is a regular
    file (``safefiles.open_beneath``): a symlink the candidate planted there would otherwise make
    the worker ship the file it points to (the worker's keys, another run's files) back to the
    engine as "metrics", and a FIFO would block the actor. ``refused`` then says why, once."""

    path: Path
    offset: int = 0
    inode: int | None = None
    root: Path | None = None
    rel: str | None = None
    refused: str = ""


@dataclass
class _Job:
    mirrors: dict[str, _Mirror] = field(default_factory=dict)


class BenchWorker:
    """One bench slot of the cluster (one GPU, or ``cpus_per_bench`` CPUs), alive for the whole run.

    It holds a bare git mirror, one worktree per checkout a lease asks for, and the commands it
    runs; every method is bounded and never leaves a process behind.
    """

    def __init__(self, engine_versions: dict[str, Any], sandbox_spec: dict[str, Any] | None,
                 job_prefix: str) -> None:
        self.engine_versions = engine_versions
        self.job_prefix = job_prefix
        _remove_stale_bases()
        self.base = Path(tempfile.mkdtemp(prefix=f"looptree-worker-{os.getpid()}-"))
        self.mirror = self.base / "mirror.git"
        _git(["init", "-q", "--bare", str(self.mirror)], self.base)
        self.jobs: dict[str, _Job] = {}
        self.leases: dict[str, dict[str, Path]] = {}
        self.gpu = self._gpu_index()
        self.problem: str | None = None
        self.orphans_killed = kill_jobs_with_prefix(job_prefix)  # a dead engine's benches, first
        self.identity = self._identity()
        self.sandbox, why = self._sandbox(sandbox_spec)
        self.problem = why
        diff = version_difference(engine_versions, local_versions())
        if diff:
            self.problem = diff

    # -- set-up ----------------------------------------------------------------------------
    @staticmethod
    def _gpu_index() -> int | None:
        import ray

        ids = ray.get_gpu_ids()
        return int(ids[0]) if ids else None

    def _identity(self) -> Worker:
        import ray

        name, uuid = device_identity(self.gpu)
        return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "device": name, "uuid": uuid}

    def _sandbox(self, spec: dict[str, Any] | None) -> tuple[Any, str | None]:
        """The worker's own containment, built like the engine's (None when the engine has none)."""
        if spec is None:
            return None, None
        from looptree.engine.evaluation.sandbox import Sandbox, find_bwrap, gpu_device_nodes, probe

        bwrap, source = find_bwrap()
        why = source if bwrap is None else probe(bwrap)
        if why is not None or bwrap is None:
            return None, f"cannot sandbox commands here ({why}) while the engine does"
        nodes = ((self.gpu, tuple(gpu_device_nodes(None, self.gpu))),) if self.gpu is not None else ()
        uuids = ((self.gpu, self.identity["uuid"]),) if self.gpu is not None and self.identity["uuid"] else ()
        return Sandbox(bwrap=bwrap, network=bool(spec.get("network")), hide=(str(self.base),),
                       writable=tuple(spec.get("writable", ())), tmp_size_mb=int(spec.get("tmp_size_mb", 2048)),
                       gpu_nodes=nodes, gpu_uuids=uuids), None

    async def hello(self) -> dict[str, Any]:
        """Who this worker is and whether it may serve (``problem`` says why not)."""
        return {"worker": self.identity, "problem": self.problem, "versions": local_versions(),
                "orphans_killed": self.orphans_killed, "pid": os.getpid()}

    # -- code --------------------------------------------------------------------------------
    async def missing(self, commits: list[str]) -> list[str]:
        """The commits this worker's mirror does not have yet."""
        def check() -> list[str]:
            lacking = []
            for commit in commits:
                done = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=self.mirror,
                                      capture_output=True, timeout=GIT_TIMEOUT_S, check=False)
                if done.returncode != 0:
                    lacking.append(commit)
            return lacking
        return await asyncio.to_thread(check)

    async def receive(self, bundle: bytes) -> None:
        """Fetch a git bundle into the mirror (its ref keeps the commit from garbage collection)."""
        def fetch() -> None:
            path = self.base / f"incoming-{uuidlib.uuid4().hex}.bundle"
            path.write_bytes(bundle)
            try:
                _git(["fetch", "-q", str(path), "refs/looptree/*:refs/looptree/*"], self.mirror)
            finally:
                path.unlink(missing_ok=True)
        await asyncio.to_thread(fetch)

    async def checkout(self, lease: str, key: str, commit: str, absent: list[str]) -> str:
        """A worktree of ``commit`` for this lease (one per engine-side checkout; kept for the lease).

        ``absent``: tracked files the engine's checkout does not have (hidden files it removed,
        ``AccessPolicy.drop_hidden``): removed here too, so a candidate never reads them here.
        """
        trees = self.leases.setdefault(lease, {})
        if key in trees:
            return str(trees[key])
        path = self.base / "leases" / lease / f"wt{len(trees)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_git, ["worktree", "add", "-q", "--detach", str(path), commit], self.mirror)
        root = os.path.realpath(path)
        for rel in absent:
            target = os.path.realpath(os.path.join(root, rel))
            if target.startswith(root + os.sep):
                with contextlib.suppress(OSError):
                    os.unlink(target)
        trees[key] = path
        return str(path)

    async def release(self, lease: str) -> None:
        """Drop a lease's worktrees, private HOMEs and caches (they can be large)."""
        self.leases.pop(lease, None)
        await asyncio.to_thread(shutil.rmtree, self.base / "leases" / lease, True)
        with contextlib.suppress(LooptreeError, subprocess.TimeoutExpired):
            await asyncio.to_thread(_git, ["worktree", "prune"], self.mirror)

    # -- commands ----------------------------------------------------------------------------
    async def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Run one command through ``procs.run_command``; the result plus the mirrors' last bytes."""
        cwd = Path(spec["cwd"])
        job_tag = spec["job_tag"]
        log_path = self.base / "logs" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', job_tag)}-{uuidlib.uuid4().hex[:6]}.log"
        job = _Job({"log": _Mirror(log_path), **self._mirrors(cwd, spec.get("mirrors", {}))})
        self.jobs[job_tag] = job
        env = dict(spec["env"])
        if self.gpu is not None:  # the GPU Ray gave this actor, whatever the engine's slots said
            env.update({"CUDA_VISIBLE_DEVICES": str(self.gpu), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
        private = self.base / "leases" / spec["lease"] / "private" / spec["private"] if spec.get("private") else None
        from looptree.gpu.devices.locks import gpu_key, hold_async

        # The machine-wide lock on this host's GPU (gpu/devices/locks.py, keyed by host and UUID): a local
        # looptree on this host waits for the worker's bench and the other way round.
        key = gpu_key(self.identity["uuid"], self.gpu) if self.gpu is not None else None
        try:
            async with hold_async(key, f"looptree Ray worker {os.getpid()} job {job_tag}"):
                result = await run_command(spec["command"], cwd=cwd, env=env, timeout=spec["timeout"],
                                           log_path=log_path, job_tag=job_tag, limits=spec["limits"],
                                           sandbox=self.sandbox, private_dir=private, device=self.gpu,
                                           **spec.get("extra", {}))
            chunks = self._drain(job)
        finally:
            self.jobs.pop(job_tag, None)
            with contextlib.suppress(OSError):
                log_path.unlink()
        refused = "; ".join(m.refused for m in job.mirrors.values() if m.refused)
        note = "; ".join(x for x in (result.note, refused) if x)
        return {"rc": result.rc, "timed_out": result.timed_out, "cancelled": result.cancelled,
                "duration_s": result.duration_s, "tail": result.tail, "note": note,
                "cut_bytes": result.cut_bytes, "chunks": chunks}

    @staticmethod
    def _mirrors(cwd: Path, wanted: Mapping[str, str]) -> dict[str, _Mirror]:
        """The worktree files a command's bytes are shipped from, each removed first (the engine
        removed its copy: a bench starts from nothing) without following a link on the way."""
        mirrors: dict[str, _Mirror] = {}
        for name, rel in wanted.items():
            inside = relative_beneath(cwd, rel)
            if inside is None:
                continue  # only files of the worktree are mirrored (the engine computed rel inside it)
            with contextlib.suppress(OSError, UnsafePath):  # UnsafePath: a folder on the way is a link
                unlink_beneath(cwd, inside)
            mirrors[name] = _Mirror(cwd / inside, root=cwd, rel=inside)
        return mirrors

    @staticmethod
    def _drain(job: _Job) -> list[tuple[str, bool, bytes]]:
        """New bytes of each mirrored file: (name, starts over, bytes). A file that shrank or was
        replaced starts over (the engine rewrites its copy, as a local rewrite would look)."""
        out: list[tuple[str, bool, bytes]] = []
        for name, mirror in job.mirrors.items():
            try:
                fd = _open_mirror(mirror)
            except UnsafePath as exc:
                if not mirror.refused:
                    mirror.refused = f"{name} file {exc}"  # shown through the evaluator's printable()
                continue  # never read through it; the engine's copy gets nothing from it
            except OSError:
                continue
            if fd is None:
                continue  # not written yet
            try:
                with os.fdopen(fd, "rb") as fh:
                    st = os.fstat(fh.fileno())
                    reset = (mirror.inode is not None and st.st_ino != mirror.inode) or st.st_size < mirror.offset
                    if reset:
                        mirror.offset = 0
                    mirror.inode = st.st_ino
                    fh.seek(mirror.offset)
                    data = fh.read(max(0, st.st_size - mirror.offset))
            except OSError:
                continue
            mirror.offset += len(data)
            if data or reset:
                out.append((name, reset, data))
        return out

    async def poll(self, job_tag: str) -> list[tuple[str, bool, bytes]]:
        """What the running command wrote since the last poll (nothing once it has finished)."""
        job = self.jobs.get(job_tag)
        return self._drain(job) if job is not None else []

    async def kill(self, job_tag: str) -> int:
        """Kill one command's whole tree (Ray's cancel cannot stop a running actor call)."""
        return await asyncio.to_thread(kill_job, job_tag)

    async def kill_prefix(self, prefix: str) -> int:
        """Kill every command of a run on this worker's host (run end, resume)."""
        return await asyncio.to_thread(kill_jobs_with_prefix, prefix)

    async def running(self) -> list[str]:
        return list(self.jobs)

    async def shutdown(self) -> int:
        """Kill everything of the run, drop every worktree and the mirror; the actor may then go."""
        killed = await asyncio.to_thread(kill_jobs_with_prefix, self.job_prefix)
        await asyncio.to_thread(shutil.rmtree, self.base, True)
        return killed


def _open_mirror(mirror: _Mirror) -> int | None:
    """A read-only fd of a mirrored file, None when absent; ``UnsafePath`` for a link, FIFO or
    device. A worktree file is walked beneath its worktree; the worker's own log (outside any
    worktree) is opened without following a link and non-blocking, and must be a regular file."""
    if mirror.root is not None and mirror.rel is not None:
        return open_beneath(mirror.root, mirror.rel)
    try:
        fd = os.open(mirror.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnsafePath(f"{mirror.path.name} cannot be opened ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{mirror.path.name} is not a regular file")
    return fd


def _sweep_node(prefix: str) -> tuple[str, int]:
    """A Ray task pinned to one node: kill orphaned commands of a run there (resume)."""
    return socket.gethostname(), kill_jobs_with_prefix(prefix)


# --------------------------------------------------------------------------------------------
# The engine side


async def _git_here(args: list[str], cwd: Path, stdin: bytes | None = None) -> bytes:
    """A bounded git call by the engine (async: never blocks the event loop)."""
    proc = await asyncio.create_subprocess_exec("git", *args, cwd=cwd, stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), GIT_TIMEOUT_S)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise LooptreeError(f"git {args[0]} failed: {err.decode(errors='replace').strip()[:300]}")
    return out


async def make_bundle(repo_dir: Path, commit: str, have: list[str]) -> bytes:
    """A v2 git bundle of ``commit`` holding only the objects not reachable from ``have``.

    Written by hand (header + ``pack-objects``) because ``git bundle create`` wants a ref and the
    engine must not add refs to the user's repository.
    """
    head = "# v2 git bundle\n" + "".join(f"-{h}\n" for h in have) + f"{commit} refs/looptree/{commit}\n\n"
    revs = f"{commit}\n" + "".join(f"^{h}\n" for h in have)
    pack = await _git_here(["pack-objects", "--stdout", "--revs", "-q"], repo_dir, revs.encode())
    return head.encode() + pack


async def _reachable(address: str | None, timeout: float = 10.0) -> None:
    """Fail in one line when ``host:port`` does not answer (``ray.init`` would retry for minutes)."""
    if not address or address in ("auto", "local"):
        return
    found = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address.strip())
    if found is None:
        raise LooptreeError(f"cluster.address = {address!r}: expected \"host:port\", \"ray://host:port\" or \"auto\"")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(found.group(1), int(found.group(2))), timeout)
    except (OSError, TimeoutError) as exc:
        raise LooptreeError(f"cannot reach the Ray cluster at {address} (cluster.address): "
                            f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else 'no answer'}") from None
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


@dataclass
class _Slot:
    actor: Any
    worker: Worker
    pid: int
    shipped: list[str] = field(default_factory=list)  # commits the mirror has (bundle prerequisites)
    dead: str | None = None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    """Ray's error text without its colours and its ``ray::Actor.method() (pid=…)`` banner."""
    lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not line.startswith("ray::")]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _lost(slot: _Slot, exc: BaseException) -> str:
    first = _first_line(exc)
    w = slot.worker
    return f"looptree: the Ray worker on {w['host']} (node {str(w['node'])[:12]}, {w['device']}) was lost: {first}"


class _TickFailed(Exception):
    """Carries an exception the evaluator's tick hook raised, apart from the worker's own failures."""

    def __init__(self, original: Exception) -> None:
        super().__init__(str(original))
        self.original = original


class RayLease:
    """Every stage of one node, on one worker actor and its device."""

    def __init__(self, executor: RayExecutor, slot: _Slot) -> None:
        self.executor = executor
        self.slot = slot
        self.worker = dict(slot.worker)
        self.name = uuidlib.uuid4().hex[:12]

    async def _call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        ref = getattr(self.slot.actor, method).remote(*args)
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)

    async def _checkout(self, cwd: Path) -> Path:
        """The worker's path for the engine's ``cwd``: its commit shipped and checked out there."""
        root = Path((await _git_here(["rev-parse", "--show-toplevel"], cwd)).decode().strip())
        commit = (await _git_here(["rev-parse", "HEAD"], cwd)).decode().strip()
        if await self._call("missing", [commit]):
            have = self.slot.shipped[-8:]  # the worker has these: the bundle carries only what is new
            bundle = await make_bundle(root, commit, have)
            ref = await asyncio.to_thread(_ray().put, bundle)
            await self._call("receive", ref, timeout=CALL_TIMEOUT_S + len(bundle) / 1e6)
            self.slot.shipped.append(commit)
        absent = [p for p in (await _git_here(["ls-files", "--deleted", "-z"], root)).decode().split("\0") if p]
        remote_root = Path(await self._call("checkout", self.name, f"{root}@{commit}", commit, absent))
        return remote_root / Path(os.path.relpath(os.path.realpath(cwd), os.path.realpath(root)))

    async def run(self, command: str, **options: Any) -> ProcResult:
        """``run_command(command, **options)`` on the lease's worker; the log and the metrics file
        are mirrored into the engine's ``log_path`` and ``cwd`` as they grow."""
        options = dict(options)
        cwd, log_path = Path(options.pop("cwd")), Path(options.pop("log_path"))
        env: Mapping[str, str] = options.pop("env")
        timeout: float = options.pop("timeout")
        job_tag: str = options.pop("job_tag")
        limits: Limits = options.pop("limits", None) or Limits()
        on_tick: Callable[[], Awaitable[None]] | None = options.pop("on_tick", None)
        private_dir = options.pop("private_dir", None)
        for local_only in ("sandbox", "device", "tick_interval"):  # the worker has its own
            options.pop(local_only, None)
        started = time.monotonic()
        if self.slot.dead:
            return self._failed(log_path, started, self.slot.dead)
        try:
            remote_cwd = await self._checkout(cwd)
        except LooptreeError as exc:  # the commit cannot be shipped or checked out: this stage fails
            return self._failed(log_path, started, f"looptree: {exc}")
        except Exception as exc:  # noqa: BLE001 - the actor died, hung, or its git failed
            if self.executor._is_actor_error(exc) or isinstance(exc, TimeoutError):
                return self._failed(log_path, started, self.executor._mark_dead(self.slot, exc))
            return self._failed(log_path, started, f"looptree: the code did not reach the Ray worker on "
                                                   f"{self.worker['host']}: {_first_line(exc)}", "")
        local_root, remote_root = os.path.realpath(cwd), str(remote_cwd)
        remote_env = {k: v.replace(local_root, remote_root).replace(str(cwd), remote_root) for k, v in env.items()}
        local_files: dict[str, Path] = {"log": log_path}
        mirrors: dict[str, str] = {}
        metrics = env.get("LOOPTREE_METRICS")
        if metrics:
            rel = os.path.relpath(os.path.realpath(metrics), local_root)
            if not rel.startswith(".."):
                mirrors["metrics"] = rel
                local_files["metrics"] = Path(metrics)
        private = Path(private_dir).name if private_dir is not None else None
        extra = {k: ([str(x).replace(local_root, remote_root) for x in v] if isinstance(v, (list, tuple)) else v)
                 for k, v in options.items()}  # e.g. protect=: paths in the engine's checkout
        spec = {"command": command, "cwd": remote_root, "env": remote_env, "timeout": timeout, "job_tag": job_tag,
                "limits": replace(limits, cgroup_parent=None), "mirrors": mirrors, "private": private, "lease": self.name,
                "extra": extra}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fut = asyncio.wrap_future(self.slot.actor.run.remote(spec).future())
        self.executor._running[job_tag] = self.slot
        try:
            answer = await self._follow(fut, job_tag, local_files, timeout, on_tick)
        except _TickFailed as failed:  # the evaluator's hook stopped the bench: kill it there, re-raise
            await self._stop(fut, job_tag)
            raise failed.original from None
        except asyncio.CancelledError:  # stop, kill, prune: the actor kills the tree on its host
            await self._stop(fut, job_tag)
            raise
        except Exception as exc:  # noqa: BLE001 - the worker died, hung or broke: this stage fails
            if self.executor._is_actor_error(exc) or isinstance(exc, TimeoutError):
                return self._failed(log_path, started, self.executor._mark_dead(self.slot, exc, job_tag))
            await self._stop(fut, job_tag)  # the worker's call itself failed: it lives on
            return self._failed(log_path, started, f"looptree: the Ray worker on {self.worker['host']} could not "
                                                   f"run the command: {_first_line(exc)}", "")
        finally:
            self.executor._running.pop(job_tag, None)
        self._apply(answer["chunks"], local_files)
        return ProcResult(answer["rc"], answer["timed_out"], answer["cancelled"], answer["duration_s"], log_path,
                          answer["tail"], answer["note"], answer["cut_bytes"])

    async def _follow(self, fut: asyncio.Future[Any], job_tag: str, local_files: dict[str, Path], timeout: float,
                      on_tick: Callable[[], Awaitable[None]] | None) -> dict[str, Any]:
        """Poll the worker while the command runs, mirroring its files and calling the tick hook."""
        deadline = time.monotonic() + timeout + HANG_GRACE_S
        while not fut.done():
            await asyncio.wait({fut}, timeout=self.executor.poll_interval)
            if fut.done():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer {HANG_GRACE_S:g} s past the command's timeout")
            self._apply(await self._call("poll", job_tag), local_files)
            if on_tick is not None:
                try:
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                        await on_tick()
                except Exception as exc:
                    raise _TickFailed(exc) from exc
        return fut.result()

    async def _stop(self, fut: asyncio.Future[Any], job_tag: str) -> None:
        """Have the actor kill the command's tree; wait (bounded) for its call to end."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self._call("kill", job_tag, timeout=15.0))
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(fut), 15.0)

    @staticmethod
    def _apply(chunks: list[tuple[str, bool, bytes]], files: dict[str, Path]) -> None:
        """Append (or, for a file that started over, rewrite) the engine's copies."""
        for name, reset, data in chunks:
            path = files.get(name)
            if path is None:
                continue
            with open(path, "wb" if reset and name != "log" else "ab") as fh:
                fh.write(data)

    def _failed(self, log_path: Path, started: float, reason: str, note: str = "worker lost") -> ProcResult:
        """A stage that could not run (or finish) on the worker: its reason goes in the log too."""
        with contextlib.suppress(OSError):
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as fh:
                fh.write(reason + "\n")
        return ProcResult(None, False, False, time.monotonic() - started, log_path, reason, note)


class RayExecutor:
    """Runs every stage on a pool of ``BenchWorker`` actors (one per bench slot of the cluster)."""

    name = "ray"

    def __init__(self, section: Any, *, sandbox: Any = None, say: Callable[[str], None] | None = None,
                 versions: dict[str, Any] | None = None) -> None:
        self.section = section
        self.versions = versions or local_versions()  # what every worker must run too
        self.sandbox = sandbox
        self.say = say or (lambda text: None)
        self.slots: list[_Slot] = []
        self.refused: list[str] = []
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        self._running: dict[str, _Slot] = {}
        self._prefix = ""
        self._owns_ray = False
        self._replacing: set[asyncio.Task[Any]] = set()
        self._actor_cls: Any = None
        self.orphans_killed = 0
        self.poll_interval = 0.25  # how often live rows are fetched while a command runs

    # -- life cycle --------------------------------------------------------------------------
    async def start(self, job_prefix: str) -> int:
        """Connect, sweep every node for orphans of this run, start the workers, refuse misfits."""
        ray = _ray()
        self._prefix = job_prefix
        await _reachable(self.section.address)
        if not ray.is_initialized():
            address = self.section.address or None
            try:
                await asyncio.to_thread(ray.init, address=address, include_dashboard=False, log_to_driver=False,
                                        configure_logging=False)
            except Exception as exc:  # noqa: BLE001 - one line for the user, not Ray's traceback
                raise LooptreeError(f"cannot reach the Ray cluster at {address or 'auto'} (cluster.address): "
                                    f"{_first_line(exc)}") from None
            self._owns_ray = True
        self.orphans_killed = await self._sweep(job_prefix)
        count = self._capacity(ray)
        if count < 1:
            raise LooptreeError(f"the Ray cluster has no room for one bench ({self._needs()}); "
                                f"cluster resources: {ray.cluster_resources()}")
        self._actor_cls = ray.remote(BenchWorker)
        made = await asyncio.gather(*(self._spawn() for _ in range(count)), return_exceptions=True)
        for item in made:
            if isinstance(item, BaseException):
                self.refused.append(f"a Ray worker could not start: {str(item).strip().splitlines()[0][:200]}")
        for line in self.refused:
            self.say(line)
        if not self.slots:
            raise LooptreeError(self.refused[0] if self.refused else "no Ray worker could start")
        return self.orphans_killed

    def _needs(self) -> str:
        s = self.section
        return f"gpus_per_bench={s.gpus_per_bench}, cpus_per_bench={s.cpus_per_bench}" + (
            f", accelerator_type={s.accelerator_type}" if s.accelerator_type else "")

    def _capacity(self, ray: Any) -> int:
        """How many bench slots the cluster has room for (``cluster.workers`` caps it)."""
        total = ray.cluster_resources()
        s = self.section
        fits = []
        if s.gpus_per_bench > 0:
            fits.append(int(total.get("GPU", 0) // s.gpus_per_bench))
        if s.cpus_per_bench > 0:
            fits.append(int(total.get("CPU", 0) // s.cpus_per_bench))
        if s.accelerator_type:
            fits.append(int(total.get(f"accelerator_type:{s.accelerator_type}", 0) * 1000))
        room = min(fits) if fits else 1
        return min(room, s.workers) if s.workers else room

    async def _spawn(self) -> _Slot | None:
        """Start one worker actor and admit it (or refuse it with one line)."""
        ray = _ray()
        s = self.section
        options: dict[str, Any] = {"num_cpus": s.cpus_per_bench, "num_gpus": s.gpus_per_bench,
                                   "max_restarts": 0, "max_concurrency": 64}
        if s.accelerator_type:
            options["accelerator_type"] = s.accelerator_type
        spec = None
        if self.sandbox is not None:
            spec = {"network": self.sandbox.network, "writable": list(self.sandbox.writable),
                    "tmp_size_mb": self.sandbox.tmp_size_mb}
        actor = self._actor_cls.options(**options).remote(self.versions, spec, self._prefix)
        try:
            info = await asyncio.wait_for(asyncio.wrap_future(actor.hello.remote().future()), START_TIMEOUT_S)
        except BaseException:
            with contextlib.suppress(Exception):
                ray.kill(actor)
            raise
        w = info["worker"]
        if info["problem"]:
            self.refused.append(f"Ray worker on {w['host']} (node {str(w['node'])[:12]}) refused: {info['problem']}")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(actor.shutdown.remote().future()), CALL_TIMEOUT_S)
            ray.kill(actor)
            return None
        self.orphans_killed += int(info.get("orphans_killed") or 0)
        slot = _Slot(actor, w, int(info["pid"]))
        self.slots.append(slot)
        self._free.put_nowait(slot)
        return slot

    async def _sweep(self, prefix: str) -> int:
        """Kill orphans of this run on every alive node (a resumed run's first act)."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        sweep = ray.remote(num_cpus=0)(_sweep_node)
        refs = [sweep.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(prefix)
                for n in ray.nodes() if n.get("Alive")]
        total = 0
        for ref in refs:
            with contextlib.suppress(Exception):
                _, killed = await asyncio.wait_for(asyncio.wrap_future(ref.future()), CALL_TIMEOUT_S)
                total += killed
        return total

    @staticmethod
    def _is_actor_error(exc: BaseException) -> bool:
        import ray.exceptions

        return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                                ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError))

    def _mark_dead(self, slot: _Slot, exc: BaseException, job_tag: str | None = None) -> str:
        """Take a lost worker out of the pool, start a replacement, say so; return the reason.

        The lost command's processes may have outlived their worker (a child that left the
        group, uncontained): every alive node is swept for its tag.
        """
        if job_tag:
            sweep = asyncio.ensure_future(self._sweep(job_tag))
            self._replacing.add(sweep)
            sweep.add_done_callback(self._replacing.discard)
        if slot.dead:
            return slot.dead
        slot.dead = _lost(slot, exc)
        self.say(slot.dead)
        with contextlib.suppress(Exception):
            _ray().kill(slot.actor)
        if slot in self.slots:
            self.slots.remove(slot)
        task = asyncio.ensure_future(self._replace())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)
        return slot.dead

    async def _replace(self) -> None:
        try:
            await self._spawn()
        except Exception as exc:  # noqa: BLE001 - the cluster shrank: run on with the workers left
            self.say(f"a lost Ray worker could not be replaced: {str(exc).strip().splitlines()[0][:200]}")

    @contextlib.asynccontextmanager
    async def lease(self, holder: str, device: int | None = None) -> AsyncIterator[RayLease]:
        """Wait for a free worker; every stage of ``holder`` runs there; give it back after."""
        while True:
            if not self.slots and not self._replacing and self._free.empty():
                raise LooptreeError("no Ray worker is left to run benches on (every one was lost)")
            try:
                slot = await asyncio.wait_for(self._free.get(), 1.0)
            except TimeoutError:
                continue
            if not slot.dead:
                break
        lease = RayLease(self, slot)
        try:
            yield lease
        finally:
            if not slot.dead:
                with contextlib.suppress(Exception):
                    await asyncio.shield(lease._call("release", lease.name))
                self._free.put_nowait(slot)

    def workers(self) -> list[Worker]:
        return [dict(s.worker) for s in self.slots]

    async def kill(self, job_tag: str) -> int:
        """Kill one command wherever it runs (``looptree ctl kill`` of a node on the cluster)."""
        slot = self._running.get(job_tag)
        if slot is None or slot.dead:
            return 0
        with contextlib.suppress(Exception):
            return int(await asyncio.wait_for(asyncio.wrap_future(slot.actor.kill.remote(job_tag).future()), 15.0))
        return 0

    async def close(self) -> None:
        """Kill every command of the run on every worker, then let the actors go."""
        ray = _ray()
        for task in list(self._replacing):
            task.cancel()
        for slot in list(self.slots):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(slot.actor.shutdown.remote().future()), CALL_TIMEOUT_S)
            with contextlib.suppress(Exception):
                ray.kill(slot.actor)
        self.slots.clear()
        if self._prefix and ray.is_initialized():
            await self._sweep(self._prefix)
        if self._owns_ray:
            await asyncio.to_thread(ray.shutdown)
            self._owns_ray = False
