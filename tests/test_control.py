"""The control channel: command validation (shared by `looptree ctl` and the dashboard) and tailing."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from looptree.engine.errors import LooptreeError
from looptree.engine.run.control import (
    COMMANDS,
    CONTROL_NAME,
    KEY_NAME,
    MAX_READ,
    ControlTail,
    append_control,
    control_key,
    make_command,
    new_budget,
    parse_budget,
    sign_record,
)

# ---------------------------------------------------------------------------- make_command


@pytest.mark.parametrize("cmd", ["pause", "resume", "stop"])
def test_commands_without_arguments(cmd: str) -> None:
    record = make_command(cmd)
    assert record["cmd"] == cmd and isinstance(record["ts"], float)
    assert set(record) == {"ts", "cmd"}


@pytest.mark.parametrize("cmd", ["prune", "pin", "unpin", "kill"])
def test_commands_with_a_node_id(cmd: str) -> None:
    record = make_command(cmd, "3.2.1")
    assert set(record) == {"ts", "cmd", "id"}
    assert (record["cmd"], record["id"]) == (cmd, "3.2.1")


def test_fork_carries_its_hint() -> None:
    record = make_command("fork", "3.2", hint="try a lookup table")
    assert (record["id"], record["hint"]) == ("3.2", "try a lookup table")
    assert make_command("fork", "3")["hint"] == ""


def test_budget_keeps_the_text_for_the_engine_to_apply() -> None:
    assert make_command("budget", tokens="+500k")["tokens"] == "+500k"


def test_unknown_command_lists_the_valid_ones() -> None:
    with pytest.raises(LooptreeError) as info:
        make_command("paws")
    assert str(info.value) == ("unknown command 'paws'; one of: "
                               "pause, resume, stop, prune, pin, unpin, fork, budget, kill")
    assert set(COMMANDS) >= {"pause", "resume", "stop", "prune", "pin", "unpin", "fork", "budget"}


@pytest.mark.parametrize("cmd", ["prune", "pin", "unpin", "fork", "kill"])
def test_missing_node_id(cmd: str) -> None:
    with pytest.raises(LooptreeError) as info:
        make_command(cmd)
    assert str(info.value) == f"`{cmd}` needs a node ID like 3.2.1, got None"


@pytest.mark.parametrize("bad", ["abc", "3.", ".3", "3..2", "3.x", "-1", "3 2", ""])
def test_bad_node_id(bad: str) -> None:
    with pytest.raises(LooptreeError) as info:
        make_command("prune", bad)
    assert str(info.value) == f"`prune` needs a node ID like 3.2.1, got {bad!r}"


def test_budget_needs_a_token_count() -> None:
    with pytest.raises(LooptreeError) as info:
        make_command("budget")
    assert str(info.value) == "`budget` needs a token count: budget 2000000 | +500000 | -100000"


def test_budget_with_a_bad_count() -> None:
    with pytest.raises(LooptreeError) as info:
        make_command("budget", tokens="lots")
    assert str(info.value) == "budget 'lots' is not a token count like 2000000, +500k or -1e5"


# ---------------------------------------------------------------------------- parse_budget


@pytest.mark.parametrize("text, parsed", [
    ("2000000", ("", 2_000_000)),
    ("+500000", ("+", 500_000)),
    ("+500k", ("+", 500_000)),
    ("300K", ("", 300_000)),
    ("-1e5", ("-", 100_000)),
    ("1E3", ("", 1_000)),
    ("2M", ("", 2_000_000)),
    ("2m", ("", 2_000_000)),
    ("1.5k", ("", 1_500)),
    (" +2M ", ("+", 2_000_000)),
])
def test_parse_budget(text: str, parsed: tuple[str, int]) -> None:
    assert parse_budget(text) == parsed


@pytest.mark.parametrize("text", ["", "k", "1,000", "1e-3", "++5", "5 k", "five", "2G"])
def test_parse_budget_refuses(text: str) -> None:
    with pytest.raises(LooptreeError, match="is not a token count like 2000000, \\+500k or -1e5"):
        parse_budget(text)


def test_parse_budget_refuses_an_overflowing_exponent() -> None:
    with pytest.raises(LooptreeError):
        parse_budget("1e400")


# ---------------------------------------------------------------------------- append + tail


def test_append_then_poll_incrementally(tmp_path: Path) -> None:
    tail = ControlTail(tmp_path / CONTROL_NAME)
    assert tail.poll() == []  # no file yet
    append_control(tmp_path, make_command("pause"))
    append_control(tmp_path, make_command("prune", "1.2"))
    got = tail.poll()
    assert [(r["cmd"], r.get("id")) for r in got] == [("pause", None), ("prune", "1.2")]
    assert tail.poll() == []
    append_control(tmp_path, make_command("budget", tokens="-1e5"))
    assert [r["tokens"] for r in tail.poll()] == ["-1e5"]
    assert tail.offset == (tmp_path / CONTROL_NAME).stat().st_size


def test_each_command_is_one_json_line(tmp_path: Path) -> None:
    append_control(tmp_path, make_command("fork", "1", hint="line one\nline two"))
    lines = (tmp_path / CONTROL_NAME).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["hint"] == "line one\nline two"


def _signed_line(run_dir: Path, record: dict, at: int) -> str:
    """A line as `append_control` writes it at byte `at` (for tests that write it in pieces)."""
    body = dict(record, at=at)
    body["sig"] = sign_record(control_key(run_dir), body)
    return json.dumps(body, separators=(",", ":")) + "\n"


def test_poll_waits_for_a_partial_line(tmp_path: Path) -> None:
    path = tmp_path / CONTROL_NAME
    line = _signed_line(tmp_path, {"ts": 1.0, "cmd": "stop"}, 0)
    second = _signed_line(tmp_path, {"ts": 1.0, "cmd": "stop"}, len(line))
    tail = ControlTail(path)
    path.write_text(line[:7])
    assert tail.poll() == [] and tail.offset == 0
    with open(path, "a") as fh:
        fh.write(line[7:] + second[:3])
    assert [r["cmd"] for r in tail.poll()] == ["stop"]
    assert tail.offset == len(line)
    with open(path, "a") as fh:
        fh.write(second[3:])
    assert [r["cmd"] for r in tail.poll()] == ["stop"]
    assert tail.offset == len(line) + len(second)


def test_garbage_unsigned_and_unknown_lines_are_refused_not_obeyed(tmp_path: Path) -> None:
    control_key(tmp_path)
    path = tmp_path / CONTROL_NAME
    path.write_text('not json\n[1, 2]\n{"cmd": "explode"}\n{"ts": 1, "cmd": "resume"}\n')
    records = ControlTail(path).poll()
    assert all("_refused" in r for r in records) and len(records) == 4
    assert [r["_refused"] for r in records] == ["not a JSON object", "not a JSON object", "not signed", "not signed"]
    assert records[-1]["_offset"] == path.stat().st_size


def test_forged_and_copied_lines_are_refused_and_a_real_one_still_works(tmp_path: Path) -> None:
    append_control(tmp_path, make_command("pause"))
    path = tmp_path / CONTROL_NAME
    genuine = path.read_text()
    forged = dict(json.loads(genuine), cmd="budget", tokens="+5000000")  # the signature of another line
    with open(path, "a") as fh:
        fh.write(json.dumps(forged) + "\n")
        fh.write(genuine)  # a copy of a signed line, replayed at a later offset
        wrong_key = dict(json.loads(genuine), at=path.stat().st_size)
        wrong_key["sig"] = sign_record(b"\x00" * 32, wrong_key)
        fh.write(json.dumps(wrong_key) + "\n")
    append_control(tmp_path, make_command("budget", tokens="+10"))
    records = ControlTail(path).poll()
    assert records[0]["cmd"] == "pause" and "_refused" not in records[0]
    assert records[1]["_refused"] == "bad signature"
    assert records[2]["_refused"].startswith("signed for byte 0, found at byte")
    assert records[3]["_refused"] == "bad signature"
    assert records[4]["tokens"] == "+10" and "_refused" not in records[4]


def test_the_key_is_private_and_shared_by_every_writer(tmp_path: Path) -> None:
    key = control_key(tmp_path)
    path = tmp_path / KEY_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert control_key(tmp_path) == key and len(key) == 32
    assert control_key(tmp_path / "nowhere", create=False) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary key file was left"


def test_a_run_without_a_key_refuses_every_line(tmp_path: Path) -> None:
    path = tmp_path / CONTROL_NAME
    path.write_text(json.dumps({"ts": 1, "cmd": "stop", "at": 0, "sig": "0" * 64}) + "\n")
    assert ControlTail(path).poll()[0]["_refused"] == "the run has no control key"


def test_an_overlong_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / CONTROL_NAME
    path.write_bytes(b"x" * (MAX_READ * 2 + 10) + b"\n")
    append_control(tmp_path, make_command("pause"))
    tail = ControlTail(path)
    seen = []
    for _ in range(5):
        seen += tail.poll()
    assert [r.get("_refused") for r in seen] == [f"a line longer than {MAX_READ} bytes", None]
    assert seen[1]["cmd"] == "pause" and tail.offset == path.stat().st_size


def test_budget_below_one_token_is_refused() -> None:
    assert new_budget(1000, "-999") == 1
    assert new_budget(1000, "+5k") == 6000
    with pytest.raises(LooptreeError, match="would leave 0 tokens"):
        new_budget(1000, "-1000")
    with pytest.raises(LooptreeError, match="at least 1 token"):
        make_command("budget", tokens="0")


def test_tail_can_start_from_a_saved_offset(tmp_path: Path) -> None:
    append_control(tmp_path, make_command("pause"))
    offset = (tmp_path / CONTROL_NAME).stat().st_size
    append_control(tmp_path, make_command("resume"))
    assert [r["cmd"] for r in ControlTail(tmp_path / CONTROL_NAME, offset).poll()] == ["resume"]
