"""The metrics CSV protocol: what the project's bench command writes and how looptree reads it.

Contract (CONTRACT.md, "Metrics protocol"): the first column is the iteration count; every other
column is a metric whose name may say ``lower is better`` or ``higher is better`` (with neither
it is higher-is-better); priority runs left to right. The bench may write the file at the end
or append to it while it runs, so reading is incremental (``CsvTail``): the dashboard shows rows
as they arrive, and a half-written last line is never mistaken for a row.

Every way a file can be wrong raises ``MetricsError`` with a one-line message that names the
file, the row and the column, because that message becomes the node's failure reason (and the
fix agent's prompt). Rows are numbered from 1 for the first data row (the header is not a row).

Stdlib ``csv`` only: this runs on every tick of every benchmark, and pandas would cost more to
import than the whole harness spends here.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from looptree.engine.errors import MetricsError

__all__ = [
    "Aggregate",
    "CsvTail",
    "MetricSpec",
    "aggregate",
    "check_columns",
    "is_better",
    "parse_header",
    "priority_key",
    "read_metrics",
]


@dataclass(frozen=True)
class MetricSpec:
    """One metric column: its full header text, its bare name, and which way is better."""

    column: str  # exactly as in the header (stripped), e.g. "runtime_ms (lower is better)"
    name: str  # the column without the direction words, e.g. "runtime_ms"
    higher_is_better: bool


# --------------------------------------------------------------------------------------------
# Header


_DIR = r"(?P<dir>lower|higher)[\s_]+is[\s_]+better"
_DIR_RE = re.compile(_DIR, re.IGNORECASE)
# "(lower is better)" / "[higher is better]", with any space before it.
_BRACKETED_RE = re.compile(r"\s*[(\[]\s*" + _DIR + r"\s*[)\]]", re.IGNORECASE)
# ", lower is better" / " lower is better" / "_lower_is_better" at a word boundary.
_TRAILING_RE = re.compile(r"(?:\s*,\s*|[\s_]+)" + _DIR + r"\b", re.IGNORECASE)
_NAME_JUNK = " \t,;:-_"


def _parse_column(column: str) -> tuple[str, bool, bool]:
    """(name, higher_is_better, conflicting) for one metric column's header text."""
    directions = {m.group("dir").lower() for m in _DIR_RE.finditer(column)}
    name = _BRACKETED_RE.sub("", column)
    name = _TRAILING_RE.sub("", name)
    name = _DIR_RE.sub("", name)  # the phrase with nothing before it
    name = name.strip(_NAME_JUNK)
    return name, directions != {"lower"}, len(directions) > 1


def parse_header(header: list[str], *, source: str | None = None) -> list[MetricSpec]:
    """Metric specs for a header row; the first cell is the iteration column and is skipped.

    ``source`` (a file name) only makes the error messages say which file is wrong.
    """
    where = f"metrics file {source}" if source else "metrics header"
    cells = [c.strip() for c in header]
    if cells:
        cells[0] = cells[0].lstrip("\ufeff")  # a spreadsheet's byte-order mark
    if not cells or all(c == "" for c in cells):
        raise MetricsError(f"{where} has no header row")
    if len(cells) == 1:
        raise MetricsError(
            f"{where} has only the iteration column {cells[0]!r}; add at least one metric column"
        )
    specs: list[MetricSpec] = []
    seen_columns: set[str] = set()
    seen_names: dict[str, str] = {}
    for index, column in enumerate(cells[1:], start=2):
        if not column:
            raise MetricsError(f"{where}: header column {index} is empty")
        if column in seen_columns or column == cells[0]:
            raise MetricsError(f"{where}: duplicate column {column!r}")
        name, higher, conflicting = _parse_column(column)
        if conflicting:
            raise MetricsError(
                f"{where}: column {column!r} says both lower and higher is better"
            )
        if not name:
            raise MetricsError(f"{where}: column {column!r} has a direction but no metric name")
        if name in seen_names:
            raise MetricsError(
                f"{where}: columns {seen_names[name]!r} and {column!r} both name metric {name!r}"
            )
        seen_columns.add(column)
        seen_names[name] = column
        specs.append(MetricSpec(column=column, name=name, higher_is_better=higher))
    return specs


