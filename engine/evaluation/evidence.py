"""Evidence of forged metrics: is a node's bench output what the read-only bench would write?

Why a module of its own: the bench command is read-only, but the candidate's code runs inside it
and can find the metrics file (`$LOOPTREE_METRICS`), append rows, rewrite it at exit or patch the
clock the bench reads. Nothing in the file itself can prove it honest, so the judgement rests on
what the candidate cannot write: the engine's own record of each bench run (when each row
arrived, how long the process ran by the engine's clock, whether the file was rewritten or grew
after the process ended) set beside the same record for the parent, timed back to back with it
(or, without interleaving, the shape the reference node's evaluation recorded).

The rules are built from evidence, never from size: a speed-up of any factor is credited when the
record agrees with it. A node with evidence against it is *suspect*: recorded with its reason,
never credited, never best. Each rule below states the evidence it needs and stays silent when
that evidence is missing (no parent runs, a parent whose own shape varies, a metric without a
time unit), so an honest node is not called suspect for lack of data.

Pure functions of plain records: tested without processes.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Any

from looptree.engine.core.metrics import MetricSpec

__all__ = ["RunRecord", "shape_of", "suspect_reason", "time_unit_seconds"]

# Rule 6 (the outside clock): below these the engine's clock cannot tell saved work from noise.
MIN_CLAIMED_SAVING_S = 0.15  # seconds of timed work per bench run the candidate claims to save
SEEN_FRACTION = 0.25  # of that saving, at least this much must show on the engine's clock
# Rule 7 (a burst at the end): a parent "streams" when its rows came in this many reads or more.
STREAM_READS = 3
STREAM_SPAN_S = 0.5
SHAPE_ITERATIONS_KEPT = 1000  # iteration lists longer than this are not recorded in events


@dataclass
class RunRecord:
    """The engine's record of one bench run (times in seconds after the process started)."""

    side: str  # "candidate" or "parent"
    iterations: list[int]
    lead: list[float]  # the leading metric's value in each row
    arrived_s: list[float]  # when the engine first read each row
    duration_s: float  # process start to exit, by the engine's clock
    reads: int = 0  # reads that returned at least one row
    restarts: int = 0  # times the file was truncated or replaced by different content
    late_bytes: int = 0  # bytes that appeared after the bench's process tree had ended
    preexisting: bool = False  # a metrics file was there before the bench started
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.iterations)


_UNITS = {
    "ns": 1e-9, "nsec": 1e-9, "nanoseconds": 1e-9, "nanosecond": 1e-9,
    "us": 1e-6, "µs": 1e-6, "usec": 1e-6, "microseconds": 1e-6, "microsecond": 1e-6,
    "ms": 1e-3, "msec": 1e-3, "millis": 1e-3, "milliseconds": 1e-3, "millisecond": 1e-3,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "seconds": 1.0, "second": 1.0,
}


def time_unit_seconds(spec: MetricSpec) -> float | None:
    """Seconds per unit when a lower-is-better metric's name says it is a duration (`runtime_ms`).

    A rate or a normalised time (`ms_per_op`, `s/iter`) says nothing about how long the run
    took, so it gets no unit and the outside-clock rule does not apply to it.
    """
    if spec.higher_is_better or "/" in spec.name:
        return None
    tokens = [t for t in re.split(r"[^0-9a-zµ]+", spec.name.lower()) if t]
    if "per" in tokens:
        return None
    for token in reversed(tokens):
        if token in _UNITS:
            return _UNITS[token]
    return None


def _same(values: list[Any]) -> Any | None:
    """The common value when every entry is equal, else None."""
    return values[0] if values and all(v == values[0] for v in values) else None


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _lead_median(records: list[RunRecord]) -> float | None:
    values = [statistics.median(r.lead) for r in records if r.lead]
    return _median(values) if values else None


def _timed_s(records: list[RunRecord], unit: float) -> float | None:
    sums = [sum(r.lead) * unit for r in records if r.lead]
    return _median(sums) if sums else None


def _iter_text(iterations: list[int]) -> str:
    head = ",".join(str(i) for i in iterations[:8])
    return head + (f",… ({len(iterations)} rows)" if len(iterations) > 8 else "")


def shape_of(records: list[RunRecord], specs: list[MetricSpec]) -> dict[str, Any]:
    """What a node's bench runs looked like, recorded in `node_evaluated` for its children."""
    rows = _same([r.rows for r in records])
    iterations = _same([r.iterations for r in records])
    unit = time_unit_seconds(specs[0]) if specs else None
    timed = _timed_s(records, unit) if unit else None
    return {
        "rows": rows,
        "iterations": iterations if iterations is not None and len(iterations) <= SHAPE_ITERATIONS_KEPT else None,
        "restarts": max((r.restarts for r in records), default=0),
        "bench_s": round(_median([r.duration_s for r in records]), 4) if records else None,
        "timed_s": round(timed, 6) if timed is not None else None,
    }


def suspect_reason(candidate: list[RunRecord], parent: list[RunRecord], specs: list[MetricSpec],
                   expected: dict[str, Any] | None = None) -> str | None:
    """One line naming the evidence that the candidate's metrics were not written by the bench, or None.

    `parent` are the parent's runs timed back to back with the candidate's in this evaluation;
    `expected` is the reference node's recorded `shape_of`, used when there are none.
    """
    for index, run in enumerate(candidate, start=1):
        if run.preexisting:
            return f"a metrics file was already there when bench run {index} started (the harness had removed it)"
        if run.late_bytes > 0:
            return (f"{run.late_bytes} bytes were written to the metrics file after bench run {index} "
                    "had exited (the bench did not write them)")
    reason = _shape_reason(candidate, parent, expected)
    if reason or not specs:
        return reason
    return _clock_reason(candidate, parent, specs, expected) or _burst_reason(candidate, parent, specs)


