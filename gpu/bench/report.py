"""Writing a bench's metrics CSV the way looptree reads it (see CONTRACT.md, metrics protocol).

Why row by row with a flush each time: looptree tails the file while the bench runs, so every
row should be on disk as soon as it is measured, and a bench that crashes half-way still leaves
the rows it finished. The first column is always ``iteration``; every metric column says its
direction in its name, e.g. ``runtime_ms (lower is better)``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ITERATION = "iteration"


def metric_column(name: str, *, lower_is_better: bool) -> str:
    """``"runtime_ms"`` → ``"runtime_ms (lower is better)"`` (or higher)."""
    return f"{name} ({'lower' if lower_is_better else 'higher'} is better)"


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        # repr round-trips exactly; NaN/inf are written as such so looptree can refuse them loudly.
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


class MetricsWriter:
    """Appends rows to a metrics CSV, header first, each row flushed as soon as it is written."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str]) -> None:
        cols = list(columns)
        if not cols or cols[0] != ITERATION:
            cols = [ITERATION] + [c for c in cols if c != ITERATION]
        if len(set(cols)) != len(cols):
            raise ValueError(f"duplicate metric column in {cols}")
        if len(cols) < 2:
            raise ValueError("a metrics CSV needs at least one metric column besides 'iteration'")
        self.path = Path(path)
        self.columns = cols
        self._next_iteration = 0
        existing = self._existing_header()
        if existing is not None and existing != cols:
            raise ValueError(f"{self.path} already has columns {existing}, not {cols}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        if existing is None:
            self._write(cols)

    def _existing_header(self) -> list[str] | None:
        try:
            with open(self.path, newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
        except FileNotFoundError:
            return None
        if not rows:
            return None
        self._next_iteration = len(rows) - 1
        return rows[0]

    def _write(self, cells: Sequence[str]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        self._fh.write(buf.getvalue())
        self._fh.flush()

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one row; ``iteration`` defaults to the row's position (0, 1, 2, …)."""
        missing = [c for c in self.columns[1:] if c not in row]
        if missing:
            raise ValueError(f"metrics row lacks column(s) {missing}")
        extra = [k for k in row if k not in self.columns]
        if extra:
            raise ValueError(f"metrics row has unknown column(s) {extra}; columns are {self.columns}")
        iteration = row.get(ITERATION, self._next_iteration)
        self._write([_cell(iteration)] + [_cell(row[c]) for c in self.columns[1:]])
        self._next_iteration = int(iteration) + 1

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_metrics_csv(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> Path:
    """Append ``rows`` to ``path`` (header written if the file is new), one flushed row at a time."""
    with MetricsWriter(path, columns) as writer:
        for row in rows:
            writer.append(row)
    return writer.path
