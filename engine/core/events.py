"""The append-only event log: the single source of truth of a run.

Why plain `os.write` on an O_APPEND descriptor rather than aiofiles: an event is a few hundred
bytes, the write lands in the page cache in microseconds, and a thread hop per event would cost
more than the write. Each event is written (and therefore visible to readers and safe from a
`kill -9` of the engine) before the engine acts on it. `fsync=True` adds durability against power
loss at a cost per event.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looptree.engine.core.schema import check as schema_check
from looptree.engine.core.terminal import safe_value
from looptree.engine.errors import LooptreeError, RunLockedError

EVENTS_NAME = "events.jsonl"
TELEMETRY_NAME = "telemetry.jsonl"
"""GPU samples (one per device per second) live here, not in the event log: they would be most
of its lines, and every reader of the run's state (resume, tree, show, attach) would parse them."""
LOCK_NAME = "engine.lock"
READ_CHUNK = 1 << 20


def _last_line_start(fh: Any, size: int) -> int:
    """Offset where the last line begins (ignoring trailing newlines), reading backwards in chunks."""
    end = size
    fh.seek(max(0, end - 1))
    while end > 0:
        fh.seek(end - 1)
        if fh.read(1) != b"\n":
            break
        end -= 1
    pos, chunk = end, 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        fh.seek(start)
        data = fh.read(pos - start)
        idx = data.rfind(b"\n")
        if idx >= 0:
            return start + idx + 1
        pos = start
    return 0


def _truncate_torn_tail(path: Path) -> None:
    """A crash mid-write can leave a last line that is not a whole event: cut it so appends stay valid.

    The last line is read whole (it may be far longer than any chunk: a large agent reply), and
    only a line that does not parse is removed, so a valid event is never cut.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as fh:
        start = _last_line_start(fh, size)
        fh.seek(start)
        last = fh.read()
        try:
            json.loads(last)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if last.strip():
                fh.truncate(start)
                return
        if not last.endswith(b"\n"):
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")  # a whole event whose newline was lost: keep it


def write_line(fd: int, record: dict[str, Any]) -> None:
    """One JSON line, whole, on an O_APPEND descriptor (a short write is continued, never left torn)."""
    view = memoryview((json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode())
    while view:
        view = view[os.write(fd, view):]


def count_lines(path: Path) -> int:
    """Lines in a file, counted in chunks without parsing (after `_truncate_torn_tail`, one per event)."""
    count = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(READ_CHUNK):
                count += chunk.count(b"\n")
    except FileNotFoundError:
        return 0
    return count


class EventLog:
    """Writer side of `events.jsonl`. One per run directory, held by the engine that owns the lock.

    `seq` is the next event's number when the caller already folded the log (resume), which
    saves a pass over it; otherwise the complete lines are counted.
    """

    def __init__(self, run_dir: Path, *, fsync: bool = False, seq: int | None = None,
                 checked: bool = True) -> None:
        self.path = run_dir / EVENTS_NAME
        # A run's log is checked against the event schema (an experiment's log has its own words).
        self.checked = checked
        self._schema_problems: set[str] = set()
        self.fsync = fsync
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self._seq = count_lines(self.path) if seq is None else seq
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # In-process listeners (the state fold first, then printers) see each event once it is on disk.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        #: the event this writer appended last (a printer attached late starts from it, without
        #: reading the log back)
        self.last: dict[str, Any] | None = None

    @property
    def seq(self) -> int:
        return self._seq

    def append(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Write one event and return it. The write is complete when this returns.

        An event that does not match the schema raises in the test suite (strict mode); in a
        user's run it is still written, and the first such problem per type is said once in a
        `message`, so a bug in looptree never costs a run but is never silent either.
        """
        if self.checked:
            problem = schema_check(type_, fields)
            if problem is not None and type_ not in self._schema_problems:
                self._schema_problems.add(type_)
                self.append("message", text=f"internal: {problem} (please report this)")
        event = {"seq": self._seq, "ts": round(time.time(), 6), "type": type_, **fields}
        write_line(self._fd, event)
        if self.fsync:
            os.fsync(self._fd)
        self._seq += 1
        self.last = event
        for listener in self.listeners:
            listener(event)
        return event

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self.listeners.append(listener)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _skipped(raw: bytes, skip: frozenset[bytes]) -> bool:
    """True when the line's `type` is one of `skip`, judged from the bytes without parsing them.

    The writer puts `"type"` third (`{"seq":…,"ts":…,"type":"…"`), so its value sits in the
    first hundred bytes; a line written some other way is simply parsed.
    """
    head = raw[:120]
    return any(marker in head for marker in skip)


def iter_events(path: Path, *, skip_types: frozenset[str] = frozenset(),
                display: bool = False) -> Iterator[dict[str, Any]]:
    """Stream every complete event; a torn or garbled last line is skipped, a garbled middle line is an error.

    One line is held back at a time (a bad line is only forgiven when it is the last), so memory
    stays flat however long the log is. `skip_types` leaves those events out without parsing
    them (GPU samples in logs written before they had their own file). `display`: read for a
    viewer (`display_event`).
    """
    markers = frozenset(f'"type":"{name}"'.encode() for name in skip_types)
    try:
        fh = open(path, "rb", buffering=READ_CHUNK)
    except FileNotFoundError:
        return
    with fh:
        pending: tuple[int, bytes] | None = None
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            if pending is not None:
                event = _parse_line(path, *pending, last=False, display=display)
                if event is not None:
                    yield event
            pending = None if markers and _skipped(raw, markers) else (number, raw)
        if pending is not None:
            event = _parse_line(path, *pending, last=True, display=display)
            if event is not None:
                yield event


