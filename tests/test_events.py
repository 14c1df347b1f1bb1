"""The event log: append/read, seq numbering across reopen, torn tails, damage, the run lock, tailing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from looptree.engine.core.events import (
    EVENTS_NAME,
    LOCK_NAME,
    TELEMETRY_NAME,
    EventLog,
    EventTail,
    RunLock,
    TelemetryLog,
    count_lines,
    iter_events,
    iter_run,
    last_samples,
    read_events,
    samples_and_offset,
)
from looptree.engine.errors import LooptreeError, RunLockedError


def raw_lines(run_dir: Path) -> list[bytes]:
    return (run_dir / EVENTS_NAME).read_bytes().split(b"\n")


# ---------------------------------------------------------------------------- writing and reading


def test_append_then_read_roundtrip(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "1"
    log = EventLog(run_dir, checked=False)
    first = log.append("run_started", run=1, project="/p", config={"a": [1, 2]})
    second = log.append("node_created", id="1", parent=None, phase=-1, kind="baseline", idea="naïve → fast")
    log.close()
    assert (first["seq"], second["seq"]) == (0, 1)
    assert first["type"] == "run_started" and isinstance(first["ts"], float)
    assert read_events(run_dir / EVENTS_NAME) == [first, second]
    # One compact JSON object per line, newline-terminated, non-ASCII kept as UTF-8.
    data = (run_dir / EVENTS_NAME).read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 2
    assert "naïve → fast".encode() in data


def test_unserialisable_fields_are_written_as_text(tmp_path: Path) -> None:
    log = EventLog(tmp_path, checked=False)
    log.append("message", text=Path("/x/y"))
    log.close()
    assert read_events(tmp_path / EVENTS_NAME)[0]["text"] == "/x/y"


def test_listeners_see_each_event_after_it_is_on_disk(tmp_path: Path) -> None:
    log = EventLog(tmp_path, checked=False)
    seen: list[tuple[int, int]] = []
    log.add_listener(lambda e: seen.append((e["seq"], len(read_events(tmp_path / EVENTS_NAME)))))
    log.append("run_paused")
    log.append("run_unpaused")
    log.close()
    assert seen == [(0, 1), (1, 2)]


def test_seq_numbering_continues_after_reopen(tmp_path: Path) -> None:
    log = EventLog(tmp_path, checked=False)
    for _ in range(3):
        log.append("run_paused")
    log.close()
    log = EventLog(tmp_path, checked=False)
    assert log.seq == 3
    assert log.append("engine_attached", pid=1)["seq"] == 3
    log.close()
    assert [e["seq"] for e in read_events(tmp_path / EVENTS_NAME)] == [0, 1, 2, 3]


def test_missing_log_reads_as_empty(tmp_path: Path) -> None:
    assert read_events(tmp_path / EVENTS_NAME) == []
    assert list(iter_events(tmp_path / "nope" / EVENTS_NAME)) == []


def test_blank_lines_are_ignored(tmp_path: Path) -> None:
    (tmp_path / EVENTS_NAME).write_text('{"seq":0,"type":"a"}\n\n  \n{"seq":1,"type":"b"}\n')
    assert [e["type"] for e in read_events(tmp_path / EVENTS_NAME)] == ["a", "b"]


# ---------------------------------------------------------------------------- torn tail and damage


def write_torn_log(run_dir: Path) -> None:
    """Two whole events, then half of a third without its newline: the engine died mid-write."""
    log = EventLog(run_dir, checked=False)
    log.append("run_started", run=1)
    log.append("node_created", id="1", parent=None, phase=-1, kind="baseline")
    log.close()
    line = json.dumps({"seq": 2, "ts": 1.0, "type": "node_failed", "id": "1", "reason": "x" * 40})
    with open(run_dir / EVENTS_NAME, "ab") as fh:
        fh.write(line[: len(line) // 2].encode())


def test_reader_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    write_torn_log(tmp_path)
    assert [e["type"] for e in read_events(tmp_path / EVENTS_NAME)] == ["run_started", "node_created"]


def test_reopen_truncates_the_torn_line_so_the_next_append_is_valid(tmp_path: Path) -> None:
    write_torn_log(tmp_path)
    log = EventLog(tmp_path, checked=False)
    assert log.seq == 2
    log.append("run_finished", reason="phases done")
    log.close()
    events = read_events(tmp_path / EVENTS_NAME)
    assert [(e["seq"], e["type"]) for e in events] == [(0, "run_started"), (1, "node_created"), (2, "run_finished")]
    lines = raw_lines(tmp_path)
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])


def test_reopen_of_a_log_that_is_only_a_torn_line(tmp_path: Path) -> None:
    (tmp_path / EVENTS_NAME).write_bytes(b'{"seq":0,"ty')
    assert read_events(tmp_path / EVENTS_NAME) == []
    log = EventLog(tmp_path, checked=False)
    assert log.seq == 0
    log.append("run_started", run=1)
    log.close()
    assert [e["seq"] for e in read_events(tmp_path / EVENTS_NAME)] == [0]


def test_torn_line_longer_than_the_scan_chunk_is_cut(tmp_path: Path) -> None:
    log = EventLog(tmp_path, checked=False)
    log.append("run_started", run=1)
    log.close()
    with open(tmp_path / EVENTS_NAME, "ab") as fh:
        fh.write(b'{"seq":1,"type":"agent_finished","text":"' + b"y" * 200_000)
    log = EventLog(tmp_path, checked=False)
    log.append("run_paused")
    log.close()
    assert [e["type"] for e in read_events(tmp_path / EVENTS_NAME)] == ["run_started", "run_paused"]


def test_garbled_middle_line_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_NAME
    path.write_text('{"seq":0,"type":"a"}\n{"seq":1,"ty\n{"seq":2,"type":"c"}\n')
    with pytest.raises(LooptreeError) as info:
        read_events(path)
    assert str(info.value) == f"{path}: line 2 is not valid JSON (the event log is damaged)"


def test_reopen_cuts_a_garbled_newline_terminated_last_line(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_NAME
    path.write_bytes(b'{"seq":0,"type":"run_started"}\n{"seq":1,"ty\n')
    assert len(read_events(path)) == 1
    log = EventLog(tmp_path, checked=False)
    log.append("run_paused")
    log.close()
    assert [e["type"] for e in read_events(path)] == ["run_started", "run_paused"]


# ---------------------------------------------------------------------------- the run lock


def test_second_holder_in_the_same_process_is_refused(tmp_path: Path) -> None:
    """flock binds to the open file description: each RunLock opens its own, so even one process is refused."""
    run_dir = tmp_path / "7"
    first = RunLock(run_dir)
    first.acquire()
    try:
        with pytest.raises(RunLockedError) as info:
            RunLock(run_dir).acquire()
        host = (run_dir / LOCK_NAME).read_text().split(" on ", 1)[1]
        assert str(info.value) == (f"run 7 is already driven by pid {os.getpid()} on {host}; "
                                   f"use `looptree attach {run_dir}` to watch it")
    finally:
        first.release()
    second = RunLock(run_dir)
    second.acquire()
    second.release()


HOLDER = textwrap.dedent("""
    import sys, pathlib
    from looptree.engine.core.events import RunLock
    lock = RunLock(pathlib.Path(sys.argv[1]))
    lock.acquire()
    print("held", flush=True)
    sys.stdin.read()