def _shape_reason(candidate: list[RunRecord], parent: list[RunRecord],
                  expected: dict[str, Any] | None) -> str | None:
    """Rules 1–3: the read-only bench writes the same row structure for the candidate as for the parent."""
    if parent:
        rows = _same([r.rows for r in parent])
        iterations = _same([r.iterations for r in parent])
        restarts = max(r.restarts for r in parent)
        whose = "the parent's runs, timed beside it,"
    elif expected:
        rows = expected.get("rows")
        iterations = expected.get("iterations")
        restarts = int(expected.get("restarts") or 0)
        whose = "the parent's evaluation"
    else:
        return None
    for index, run in enumerate(candidate, start=1):
        if rows is not None and run.rows != rows:
            return (f"bench run {index} wrote {run.rows} metrics rows where {whose} wrote {rows}; the bench is "
                    "read-only, so rows it did not write were added or removed")
        if iterations is not None and run.iterations != list(iterations):
            return (f"bench run {index} wrote iterations {_iter_text(run.iterations)} where {whose} wrote "
                    f"{_iter_text(list(iterations))} (out of order, duplicated or foreign rows)")
        if rows is None and iterations is None and parent and _increasing(parent) and not _increasing([run]):
            return (f"bench run {index} wrote iterations {_iter_text(run.iterations)}, out of order or duplicated, "
                    "where the parent's always increased")
        if run.restarts > 0 and restarts == 0:
            return (f"the metrics file was truncated or replaced by different rows during bench run {index} "
                    "(the parent's never was)")
    return None


def _increasing(records: list[RunRecord]) -> bool:
    return all(all(a < b for a, b in zip(r.iterations, r.iterations[1:])) for r in records)


def _clock_reason(candidate: list[RunRecord], parent: list[RunRecord], specs: list[MetricSpec],
                  expected: dict[str, Any] | None) -> str | None:
    """Rule 6: timed work the candidate claims to have saved must show on the engine's clock.

    Applies only when the leading metric is a duration (its name has a unit) and the parent's own
    timings fit inside its runs' wall time (so the metric measures work done in the bench run, not
    an extrapolation); then the candidate's bench run must be shorter by at least a quarter of
    the timed work it claims to have saved. A patched clock or rows written over the real ones
    claim a saving the run never showed; an honest speed-up of any size shows it.
    """
    unit = time_unit_seconds(specs[0])
    if unit is None or not candidate:
        return None
    if parent:
        parent_timed = _timed_s(parent, unit)
        parent_wall = _median([r.duration_s for r in parent])
    elif expected and expected.get("timed_s") is not None and expected.get("bench_s") is not None:
        parent_timed, parent_wall = float(expected["timed_s"]), float(expected["bench_s"])
    else:
        return None
    cand_timed = _timed_s(candidate, unit)
    if parent_timed is None or cand_timed is None:
        return None
    if parent_timed < MIN_CLAIMED_SAVING_S or parent_timed > 1.1 * parent_wall + 0.05:
        return None
    claimed = parent_timed - cand_timed
    if claimed < MIN_CLAIMED_SAVING_S:
        return None
    cand_wall = _median([r.duration_s for r in candidate])
    if parent and len(parent) == len(candidate):
        # Runs timed back to back share the machine's load: the median of the pairs' differences
        # does not mistake a busy spell during the candidate's runs for missing work.
        seen = _median([p.duration_s - c.duration_s for p, c in zip(parent, candidate)])
    else:
        seen = parent_wall - cand_wall
    if seen >= SEEN_FRACTION * claimed:
        return None
    return (f"its rows claim {claimed:.2f} s less timed work per bench run than the parent's "
            f"({cand_timed:.3g} s against {parent_timed:.3g} s), but by the engine's clock its bench runs took "
            f"{cand_wall:.2f} s against the parent's {parent_wall:.2f} s (a tampered clock or rows the bench did "
            "not time)")


def _burst_reason(candidate: list[RunRecord], parent: list[RunRecord], specs: list[MetricSpec]) -> str | None:
    """Rule 7: rows that all appear at the end of a long run, where the parent's came one by one.

    Needs the parent's runs from this evaluation, all streaming; fires only when the candidate's
    run lasted about as long as the parent's (the work was still done), every row of it arrived
    in one read near its end, and it claims to be at least twice as good. An honest fast
    candidate finishes early; an honest slow one claims no large gain.
    """
    if not parent or not all(r.reads >= STREAM_READS and r.arrived_s
                             and r.arrived_s[-1] - r.arrived_s[0] >= STREAM_SPAN_S for r in parent):
        return None
    lead = specs[0]
    p_med, c_med = _lead_median(parent), _lead_median(candidate)
    if p_med is None or c_med is None or p_med <= 0 or c_med <= 0:
        return None
    gain = c_med / p_med if lead.higher_is_better else p_med / c_med
    if gain < 2.0:
        return None
    parent_wall = _median([r.duration_s for r in parent])
    parent_span = _median([r.arrived_s[-1] - r.arrived_s[0] for r in parent])
    for index, run in enumerate(candidate, start=1):
        if (run.rows >= STREAM_READS and run.reads == 1 and run.duration_s >= 0.8 * parent_wall
                and run.arrived_s and run.arrived_s[0] >= 0.9 * run.duration_s):
            return (f"all {run.rows} rows of bench run {index} appeared at once at the end of a "
                    f"{run.duration_s:.2f} s run, where the parent's arrived one by one over {parent_span:.2f} s, "
                    f"yet it claims to be {gain:.3g}x better")
    return None
