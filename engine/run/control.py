"""The control channel: commands from `looptree ctl` and the dashboard to the engine.

Why a file and not a socket: the engine may run under nohup on an HPC node while the dashboard
comes and goes over SSH; an append-only `control.jsonl` needs no daemon, survives either side
restarting, and leaves an audit trail. The engine tails it and turns each accepted command into
events, which is how every viewer learns what happened.

Why signed lines: the file sits in the run directory, where the code under test could find it
(`LOOPTREE_RUN_DIR`) and append `budget +5000000`. So the engine obeys only lines it can
attribute to `looptree ctl` or the dashboard: each run has a secret (`control.key`, 32 random
bytes, mode 0600, in the run directory and never in a worktree), and every line carries
`at` (the byte offset it was written at, taken under an exclusive lock) and `sig`, an
HMAC-SHA256 over the line's canonical JSON. A copied line names the wrong offset; a forged one
has no valid signature; either is refused with one event. Whoever comes first creates the key
(the engine at start or resume; `ctl` on a run that predates signing), so old runs keep working:
only their unsigned lines written while no engine ran are refused, and can be sent again.
The sandbox keeps the code under test away from the run directory altogether; the signature is
what holds where it cannot (`sandbox.mode = "off"`).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looptree.engine.errors import LooptreeError

CONTROL_NAME = "control.jsonl"
KEY_NAME = "control.key"
MAX_READ = 1 << 20  # a poll reads at most this much; a longer line is refused, never buffered whole
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
        sign, value = parse_budget(tokens)
        if sign == "" and value < 1:
            raise LooptreeError(f"budget {tokens!r} is below 1 token; the budget must stay at least 1 token")
        record["tokens"] = tokens
    return record


def new_budget(cap: int, tokens: str) -> int:
    """The cap after `budget TOKENS`; refused when it would fall below 1 token."""
    sign, value = parse_budget(tokens)
    new_cap = cap + value if sign == "+" else cap - value if sign == "-" else value
    if new_cap < 1:
        raise LooptreeError(f"budget {tokens} would leave {new_cap:,} tokens (now {cap:,}); "
                            "the budget must stay at least 1 token")
    return new_cap


# -- the run's key and the signatures ---------------------------------------------------------
def control_key(run_dir: Path, *, create: bool = True) -> bytes | None:
    """The run's control secret; created (mode 0600, atomically) by whoever needs it first."""
    path = run_dir / KEY_NAME
    for _ in range(2):
        try:
            key = bytes.fromhex(path.read_text().strip())
            if len(key) >= 16:
                return key
            raise LooptreeError(f"{path} is damaged (expected 64 hex digits); delete it and run `looptree resume`")
        except FileNotFoundError:
            if not create:
                return None
        except ValueError:
            raise LooptreeError(f"{path} is damaged (expected 64 hex digits); delete it and run `looptree resume`") from None
        tmp = path.with_name(f".{KEY_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another writer made the key first: then read theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    raise LooptreeError(f"could not create {path}")


def _canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "sig" and not k.startswith("_")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_record(key: bytes, record: dict[str, Any]) -> str:
    return hmac.new(key, _canonical(record), hashlib.sha256).hexdigest()


def append_control(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one signed command line: under an exclusive lock, so `at` is where it lands."""
    key = control_key(run_dir)
    assert key is not None
    fd = os.open(run_dir / CONTROL_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        signed = {k: v for k, v in record.items() if k not in ("at", "sig")}
        signed["at"] = os.fstat(fd).st_size
        signed["sig"] = sign_record(key, signed)
        os.write(fd, (json.dumps(signed, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)  # closing releases the lock


def verify_line(key: bytes | None, raw: bytes, start: int) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a line `ctl` or the dashboard wrote at byte `start`; else (None, why not)."""
    if key is None:
        return None, "the run has no control key"
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "not a JSON object"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    sig = record.get("sig")
    if not isinstance(sig, str):
        return None, "not signed"
    if not hmac.compare_digest(sig, sign_record(key, record)):
        return None, "bad signature"
    if record.get("at") != start:
        return None, f"signed for byte {record.get('at')}, found at byte {start} (a copied line)"
    if record.get("cmd") not in COMMANDS:
        return None, f"unknown command {record.get('cmd')!r}"
    return record, None


@dataclass
class ControlTail:
    """The engine's reader: new complete command lines since the last poll.

    Each returned record has `_offset` (where a resume continues once it is handled); a line
    that cannot be attributed to `ctl` or the dashboard comes back as `{"_refused": why, ...}`.
    """

    path: Path
    offset: int = 0
    key: bytes | None = None
    _skipping: bool = False  # inside an over-long line: drop up to its end

    def poll(self) -> list[dict[str, Any]]:
        if self.key is None:
            self.key = control_key(self.path.parent, create=False)
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(MAX_READ)
        except FileNotFoundError:
            return []
        out: list[dict[str, Any]] = []
        if self._skipping:
            cut = data.find(b"\n")
            if cut < 0:
                self.offset += len(data)
                return out
            self.offset += cut + 1
            data = data[cut + 1:]
            self._skipping = False
            out.append({"_refused": f"a line longer than {MAX_READ} bytes", "_offset": self.offset})
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) >= MAX_READ:
                self.offset += len(data)
                self._skipping = True
            return out
        base = self.offset
        self.offset += end + 1
        position = base
        for raw in data[: end + 1].split(b"\n")[:-1]:
            start = position
            position += len(raw) + 1
            if not raw.strip():
                continue
            record, why = verify_line(self.key, raw, start)
            if record is None:
                out.append({"_refused": why, "_offset": position})
                continue
            record["_offset"] = position
            out.append(record)
        return out