""")


def test_lock_held_by_another_process_refuses_then_frees_when_it_dies(tmp_path: Path) -> None:
    run_dir = tmp_path / "3"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert RunLock.is_held(run_dir)
        with pytest.raises(RunLockedError) as info:
            RunLock(run_dir).acquire()
        message = str(info.value)
        assert message.startswith(f"run 3 is already driven by pid {holder.pid} on ")
        assert message.endswith(f"use `looptree attach {run_dir}` to watch it")
        assert "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean release: the kernel must drop the lock
        holder.wait(timeout=10)
    assert not RunLock.is_held(run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    assert (run_dir / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()


def test_is_held_follows_acquire_and_release(tmp_path: Path) -> None:
    assert not RunLock.is_held(tmp_path)  # no lock file at all
    lock = RunLock(tmp_path)
    lock.acquire()
    assert RunLock.is_held(tmp_path)
    lock.release()
    assert not RunLock.is_held(tmp_path)
    lock.release()  # releasing twice is harmless


# ---------------------------------------------------------------------------- tailing


def test_event_tail_returns_only_new_complete_events(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_NAME
    tail = EventTail(path)
    assert tail.poll() == []  # no file yet
    log = EventLog(tmp_path, checked=False)
    log.append("run_started", run=1)
    assert [e["type"] for e in tail.poll()] == ["run_started"]
    assert tail.poll() == []
    log.append("run_paused")
    log.append("run_unpaused")
    assert [e["seq"] for e in tail.poll()] == [1, 2]
    log.close()


def test_event_tail_holds_a_partial_line_until_it_completes(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_NAME
    line = json.dumps({"seq": 0, "ts": 1.0, "type": "run_started", "run": 1}) + "\n"
    tail = EventTail(path)
    with open(path, "ab") as fh:
        fh.write(line[:10].encode())
    assert tail.poll() == []
    with open(path, "ab") as fh:
        fh.write(line[10:25].encode())
    assert tail.poll() == []
    with open(path, "ab") as fh:
        fh.write(line[25:].encode() + line.replace('"seq": 0', '"seq": 1').encode()[:5])
    assert [e["seq"] for e in tail.poll()] == [0]
    with open(path, "ab") as fh:
        fh.write(line.replace('"seq": 0', '"seq": 1').encode()[5:])
    assert [e["seq"] for e in tail.poll()] == [1]


def test_event_tail_skips_a_garbled_complete_line(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_NAME
    path.write_text('{"seq":0,"type":"a"}\nnot json\n{"seq":2,"type":"c"}\n')
    assert [e["type"] for e in EventTail(path).poll()] == ["a", "c"]


def test_event_tail_survives_a_resume_cutting_the_torn_tail(tmp_path: Path) -> None:
    write_torn_log(tmp_path)
    tail = EventTail(tmp_path / EVENTS_NAME)
    assert len(tail.poll()) == 2  # the viewer attached to the crashed run
    log = EventLog(tmp_path, checked=False)  # `looptree resume` takes over
    log.append("engine_attached", pid=1, orphans_killed=0, worktrees_removed=0, note="z" * 100)
    log.close()
    assert [e["type"] for e in tail.poll()] == ["engine_attached"]


def test_reopen_keeps_a_valid_last_event_longer_than_the_scan_chunk(tmp_path: Path) -> None:
    """A 200 KB agent reply is one event; reopening must not cut it (nor glue the next append to it)."""
    log = EventLog(tmp_path, checked=False)
    log.append("run_started")
    log.append("agent_finished", text="x" * 200_000)
    log.close()
    log = EventLog(tmp_path, checked=False)
    log.append("run_paused")
    log.close()
    events = read_events(tmp_path / EVENTS_NAME)
    assert [e["type"] for e in events] == ["run_started", "agent_finished", "run_paused"]
    assert len(events[1]["text"]) == 200_000


def test_reopen_cuts_a_torn_last_event_longer_than_the_scan_chunk(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_NAME
    path.write_bytes(b'{"seq":0,"type":"run_started"}\n{"seq":1,"type":"agent_finished","text":"' + b"y" * 150_000)
    log = EventLog(tmp_path, checked=False)
    log.append("run_paused")
    log.close()
    assert [e["type"] for e in read_events(path)] == ["run_started", "run_paused"]


# --------------------------------------------------------------------------- a log that scales
def test_reader_streams_without_reading_the_whole_file(tmp_path: Path) -> None:
    """The reader holds one line at a time: it yields the first event before the file ends."""
    log = EventLog(tmp_path, checked=False)
    for index in range(3):
        log.append("message", text=str(index))
    log.close()
    stream = iter_events(tmp_path / EVENTS_NAME)
    first = next(stream)
    with open(tmp_path / EVENTS_NAME, "a") as fh:  # appended after the reader started
        fh.write(json.dumps({"seq": 3, "ts": 1.0, "type": "message", "text": "late"}) + "\n")
    assert first["text"] == "0"
    assert [e["text"] for e in stream] == ["1", "2", "late"]


def test_skip_types_leaves_samples_out_and_still_catches_damage(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_NAME
    path.write_text(
        '{"seq":0,"ts":1,"type":"run_started","run":1}\n'
        '{"seq":1,"ts":2,"type":"gpu_sample","device":0,"fields":{"util":5}}\n'
        '{"seq":2,"ts":3,"type":"message","text":"x"}\n'
    )
    kept = list(iter_events(path, skip_types=frozenset({"gpu_sample"})))
    assert [e["type"] for e in kept] == ["run_started", "message"]
    path.write_text(path.read_text().replace('"type":"message"', '"type":"message" garbage'))
    assert [e["type"] for e in iter_events(path)] == ["run_started", "gpu_sample"]  # a torn last line
    path.write_text(path.read_text() + '{"seq":3,"ts":4,"type":"message"}\n')
    with pytest.raises(LooptreeError, match="line 3"):  # the same line in the middle is damage
        list(iter_events(path, skip_types=frozenset({"gpu_sample"})))


def test_writer_counts_lines_to_continue_the_sequence(tmp_path: Path) -> None:
    log = EventLog(tmp_path, checked=False)
    for _ in range(5):
        log.append("message", text="x")
    log.close()
    with open(tmp_path / EVENTS_NAME, "a") as fh:
        fh.write('{"seq":5,"ts":1,"type":"mes')  # torn: cut on reopen, not counted
    assert count_lines(tmp_path / EVENTS_NAME) == 5
    log = EventLog(tmp_path, checked=False)
    assert log.append("message", text="y")["seq"] == 5
    log.close()


def test_telemetry_lives_beside_the_log_and_replay_merges_by_time(tmp_path: Path) -> None:
    log = EventLog(tmp_path, checked=False)
    samples = TelemetryLog(tmp_path)
    log.append("run_started", run=1)
    first = samples.append(0, {"util": 10.0})
    log.append("message", text="between")
    second = samples.append(1, {"util": 20.0})
    log.close()
    samples.close()
    assert [e["type"] for e in read_events(tmp_path / EVENTS_NAME)] == ["run_started", "message"]
    assert [s["device"] for s in last_samples(tmp_path)] == [0, 1]
    assert "seq" not in first and second["fields"] == {"util": 20.0}
    merged = [(e["type"], e.get("device")) for e in iter_run(tmp_path)]
    assert merged == [("run_started", None), ("gpu_sample", 0), ("message", None), ("gpu_sample", 1)]


def test_last_samples_reads_only_the_end_and_drops_the_cut_line(tmp_path: Path) -> None:
    samples = TelemetryLog(tmp_path)
    for step in range(2000):
        samples.append(step % 4, {"util": float(step)})
    samples.close()
    tail = last_samples(tmp_path, limit_bytes=4096)
    assert 10 < len(tail) < 2000
    assert tail[-1]["fields"]["util"] == 1999.0
    steps = [s["fields"]["util"] for s in tail]
    assert steps == sorted(steps) and steps == list(range(int(steps[0]), 2000))  # whole lines, none cut


def test_a_viewer_tails_samples_from_where_its_first_read_ended(tmp_path: Path) -> None:
    """A sample written half-way (no newline yet) when the viewer starts is read once, by the tail."""
    samples = TelemetryLog(tmp_path)
    for step in range(3):
        samples.append(0, {"util": float(step)})
    samples.close()
    path = tmp_path / TELEMETRY_NAME
    whole = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(b'{"ts":9.0,"type":"gpu_sample","device":0,"fields":{"util":3.0}')  # the writer, mid-line
    first, offset = samples_and_offset(tmp_path)
    assert [s["fields"]["util"] for s in first] == [0.0, 1.0, 2.0] and offset == len(whole)
    with open(path, "ab") as fh:
        fh.write(b"}\n")
    tail = EventTail(path, offset)
    assert [s["fields"]["util"] for s in tail.poll()] == [3.0]


def test_fold_of_a_run_dir_tracks_the_control_offset_and_skips_samples(tmp_path: Path) -> None:
    from looptree.engine.core.state import RunState

    path = tmp_path / EVENTS_NAME
    path.write_text(
        '{"seq":0,"ts":1,"type":"run_started","run":3,"config":{}}\n'
        '{"seq":1,"ts":2,"type":"gpu_sample","device":0,"fields":{"util":5}}\n'
        '{"seq":2,"ts":3,"type":"run_paused","control_offset":120}\n'
        '{"seq":3,"ts":4,"type":"run_unpaused","control_offset":80}\n'
    )
    state = RunState.load(tmp_path)
    assert state.run == 3 and state.control_offset == 120 and state.paused is False
    assert state.gpu == {}  # samples are not part of the run's state


def test_the_writer_checks_every_event_against_the_schema(tmp_path: Path, monkeypatch) -> None:
    """Strict (the suite): a bad event raises. A user's run: written, and said once per type."""
    from looptree.engine.core.schema import EventSchemaError

    log = EventLog(tmp_path)
    with pytest.raises(EventSchemaError, match="node_failed"):
        log.append("node_failed", id="1.1", stage="build")  # no reason
    monkeypatch.delenv("LOOPTREE_STRICT_EVENTS")
    log.append("node_failed", id="1.1", stage="build")
    log.append("node_failed", id="1.2", stage="build")
    log.close()
    events = read_events(tmp_path / EVENTS_NAME)
    assert [e["type"] for e in events] == ["message", "node_failed", "node_failed"]
    assert events[0]["text"].startswith("internal: event 'node_failed': reason")
