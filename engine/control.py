"""The control channel: commands from `looptree ctl` and the dashboard to the engine.

Why a file and not a socket: the engine may run under nohup on an HPC node while the dashboard
comes and goes over SSH; an append-only `control.jsonl` needs no daemon, survives either side
restarting, and leaves an audit trail. The engine tails it and turns each accepted command into
events, which is how every viewer learns what happened.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looptree.engine.errors import LooptreeError

CONTROL_NAME = "control.jsonl"
COMMANDS = ("pause", "resume", "stop", "prune", "pin", "unpin", "fork", "budget", "kill")
NEEDS_ID = ("prune", "pin", "unpin", "fork", "kill")
_NODE_ID = re.compile(r"^\d+(\.\d+)*$")
_BUDGET = re.compile(r"^([+-]?)(\d+(?:\.\d+)?(?:[eE]\d+)?)([kKmM]?)$")


def parse_budget(text: str) -> tuple[str, int]:
    """`+500000`, `-1e5`, `2M`, `300k` → (sign, tokens); sign '' means set absolutely."""
    match = _BUDGET.match(text.strip())
    if not match:
        raise LooptreeError(f"budget {text!r} is not a token count like 2000000, +500k or -1e5")
    sign, number, unit = match.groups()
    scale = {"": 1, "k": 1_000, "m": 1_000_000}[unit.lower()]
    value = float(number) * scale
    if not math.isfinite(value) or value > 1e15:
        raise LooptreeError(f"budget {text!r} is too large")
    if value != int(value):
        raise LooptreeError(f"budget {text!r} is not a whole number of tokens")
    return sign, int(value)


def make_command(cmd: str, node_id: str | None = None, *, hint: str | None = None, tokens: str | None = None) -> dict[str, Any]:
    """Validate one command; the same checks serve `looptree ctl` and the dashboard."""
    if cmd not in COMMANDS:
        raise LooptreeError(f"unknown command {cmd!r}; one of: {', '.join(COMMANDS)}")
    record: dict[str, Any] = {"ts": round(time.time(), 6), "cmd": cmd}
    if cmd in NEEDS_ID:
        if not node_id or not _NODE_ID.match(node_id):
            raise LooptreeError(f"`{cmd}` needs a node ID like 3.2.1, got {node_id!r}")
        record["id"] = node_id
    if cmd == "fork":
        record["hint"] = hint or ""
    if cmd == "budget":
        if tokens is None:
            raise LooptreeError("`budget` needs a token count: budget 2000000 | +500000 | -100000")
        parse_budget(tokens)
        record["tokens"] = tokens
    return record


def append_control(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one command line atomically (O_APPEND, one write)."""
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(run_dir / CONTROL_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@dataclass
class ControlTail:
    """The engine's reader: new complete command lines since the last poll."""

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
        base = self.offset
        self.offset += end + 1
        out = []
        position = base
        for raw in data[: end + 1].split(b"\n")[:-1]:
            position += len(raw) + 1
            if raw.strip():
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("cmd") in COMMANDS:
                    record["_offset"] = position  # where a resume continues once this one is handled
                    out.append(record)
        return out
