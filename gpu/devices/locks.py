"""One benchmark per device per machine, across processes: a lock file per device.

Why: two ``looptree run``s (or a run and a ``looptree kernelbench --eval-only``) on one machine
would otherwise time at the same moment on the same GPU (or the same CPU cores), and each
would spoil the other's numbers without either knowing. The in-process ``DeviceSlots`` cannot
see the other process; an ``fcntl`` lock on a file can, and the kernel drops it when its holder
dies (no stale lock after a crash or SIGKILL).

Keys: ``gpu-<host>-<GPU UUID>`` (the UUID, not the index: ``CUDA_VISIBLE_DEVICES`` renumbers
devices per process), and ``cpu-<host>`` for CPU benches when ``bench.concurrency`` is 1 (with
more, the user has said CPU benches may overlap). The host is in every key, so a lock folder
on a filesystem shared by a cluster never makes a bench wait for another host's.

Folder: ``$LOOPTREE_LOCK_DIR``, else ``$XDG_RUNTIME_DIR/looptree-locks``, else
``/tmp/looptree-locks``. The holder writes one line into its file (pid, what, since) so the
waiter can say whom it waits for, and ``looptree doctor`` can list the locks.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

POLL_S = 0.2
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def lock_dir() -> Path:
    """Where the lock files live (created on first use, mode 1777 under /tmp so any user can lock)."""
    explicit = os.environ.get("LOOPTREE_LOCK_DIR")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "looptree-locks"
    return Path("/tmp/looptree-locks")


def host() -> str:
    return _SAFE.sub("_", socket.gethostname() or "localhost")


def gpu_key(uuid: str | None, index: int) -> str:
    """``gpu-<host>-<uuid>``; without a UUID (no NVML) the index stands in."""
    ident = uuid or f"index{index}"
    return f"gpu-{host()}-{_SAFE.sub('_', ident)}"


def cpu_key() -> str:
    return f"cpu-{host()}"


def key_for(device: int | None, *, uuid: str | None = None, concurrency: int = 1) -> str | None:
    """The lock a bench on ``device`` (None: the CPU) must hold, or None when none is needed."""
    if device is None:
        return cpu_key() if concurrency == 1 else None
    return gpu_key(uuid, device)


def key_with_telemetry(device: int | None, telemetry: Any, concurrency: int = 1) -> str | None:
    """``key_for`` with the GPU's UUID read from a telemetry backend (the index when it has none)."""
    uuid = None
    if device is not None and telemetry is not None:
        try:
            uuid = telemetry.sample(device).uuid
        except Exception:  # noqa: BLE001 - telemetry is best effort; the index still keys the lock
            uuid = None
    return key_for(device, uuid=uuid, concurrency=concurrency)


def _path(key: str) -> Path:
    return lock_dir() / f"{_SAFE.sub('_', key)}.lock"


def _open(key: str) -> int:
    folder = lock_dir()
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        if str(folder).startswith("/tmp/"):
            try:
                os.chmod(folder, 0o1777)
            except OSError:
                pass
    return os.open(_path(key), os.O_RDWR | os.O_CREAT, 0o666)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode(errors="replace").strip() or "another process"
    except OSError:
        return "another process"


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _stamp(fd: int, owner: str) -> None:
    line = f"pid {os.getpid()} on {host()}: {owner} (since {time.strftime('%H:%M:%S')})\n"
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, line.encode())


class DeviceLock:
    """An exclusive, machine-wide hold on one device's lock file."""

    def __init__(self, key: str, owner: str) -> None:
        self.key = key
        self.owner = owner
        self._fd: int | None = None

    def try_acquire(self) -> str | None:
        """Take it now (None) or say who holds it (and leave it)."""
        fd = _open(self.key)
        if _try(fd):
            _stamp(fd, self.owner)
            self._fd = fd
            return None
        who = _holder(fd)
        os.close(fd)
        return who

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


@contextmanager
def hold(key: str | None, owner: str, *, on_wait: Callable[[str], None] | None = None,
         timeout: float | None = None) -> Iterator[None]:
    """Blocking: wait (telling ``on_wait`` once whom for) until the device is ours."""
    if key is None:
        yield
        return
    lock = DeviceLock(key, owner)
    told = False
    deadline = None if timeout is None else time.monotonic() + timeout
    while (who := lock.try_acquire()) is not None:
        if not told and on_wait is not None:
            on_wait(who)
            told = True
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"device lock {key} still held by {who} after {timeout:g} s")
        time.sleep(POLL_S)
    try:
        yield
    finally:
        lock.release()


@asynccontextmanager
async def hold_async(key: str | None, owner: str, *, on_wait: Callable[[str], Any] | None = None) -> AsyncIterator[None]:
    """The event-loop version: polls without blocking the loop (an ``flock`` wait would)."""
    if key is None:
        yield
        return
    lock = DeviceLock(key, owner)
    told = False
    while (who := lock.try_acquire()) is not None:
        if not told and on_wait is not None:
            on_wait(who)
            told = True
        await asyncio.sleep(POLL_S)
    try:
        yield
    finally:
        lock.release()


def describe_locks() -> list[tuple[str, str, bool]]:
    """(label, value, ok) per lock file of this host, for ``looptree doctor``: held ones say by whom."""
    folder = lock_dir()
    rows: list[tuple[str, str, bool]] = []
    if not folder.is_dir():
        return [("device locks", f"none yet ({folder})", True)]
    mine = host()
    for path in sorted(folder.glob("*.lock")):
        key = path.stem
        if key != f"cpu-{mine}" and not key.startswith(f"gpu-{mine}-"):
            continue  # another host's lock (a shared folder): never ours to wait for
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            rows.append((key, f"unreadable: {exc.strerror}", False))
            continue
        try:
            if _try(fd):
                fcntl.flock(fd, fcntl.LOCK_UN)
                rows.append((key, "free", True))
            else:
                rows.append((key, f"held by {_holder(fd)}", True))
        finally:
            os.close(fd)
    return rows or [("device locks", f"none on this host ({folder})", True)]