def check_columns(
    expected: list[MetricSpec], actual: list[MetricSpec], *, source: str = "metrics.csv"
) -> None:
    """Refuse a file that lacks a metric the baseline (or the first repeat) wrote.

    Extra columns are tolerated; a missing one would make nodes incomparable.
    """
    have = {s.column for s in actual}
    for spec in expected:
        if spec.column not in have:
            raise MetricsError(
                f"metrics file {source} is missing column {spec.column!r} (the baseline wrote it)"
            )


# --------------------------------------------------------------------------------------------
# Rows


def _parse_float(cell: str, where: str, row: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise MetricsError(
            f"{where}, row {row}, column {column!r}: {cell!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise MetricsError(
            f"{where}, row {row}, column {column!r}: {cell!r} is NaN or infinite"
        )
    return value


def _parse_iteration(cell: str, where: str, row: int, column: str) -> int:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not value.is_integer():
        raise MetricsError(
            f"{where}, row {row}: iteration {cell!r} (column {column!r}) is not an integer"
        )
    return int(value)


# Bounds on what one metrics file may cost the engine: a line (one row) is at most this long,
# a file at most this many rows, and a poll reads at most ``_CHUNK`` bytes at a time. A bench
# under test is hostile input: a 256 MiB field or a billion rows fails the node, never the run.
MAX_LINE_BYTES = 64 * 1024
MAX_ROWS = 100_000
_CHUNK = 1 << 20
_TAIL_CHECK = 256  # bytes compared on every poll to catch an in-place rewrite cheaply


class CsvTail:
    """Incrementally read a CSV that another process appends to.

    ``poll()`` returns the complete rows that arrived since the last call; a last line without
    its newline waits for the next poll (or ``finish()``). Handled: the file not existing yet,
    the header arriving late, and the file being rewritten. A bench that rewrites the whole file
    each iteration (``df.to_csv``) is followed seamlessly when the new content starts with what
    was already read; a file truncated or replaced by different content restarts the tail
    (``restarts`` counts it; ``specs``, ``iterations`` and ``rows`` then describe the new file
    only). A malformed row raises ``MetricsError`` now and on every later poll.

    Reading is bounded: the file is read in chunks, a line longer than ``MAX_LINE_BYTES`` (a
    "field" with no newline) or more than ``MAX_ROWS`` rows is a ``MetricsError``, and what was
    read is remembered as a length, a running hash and its last bytes, never kept whole.

    Every row carries the engine's own record of when it was seen (``arrived``: the
    ``time.monotonic()`` of the read that returned it) and where it ended in the file
    (``offsets``): evidence that the bench under test cannot write (see ``engine.evidence``).
    """

    def __init__(self, path: Path, *, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or self.path.name
        self.specs: list[MetricSpec] | None = None
        self.iterations: list[int] = []  # parallel to ``rows``
        self.rows: list[dict[str, float]] = []  # every row read so far, {column: value}
        self.arrived: list[float] = []  # parallel to ``rows``: monotonic time of the read
        self.offsets: list[int] = []  # parallel to ``rows``: byte offset just past the row
        self.restarts = 0
        self.reads = 0  # reads that returned at least one row
        self.seen = False  # the file has existed at some poll
        self._header: list[str] | None = None
        self._consumed_len = 0  # complete lines read so far, in bytes
        self._consumed_hash = hashlib.sha256()  # of those bytes
        self._consumed_tail = b""  # their last ``_TAIL_CHECK`` bytes
        self._ident: tuple[int, int] | None = None
        self._suspect = False  # the file shrank or vanished: verify before reading on
        self._error: MetricsError | None = None

    @property
    def _where(self) -> str:
        return f"metrics file {self.label}"

    @property
    def consumed(self) -> int:
        """Bytes of complete lines read so far (what the file held at the last read)."""
        return self._consumed_len

    def _restart(self) -> None:
        self.specs = None
        self._header = None
        self.iterations = []
        self.rows = []
        self.arrived = []
        self.offsets = []
        self._consumed_len = 0
        self._consumed_hash = hashlib.sha256()
        self._consumed_tail = b""
        self._error = None
        self._suspect = False
        self.restarts += 1

    def poll(self) -> list[dict[str, float]]:
        """New complete rows since the last poll (``[]`` while the file is absent)."""
        return self._read(final=False)

    def finish(self) -> list[dict[str, float]]:
        """The final read, including an unterminated last line; validates the file as a whole."""
        new = self._read(final=True)
        if not self.seen:
            raise MetricsError(f"bench command did not write {self.label}")
        if self._header is None:
            raise MetricsError(f"{self._where} is empty (no header row)")
        if not self.rows:
            raise MetricsError(f"{self._where} has a header but no rows")
        return new

    def size_now(self) -> int | None:
        """The file's size now (``None`` when it is gone): did anything write after the last read?"""
        try:
            return self.path.stat().st_size
        except OSError:
            return None

    # -- reading -------------------------------------------------------------------------

    def _read(self, final: bool) -> list[dict[str, float]]:
        now = time.monotonic()
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below; one open per poll
        except FileNotFoundError:
            if self._consumed_len:
                self._suspect = True  # deleted; it may be recreated
            if self._error is not None:
                raise self._error from None
            return []
        new: list[dict[str, float]] = []
        with f:
            self.seen = True
            st = os.fstat(f.fileno())
            ident = (st.st_dev, st.st_ino)
            if self._ident is not None and ident != self._ident:
                self._suspect = True
            self._ident = ident
            if self._consumed_len and not self._suspect and not self._last_bytes_match(f):
                self._suspect = True
            if self._suspect:
                if st.st_size < self._consumed_len and not final:
                    # Shorter than what we read: mid-rewrite, or truncated for good. Wait.
                    if self._error is not None:
                        raise self._error
                    return []
                if self._prefix_matches(f):
                    self._suspect = False  # rewritten with the same beginning: carry on
                else:
                    self._restart()
            if self._error is not None:
                raise self._error
            f.seek(self._consumed_len)
            pending = b""
            try:
                while True:
                    data = f.read(_CHUNK)
                    if not data:
                        break
                    pending += data
                    end = pending.rfind(b"\n") + 1
                    if end:
                        self._take(pending[:end], new, now)
                        pending = pending[end:]
                    if len(pending) > MAX_LINE_BYTES:
                        self._too_long()
                if final and pending:
                    self._take(pending, new, now)
            except MetricsError as exc:
                self._error = exc
                raise
        if new:
            self.reads += 1
        return new

    def _too_long(self) -> None:
        raise MetricsError(
            f"{self._where}, row {len(self.rows) + 1}: metrics field larger than {MAX_LINE_BYTES} bytes "
            "(a line that long is not a metrics row; the file was not read further)"
        )

    def _take(self, complete: bytes, new: list[dict[str, float]], now: float) -> None:
        """Parse complete lines, then count them as read (a bad line is an error for good)."""
        offset = self._consumed_len
        for line in complete.splitlines(keepends=True):
            offset += len(line)
            if len(line) > MAX_LINE_BYTES:
                self._too_long()
            row = self._parse_line(line)
            if row is not None:
                if len(self.rows) >= MAX_ROWS:
                    raise MetricsError(
                        f"{self._where} has more than {MAX_ROWS} rows (a metrics file is a summary, "
                        "not a log)"
                    )
                self._append_row(row, now, offset)
                new.append(row[1])
        self._consumed_len += len(complete)
        self._consumed_hash.update(complete)
        self._consumed_tail = (self._consumed_tail + complete)[-_TAIL_CHECK:]

    def _last_bytes_match(self, f: BinaryIO) -> bool:
        """Cheap check that the bytes already read are still there (catches in-place rewrites)."""
        n = self._consumed_len
        k = len(self._consumed_tail)
        return os.pread(f.fileno(), k, n - k) == self._consumed_tail

    def _prefix_matches(self, f: BinaryIO) -> bool:
        """Does the file still begin with every byte read so far? (hashed in bounded chunks)"""
        f.seek(0)
        digest = hashlib.sha256()
        left = self._consumed_len
        while left > 0:
            data = f.read(min(_CHUNK, left))
            if not data:
                return False
            digest.update(data)
            left -= len(data)
        return digest.digest() == self._consumed_hash.digest()

    def _parse_line(self, raw: bytes) -> tuple[int, dict[str, float]] | None:
        """(iteration, values) for a data line; None for a blank line or the header."""
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not text.strip():
            return None
        try:
            cells = next(csv.reader([text]))
        except (csv.Error, StopIteration) as exc:
            raise MetricsError(f"{self._where}, row {len(self.rows) + 1}: not valid CSV ({exc})") from None
        if self._header is None:
            self.specs = parse_header(cells, source=self.label)
            self._header = [c.strip().lstrip("\ufeff") for c in cells]
            return None
        return self._parse_row(cells)

    def _parse_row(self, cells: list[str]) -> tuple[int, dict[str, float]]:
        assert self._header is not None and self.specs is not None
        row_no = len(self.rows) + 1
        if len(cells) != len(self._header):
            raise MetricsError(
                f"{self._where}, row {row_no} has {len(cells)} cells but the header has "
                f"{len(self._header)}"
            )
        cells = [c.strip() for c in cells]
        iteration = _parse_iteration(cells[0], self._where, row_no, self._header[0])
        values = {
            spec.column: _parse_float(cell, self._where, row_no, spec.column)
            for spec, cell in zip(self.specs, cells[1:])
        }
        return iteration, values

    def _append_row(self, row: tuple[int, dict[str, float]], now: float, offset: int) -> None:
        self.iterations.append(row[0])
        self.rows.append(row[1])
        self.arrived.append(now)
        self.offsets.append(offset)


def read_metrics(path: Path, *, label: str | None = None) -> CsvTail:
    """Read a finished metrics file in one go (``looptree eval``, tests); raises MetricsError."""
    tail = CsvTail(path, label=label)
    tail.finish()
    return tail


# --------------------------------------------------------------------------------------------
# Aggregation and comparison


@dataclass
class Aggregate:
    """A node's metrics: one value per column, and how the repeats spread around it."""

    values: dict[str, float]
    # per column: n (repeats), median, min, max, q1, q3, stdev (sample; 0 for one repeat)
    spread: dict[str, dict[str, float]] = field(default_factory=dict)


def aggregate(rows_per_repeat: list[list[dict[str, float]]], specs: list[MetricSpec]) -> Aggregate:
    """Median of each repeat's rows, then the median over repeats.

    Why medians twice: a bench's first iterations are often warm-up and one repeat can be
    disturbed by a noisy neighbour; the median ignores both without a tuning knob.
    """
    if not rows_per_repeat:
        raise MetricsError("no bench repeats to aggregate")
    per_repeat: dict[str, list[float]] = {s.column: [] for s in specs}
    for index, rows in enumerate(rows_per_repeat, start=1):
        if not rows:
            raise MetricsError(f"bench repeat {index} wrote no rows")
        for spec in specs:
            try:
                column_values = [row[spec.column] for row in rows]
            except KeyError:
                raise MetricsError(
                    f"bench repeat {index} has no column {spec.column!r}"
                ) from None
            per_repeat[spec.column].append(statistics.median(column_values))
    values: dict[str, float] = {}
    spread: dict[str, dict[str, float]] = {}
    for column, vals in per_repeat.items():
        med = statistics.median(vals)
        values[column] = med
        if len(vals) >= 2:
            q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
            stdev = statistics.stdev(vals)
        else:
            q1 = q3 = vals[0]
            stdev = 0.0
        spread[column] = {
            "n": float(len(vals)), "median": med, "min": min(vals), "max": max(vals),
            "q1": q1, "q3": q3, "stdev": stdev,
        }
    return Aggregate(values=values, spread=spread)


def priority_key(values: dict[str, float], specs: list[MetricSpec]) -> tuple[float, ...]:
    """A tuple where larger is better, compared left to right (the leftmost metric decides).

    A missing or non-finite value counts as the worst possible.
    """
    key: list[float] = []
    for spec in specs:
        v = values.get(spec.column)
        if v is None or not math.isfinite(v):
            key.append(-math.inf)
        else:
            key.append(v if spec.higher_is_better else -v)
    return tuple(key)


def is_better(
    a: dict[str, float], b: dict[str, float], specs: list[MetricSpec], *, rel_tol: float = 0.0
) -> bool:
    """True when ``a`` beats ``b`` strictly; a full tie is not better.

    ``rel_tol`` > 0 treats two values of a column within that relative distance as tied, so
    the next column decides (useful when the leftmost metric is a noisy timing).
    """
    for ka, kb in zip(priority_key(a, specs), priority_key(b, specs)):
        if ka == kb or (rel_tol > 0 and math.isclose(ka, kb, rel_tol=rel_tol)):
            continue
        return ka > kb
    return False
