"""The forgery rules on plain run records: each fires on its evidence and stays silent without it."""

from __future__ import annotations

from looptree.engine.core.metrics import parse_header
from looptree.engine.evaluation.evidence import RunRecord, shape_of, suspect_reason, time_unit_seconds

MS = parse_header(["iteration", "runtime_ms (lower is better)"])
SCORE = parse_header(["iteration", "score (higher is better)"])


def rec(lead: list[float], *, side: str = "candidate", duration: float = 1.0, iterations: list[int] | None = None,
        arrived: list[float] | None = None, reads: int | None = None, **kw) -> RunRecord:
    its = iterations if iterations is not None else list(range(1, len(lead) + 1))
    times = arrived if arrived is not None else [duration * (i + 1) / len(lead) for i in range(len(lead))]
    return RunRecord(side=side, iterations=its, lead=lead, arrived_s=times, duration_s=duration,
                     reads=reads if reads is not None else len(lead), **kw)


def parents(n: int = 2, lead: float = 200.0, rows: int = 5, duration: float = 1.2) -> list[RunRecord]:
    return [rec([lead] * rows, side="parent", duration=duration) for _ in range(n)]


def test_units_come_from_the_name_and_rates_have_none() -> None:
    assert time_unit_seconds(MS[0]) == 1e-3
    assert time_unit_seconds(parse_header(["i", "time (s) (lower is better)"])[0]) == 1.0
    assert time_unit_seconds(parse_header(["i", "latency_us (lower is better)"])[0]) == 1e-6
    assert time_unit_seconds(parse_header(["i", "ns_per_op (lower is better)"])[0]) is None
    assert time_unit_seconds(parse_header(["i", "ms/iter (lower is better)"])[0]) is None
    assert time_unit_seconds(parse_header(["i", "throughput_ms (higher is better)"])[0]) is None
    assert time_unit_seconds(parse_header(["i", "loss (lower is better)"])[0]) is None


def test_honest_speedups_of_any_size_are_not_suspect() -> None:
    # 20,000x faster: the rows claim ~1 s less work and the run is ~1 s shorter.
    fast = [rec([0.01] * 5, duration=0.15, arrived=[0.14] * 5, reads=1) for _ in range(2)]
    assert suspect_reason(fast, parents(), MS) is None
    # Slower, unchanged and a little faster: nothing to say.
    for lead, duration in ((300.0, 1.7), (200.0, 1.2), (180.0, 1.1)):
        assert suspect_reason([rec([lead] * 5, duration=duration)] * 2, parents(), MS) is None
    # Without a parent or a recorded shape there is no yardstick (the baseline).
    assert suspect_reason([rec([0.001] * 45)], [], MS, None) is None


def test_a_row_count_unlike_the_parents_is_suspect() -> None:
    forged = rec([200.0] * 5 + [0.001] * 40, duration=1.2)
    reason = suspect_reason([forged], parents(), MS)
    assert reason and "wrote 45 metrics rows" in reason and "wrote 5" in reason
    # The same against the reference's recorded shape when no parent was timed beside it.
    expected = shape_of(parents(), MS)
    assert expected["rows"] == 5 and expected["iterations"] == [1, 2, 3, 4, 5]
    assert "wrote 45 metrics rows" in suspect_reason([forged], [], MS, expected)
    # A parent whose row count varies (a time-bounded bench) gives no count to hold it to.
    varying = [rec([200.0] * 5, side="parent", duration=1.2), rec([200.0] * 6, side="parent", duration=1.2)]
    assert suspect_reason([rec([100.0] * 9, duration=0.7)], varying, MS) is None


def test_iterations_out_of_order_or_duplicated_are_suspect() -> None:
    dup = rec([100.0] * 5, duration=0.7, iterations=[1, 2, 3, 3, 4])
    assert "iterations 1,2,3,3,4" in suspect_reason([dup], parents(), MS)
    varying = [rec([200.0] * 5, side="parent", duration=1.2),
               rec([200.0] * 6, side="parent", duration=1.2)]
    reason = suspect_reason([rec([100.0] * 5, duration=0.7, iterations=[1, 3, 2, 4, 5])], varying, MS)
    assert reason and "out of order or duplicated" in reason


def test_a_rewritten_file_late_bytes_and_a_preexisting_file_are_suspect() -> None:
    assert "truncated or replaced" in suspect_reason([rec([100.0] * 5, duration=0.7, restarts=1)], parents(), MS)
    # A parent that itself rewrites its file (df.to_csv) makes that no evidence.
    rewriting = [rec([200.0] * 5, side="parent", duration=1.2, restarts=1)] * 2
    assert suspect_reason([rec([100.0] * 5, duration=0.7, restarts=1)], rewriting, MS) is None
    assert "after bench run 1 had exited" in suspect_reason([rec([100.0] * 5, duration=0.7, late_bytes=12)],
                                                            parents(), MS)
    assert "already there" in suspect_reason([rec([100.0] * 5, duration=0.7, preexisting=True)], parents(), MS)


def test_a_saving_the_engine_clock_did_not_see_is_suspect() -> None:
    # A patched clock: same shape, same run length as the parent, rows claim 1000x less time.
    clock = [rec([0.2] * 5, duration=1.2) for _ in range(2)]
    reason = suspect_reason(clock, parents(), MS)
    assert reason and "engine's clock" in reason
    # The same against the recorded shape of the reference (compare = "off").
    assert "engine's clock" in suspect_reason(clock, [], MS, shape_of(parents(), MS))
    # A parent whose timings exceed its own wall time (CPU time over threads) gives no clock rule.
    threads = [rec([2000.0] * 5, side="parent", duration=1.2) for _ in range(2)]
    assert suspect_reason([rec([200.0] * 5, duration=1.2)] * 2, threads, MS) is None
    # Claims too small to see on a clock: no rule.
    tiny = [rec([20.0] * 5, side="parent", duration=0.3) for _ in range(2)]
    assert suspect_reason([rec([0.02] * 5, duration=0.3)] * 2, tiny, MS) is None


def test_rows_in_one_burst_at_the_end_of_a_long_run_are_suspect_for_unitless_metrics() -> None:
    streaming = [rec([10.0] * 5, side="parent", duration=2.0, arrived=[0.4, 0.8, 1.2, 1.6, 2.0], reads=5)
                 for _ in range(2)]
    burst = rec([100.0] * 5, duration=2.0, arrived=[2.05] * 5, reads=1)
    reason = suspect_reason([burst], streaming, SCORE)
    assert reason and "appeared at once" in reason
    # Finished early (the work really got faster): not suspect; nor a burst without a large claim.
    assert suspect_reason([rec([100.0] * 5, duration=0.3, arrived=[0.31] * 5, reads=1)], streaming, SCORE) is None
    assert suspect_reason([rec([12.0] * 5, duration=2.0, arrived=[2.05] * 5, reads=1)], streaming, SCORE) is None
