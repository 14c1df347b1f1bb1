"""The metrics CSV protocol: header directions, validation messages, live tailing, aggregation."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from looptree.engine.core.metrics import (
    Aggregate,
    CsvTail,
    MetricSpec,
    aggregate,
    check_columns,
    is_better,
    parse_header,
    priority_key,
    read_metrics,
)
from looptree.engine.errors import MetricsError

RT = "runtime_ms (lower is better)"


# ---------------------------------------------------------------------------- header / direction


@pytest.mark.parametrize(
    ("column", "name", "higher"),
    [
        ("runtime_ms (lower is better)", "runtime_ms", False),
        ("runtime_ms(lower is better)", "runtime_ms", False),
        ("Throughput [Higher Is Better]", "Throughput", True),
        ("loss, lower is better", "loss", False),
        ("loss LOWER IS BETTER", "loss", False),
        ("err_lower_is_better", "err", False),
        ("time (ms, lower is better)", "time (ms)", False),
        ("accuracy", "accuracy", True),
        ("speedup (higher is better)", "speedup", True),
        ("lowering_count", "lowering_count", True),
    ],
)
def test_direction_parsing(column: str, name: str, higher: bool) -> None:
    [spec] = parse_header(["iteration", column])
    assert spec == MetricSpec(column=column, name=name, higher_is_better=higher)


def test_header_keeps_order_and_strips_whitespace() -> None:
    specs = parse_header(["\ufeffiter", f" {RT} ", "gflops"])
    assert [s.column for s in specs] == [RT, "gflops"]
    assert [s.higher_is_better for s in specs] == [False, True]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ([], "metrics header has no header row"),
        (["", " "], "metrics header has no header row"),
        (["iteration"], "metrics header has only the iteration column 'iteration'; add at least "
                        "one metric column"),
        (["it", RT, RT], f"metrics header: duplicate column '{RT}'"),
        (["it", "a", ""], "metrics header: header column 3 is empty"),
        (["it", "a (lower is better)", "a"],
         "metrics header: columns 'a (lower is better)' and 'a' both name metric 'a'"),
        (["it", "x (lower is better) [higher is better]"],
         "metrics header: column 'x (lower is better) [higher is better]' says both lower and "
         "higher is better"),
        (["it", "(lower is better)"],
         "metrics header: column '(lower is better)' has a direction but no metric name"),
    ],
)
def test_header_errors(header: list[str], message: str) -> None:
    with pytest.raises(MetricsError) as info:
        parse_header(header)
    assert str(info.value) == message


def test_header_error_names_the_file() -> None:
    with pytest.raises(MetricsError, match=r"^metrics file bench\.csv has only the iteration"):
        parse_header(["i"], source="bench.csv")


def test_check_columns_missing_and_extra() -> None:
    base = parse_header(["i", RT, "mem"])
    check_columns(base, parse_header(["i", RT, "mem", "extra"]))  # extra is fine
    with pytest.raises(MetricsError) as info:
        check_columns(base, parse_header(["i", RT]))
    assert str(info.value) == (
        "metrics file metrics.csv is missing column 'mem' (the baseline wrote it)"
    )


# ---------------------------------------------------------------------------- whole-file validation


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _finish_error(path: Path) -> str:
    with pytest.raises(MetricsError) as info:
        CsvTail(path).finish()
    return str(info.value)


def test_read_valid_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", f"iteration,{RT},gflops\n0,2.5,10\r\n1,2.0,11\n\n2,3,9")
    tail = read_metrics(path)
    assert tail.iterations == [0, 1, 2]
    assert tail.rows == [{RT: 2.5, "gflops": 10.0}, {RT: 2.0, "gflops": 11.0},
                         {RT: 3.0, "gflops": 9.0}]
    assert [s.name for s in tail.specs or []] == ["runtime_ms", "gflops"]


def test_quoted_header_with_comma(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", 'step,"loss, lower is better"\n1,0.5\n')
    tail = read_metrics(path)
    assert tail.specs == [MetricSpec("loss, lower is better", "loss", False)]
    assert tail.rows == [{"loss, lower is better": 0.5}]


def test_missing_file(tmp_path: Path) -> None:
    assert _finish_error(tmp_path / "metrics.csv") == "bench command did not write metrics.csv"


def test_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", "")
    assert _finish_error(path) == "metrics file metrics.csv is empty (no header row)"


def test_header_but_no_rows(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", f"iteration,{RT}\n")
    assert _finish_error(path) == "metrics file metrics.csv has a header but no rows"


def test_not_a_number(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", f"iteration,{RT}\n0,1\n1,2\n2,abc\n")
    assert _finish_error(path) == (
        f"metrics file metrics.csv, row 3, column '{RT}': 'abc' is not a number"
    )


def test_empty_cell_is_not_a_number(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", "i,a,b\n0,,1\n")
    assert _finish_error(path) == "metrics file metrics.csv, row 1, column 'a': '' is not a number"


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_nan_and_inf(tmp_path: Path, cell: str) -> None:
    path = _write(tmp_path / "metrics.csv", f"i,{RT}\n0,1.0\n1,{cell}\n")
    assert _finish_error(path) == (
        f"metrics file metrics.csv, row 2, column '{RT}': '{cell}' is NaN or infinite"
    )


def test_wrong_cell_count(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", "i,a,b\n0,1,2\n1,2\n")
    assert _finish_error(path) == "metrics file metrics.csv, row 2 has 2 cells but the header has 3"


@pytest.mark.parametrize("cell", ["1.5", "x", "nan"])
def test_iteration_not_integer(tmp_path: Path, cell: str) -> None:
    path = _write(tmp_path / "metrics.csv", f"iter,a\n{cell},1\n")
    assert _finish_error(path) == (
        f"metrics file metrics.csv, row 1: iteration '{cell}' (column 'iter') is not an integer"
    )


def test_iteration_written_as_float_is_accepted(tmp_path: Path) -> None:
    assert read_metrics(_write(tmp_path / "m.csv", "iter,a\n3.0,1\n")).iterations == [3]


def test_header_error_from_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", "a,a\n")
    assert _finish_error(path) == "metrics file metrics.csv: duplicate column 'a'"


def test_label_overrides_file_name(tmp_path: Path) -> None:
    tail = CsvTail(tmp_path / "x.csv", label="out/metrics.csv")
    with pytest.raises(MetricsError, match="^bench command did not write out/metrics.csv$"):
        tail.finish()


# ---------------------------------------------------------------------------- live tailing


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_tail_in_steps_with_partial_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    tail = CsvTail(path)
    assert tail.poll() == []  # absent yet
    assert tail.specs is None
    _append(path, "iteration,run")  # header not complete yet
    assert tail.poll() == []
    assert tail.specs is None
    _append(path, "time_ms (lower is better)\n0,1.")
    assert tail.poll() == []
    assert [s.column for s in tail.specs or []] == ["runtime_ms (lower is better)"]
    _append(path, "5\n1,2")
    assert tail.poll() == [{RT: 1.5}]
    assert tail.poll() == []  # nothing new, the partial line still waits
    _append(path, ".25\n2,3\n3,")
    assert tail.poll() == [{RT: 2.25}, {RT: 3.0}]
    _append(path, "4")  # the bench ends without a final newline
    assert tail.poll() == []
    assert tail.finish() == [{RT: 4.0}]
    assert tail.iterations == [0, 1, 2, 3]
    assert len(tail.rows) == 4
    assert tail.restarts == 0


def test_tail_concurrent_writer_split_at_every_byte(tmp_path: Path) -> None:
    """A writer thread flushes arbitrary byte slices while we poll: each row arrives once."""
    path = tmp_path / "metrics.csv"
    payload = (f"iteration,{RT},gflops\n" + "".join(
        f"{i},{i / 8:.3f},{i * 3}\n" for i in range(150)
    )).encode()
    done = threading.Event()

    def writer() -> None:
        with open(path, "wb") as f:
            for k in range(0, len(payload), 7):  # 7-byte slices split cells and lines
                f.write(payload[k:k + 7])
                f.flush()
                if k % 350 == 0:
                    time.sleep(0.001)
        done.set()

    tail = CsvTail(path)
    thread = threading.Thread(target=writer)
    thread.start()
    got: list[dict[str, float]] = []
    while not done.is_set():
        got += tail.poll()
    thread.join()
    got += tail.finish()
    assert got == [{RT: round(i / 8, 3), "gflops": float(i * 3)} for i in range(150)]
    assert tail.iterations == list(range(150))
    assert tail.restarts == 0


def test_tail_bad_row_is_sticky(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", "i,a\n0,1\n1,oops\n")
    tail = CsvTail(path)
    with pytest.raises(MetricsError, match="row 2, column 'a': 'oops' is not a number"):
        tail.poll()
    assert tail.rows == [{"a": 1.0}]
    _append(path, "2,3\n")
    with pytest.raises(MetricsError, match="'oops'"):
        tail.poll()
    with pytest.raises(MetricsError, match="'oops'"):
        tail.finish()


def test_tail_truncated_and_rewritten_restarts(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", "i,a\n0,1\n1,2\n")
    tail = CsvTail(path)
    assert len(tail.poll()) == 2
    _write(path, "i,a\n")  # truncated: the bench started over
    assert tail.poll() == []  # shorter than what was read: wait, it may be mid-rewrite
    _append(path, "0,7\n1,8\n2,9\n")
    assert tail.poll() == [{"a": 7.0}, {"a": 8.0}, {"a": 9.0}]
    assert tail.restarts == 1
    assert tail.iterations == [0, 1, 2]


def test_tail_truncated_for_good_restarts_at_finish(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", "i,a\n0,1\n1,2\n2,3\n")
    tail = CsvTail(path)
    assert len(tail.poll()) == 3
    _write(path, "i,a\n0,5\n")
    assert tail.poll() == []
    assert tail.finish() == [{"a": 5.0}]
    assert tail.rows == [{"a": 5.0}]
    assert tail.restarts == 1


def test_tail_follows_whole_file_rewrites(tmp_path: Path) -> None:
    """A bench that rewrites the whole file each iteration (pandas to_csv) reports each row once."""
    path = tmp_path / "metrics.csv"
    tail = CsvTail(path)
    content = "i,a\n"
    got = []
    for i in range(4):
        content += f"{i},{i * 10}\n"
        tmp = tmp_path / "metrics.csv.tmp"
        tmp.write_text(content)
        os.replace(tmp, path)  # a new inode each time
        got += tail.poll()
    assert got == [{"a": 0.0}, {"a": 10.0}, {"a": 20.0}, {"a": 30.0}]
    assert tail.restarts == 0


def test_tail_replaced_by_different_file_restarts(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", "i,a\n0,1\n")
    tail = CsvTail(path)
    assert tail.poll() == [{"a": 1.0}]
    _write(path, "i,b\n0,5\n1,6\n")  # same size or larger, different content
    assert tail.poll() == [{"b": 5.0}, {"b": 6.0}]
    assert tail.restarts == 1
    assert [s.column for s in tail.specs or []] == ["b"]


def test_tail_file_deleted_then_recreated(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", "i,a\n0,1\n")
    tail = CsvTail(path)
    assert tail.poll() == [{"a": 1.0}]
    path.unlink()
    assert tail.poll() == []
    _write(path, "i,a\n0,1\n1,2\n")
    assert tail.poll() == [{"a": 2.0}]
    assert tail.restarts == 0


# ---------------------------------------------------------------------------- aggregation


def test_aggregate_median_of_medians() -> None:
    specs = parse_header(["i", RT, "gflops"])
    repeats = [
        [{RT: 10.0, "gflops": 1.0}, {RT: 2.0, "gflops": 3.0}, {RT: 3.0, "gflops": 2.0}],  # 3, 2
        [{RT: 4.0, "gflops": 5.0}],  # 4, 5
        [{RT: 1.0, "gflops": 4.0}, {RT: 2.0, "gflops": 6.0}],  # 1.5, 5
        [{RT: 6.0, "gflops": 0.0}],  # 6, 0
    ]
    agg = aggregate(repeats, specs)
    assert isinstance(agg, Aggregate)
    assert agg.values == {RT: 3.5, "gflops": 3.5}  # median of [3, 4, 1.5, 6] and [2, 5, 5, 0]
    s = agg.spread[RT]
    assert s["n"] == 4
    assert (s["min"], s["max"], s["median"]) == (1.5, 6.0, 3.5)
    assert s["q1"] == pytest.approx(2.625)  # inclusive quartiles of [1.5, 3, 4, 6]
    assert s["q3"] == pytest.approx(4.5)
    assert s["stdev"] == pytest.approx((10.6875 / 3) ** 0.5)  # sample stdev, mean 3.625


def test_aggregate_single_repeat() -> None:
    specs = parse_header(["i", "a"])
    agg = aggregate([[{"a": 1.0}, {"a": 5.0}, {"a": 2.0}]], specs)
    assert agg.values == {"a": 2.0}
    assert agg.spread["a"] == {"n": 1.0, "median": 2.0, "min": 2.0, "max": 2.0, "q1": 2.0,
                               "q3": 2.0, "stdev": 0.0}


def test_aggregate_errors() -> None:
    specs = parse_header(["i", "a", "b"])
    with pytest.raises(MetricsError, match="^no bench repeats to aggregate$"):
        aggregate([], specs)
    with pytest.raises(MetricsError, match="^bench repeat 2 wrote no rows$"):
        aggregate([[{"a": 1.0, "b": 1.0}], []], specs)
    with pytest.raises(MetricsError, match="^bench repeat 1 has no column 'b'$"):
        aggregate([[{"a": 1.0}]], specs)


# ---------------------------------------------------------------------------- priority


def test_priority_key_signs_and_missing() -> None:
    specs = parse_header(["i", RT, "gflops"])
    assert priority_key({RT: 2.0, "gflops": 7.0}, specs) == (-2.0, 7.0)
    assert priority_key({"gflops": float("nan")}, specs) == (float("-inf"), float("-inf"))


def test_is_better_leftmost_decides_then_ties_break() -> None:
    specs = parse_header(["i", RT, "gflops"])
    fast = {RT: 1.0, "gflops": 1.0}
    slow = {RT: 2.0, "gflops": 100.0}
    assert is_better(fast, slow, specs)  # lower runtime wins despite worse gflops
    assert not is_better(slow, fast, specs)
    tie_hi = {RT: 1.0, "gflops": 5.0}
    assert is_better(tie_hi, fast, specs)  # runtime tied: gflops breaks it
    assert not is_better(fast, tie_hi, specs)
    assert not is_better(fast, dict(fast), specs)  # a full tie is not better
    best = max([slow, fast, tie_hi], key=lambda v: priority_key(v, specs))
    assert best is tie_hi


def test_is_better_with_tolerance() -> None:
    specs = parse_header(["i", RT, "gflops"])
    a = {RT: 1.000, "gflops": 9.0}
    b = {RT: 1.001, "gflops": 3.0}
    assert is_better(a, b, specs)  # exact comparison: a is faster
    assert not is_better(b, a, specs)
    assert is_better(a, b, specs, rel_tol=0.01)
    assert not is_better(b, a, specs, rel_tol=0.01)  # runtime "tied": gflops decides
    b2 = {RT: 1.001, "gflops": 30.0}
    assert is_better(b2, a, specs, rel_tol=0.01)
    assert not is_better(b2, a, specs)


# ---------------------------------------------------------------------------- bounded reading


def test_a_field_without_newline_longer_than_the_cap_is_an_error_while_tailing(tmp_path: Path) -> None:
    from looptree.engine.core.metrics import MAX_LINE_BYTES

    path = tmp_path / "m.csv"
    path.write_text("iteration,t (lower is better)\n1,5\n")
    tail = CsvTail(path)
    assert len(tail.poll()) == 1
    with open(path, "a") as fh:
        fh.write("2," + "9" * (3 * MAX_LINE_BYTES))  # still no newline: not yet a row, but too long for one
    with pytest.raises(MetricsError, match=f"row 2: metrics field larger than {MAX_LINE_BYTES} bytes"):
        tail.poll()
    with pytest.raises(MetricsError, match="metrics field larger than"):
        tail.finish()  # and for good


def test_a_long_complete_line_and_broken_csv_are_errors_not_crashes(tmp_path: Path) -> None:
    from looptree.engine.core.metrics import MAX_LINE_BYTES

    long_line = _write(tmp_path / "a.csv", "iteration,t\n1," + "5" * (MAX_LINE_BYTES + 10) + "\n")
    with pytest.raises(MetricsError, match="metrics field larger than"):
        read_metrics(long_line)
    # A field over the csv module's own limit (128 KiB) cannot get there: lines are capped first.
    broken = _write(tmp_path / "b.csv", 'iteration,t\n1,"5\x00\n')
    with pytest.raises(MetricsError):
        read_metrics(broken)


def test_rows_record_when_and_where_they_arrived_and_the_memory_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("iteration,t\n1,5\n")
    tail = CsvTail(path)
    before = time.monotonic()
    tail.poll()
    with open(path, "a") as fh:
        fh.write("2,6\n" * 3000)
    tail.poll()
    assert len(tail.arrived) == len(tail.offsets) == len(tail.rows) == 3001
    assert before <= tail.arrived[0] <= tail.arrived[-1] <= time.monotonic()
    assert tail.offsets[0] == len("iteration,t\n1,5\n") and tail.offsets[-1] == path.stat().st_size
    assert tail.reads == 2 and tail.consumed == path.stat().st_size
    assert len(tail._consumed_tail) <= 256  # what was read is hashed, not kept