def _parse_line(path: Path, number: int, raw: bytes, *, last: bool, display: bool = False) -> dict[str, Any] | None:
    try:
        return display_event(raw) if display else json.loads(raw)
    except json.JSONDecodeError:
        if last:
            return None  # torn tail: the engine died mid-write
        raise LooptreeError(f"{path}: line {number} is not valid JSON (the event log is damaged)") from None


#: A raw line that may hold a control, format or non-ASCII character: JSON writes C0 controls as
#: `\\uXXXX`, `\\b`, `\\f` or `\\r`, and this writer keeps every other character as UTF-8 (DEL as is).
#: Only such lines are walked by `safe_value`, so a viewer pays for it on the rare line that needs it.
_MAY_NEED_ESCAPING = re.compile(rb"\\[ubfr]|[\x7f-\xff]")


def display_event(raw: bytes) -> dict[str, Any]:
    """One event for a viewer's eyes: its strings with control characters made visible.

    Viewers only (dashboard, replay): the engine's own fold reads the log as written, since a
    reply re-applied on resume must be byte for byte the one that was paid for.
    """
    event = json.loads(raw)
    return safe_value(event) if _MAY_NEED_ESCAPING.search(raw) else event


def read_events(path: Path) -> list[dict[str, Any]]:
    return list(iter_events(path))


class TelemetryLog:
    """Writer of `telemetry.jsonl`: GPU samples, one JSON line each, beside the event log.

    Samples carry `ts`, `type` ("gpu_sample"), `device` and `fields`, like the events they used to
    be, but no `seq`: they change no state that resume needs, so losing the last one to a crash
    costs nothing, and they never slow a fold of the run.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / TELEMETRY_NAME
        _truncate_torn_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, device: int, fields: dict[str, Any]) -> dict[str, Any]:
        sample = {"ts": round(time.time(), 6), "type": "gpu_sample", "device": device, "fields": fields}
        write_line(self._fd, sample)
        return sample

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def last_samples(run_dir: Path, limit_bytes: int = 1 << 20) -> list[dict[str, Any]]:
    """The newest GPU samples (from the last `limit_bytes` of telemetry.jsonl): what a viewer starts with."""
    return samples_and_offset(run_dir, limit_bytes)[0]


def samples_and_offset(run_dir: Path, limit_bytes: int = 1 << 20) -> tuple[list[dict[str, Any]], int]:
    """`last_samples`, and the offset just past the last complete line they were read from.

    A viewer tails the file from that offset: a sample appended while this read ran is then read
    once, by the tail, never twice (nor lost: a line cut by the writer is left to the tail).
    """
    path = run_dir / TELEMETRY_NAME
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(0, size - limit_bytes)
            fh.seek(start)
            data = fh.read(size - start)
    except FileNotFoundError:
        return [], 0
    complete = data.rfind(b"\n") + 1
    lines = data[:complete].split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first line is cut
    out = []
    for raw in lines:
        if raw.strip():
            try:
                out.append(display_event(raw))
            except json.JSONDecodeError:
                continue
    return out, start + complete


def iter_run(run_dir: Path) -> Iterator[dict[str, Any]]:
    """Events and GPU samples of a run in time order, for a viewer (replay): two sorted streams, merged."""
    import heapq

    def keyed(stream: Iterator[dict[str, Any]]) -> Iterator[tuple[float, int, dict[str, Any]]]:
        for index, item in enumerate(stream):
            yield float(item.get("ts", 0.0)), index, item

    events = keyed(iter_events(run_dir / EVENTS_NAME, display=True))
    samples = keyed(iter_events(run_dir / TELEMETRY_NAME, display=True))
    for _, _, item in heapq.merge(events, samples, key=lambda entry: (entry[0], entry[1])):
        yield item


@dataclass
class EventTail:
    """Incremental reader for viewers (attach, dashboard): returns complete new events since the last call,
    their text made safe for a terminal (`display_event`)."""

    path: Path
    offset: int = 0

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        # Advance only past complete lines: a torn tail may be cut and rewritten by a resume.
        self.offset += end + 1
        lines = data[: end + 1].split(b"\n")
        events = []
        for raw in lines:
            if raw.strip():
                try:
                    events.append(display_event(raw))
                except json.JSONDecodeError:
                    continue
        return events


class RunLock:
    """An exclusive flock on `engine.lock`: the kernel drops it when the engine dies, even by kill -9."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"run {self.path.parent.name} is already driven by {holder}; "
                f"use `looptree attach {self.path.parent}` to watch it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def is_held(run_dir: Path) -> bool:
        """True while some engine holds the run (attach uses it to tell 'live' from 'finished/crashed')."""
        path = run_dir / LOCK_NAME
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
