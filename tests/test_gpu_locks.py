"""Machine-wide device locks: two real processes never hold one device's lock at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from looptree.gpu.devices import locks

HOLDER = """
import sys, time
from looptree.gpu.devices.locks import hold
with hold(sys.argv[1], "test holder " + sys.argv[2], on_wait=lambda who: print("waiting for", who, flush=True)):
    print("acquired", time.monotonic(), flush=True)
    time.sleep(float(sys.argv[3]))
    print("released", time.monotonic(), flush=True)
"""


def _start(key: str, name: str, seconds: float, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", HOLDER, key, name, str(seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "LOOPTREE_LOCK_DIR": str(tmp_path / "locks")}


def test_the_second_process_waits_says_so_and_never_overlaps(tmp_path: Path, monkeypatch) -> None:
    env = _env(tmp_path)
    monkeypatch.setenv("LOOPTREE_LOCK_DIR", env["LOOPTREE_LOCK_DIR"])
    key = locks.cpu_key()
    first = _start(key, "A", 1.5, env)
    assert first.stdout is not None
    assert first.stdout.readline().startswith("acquired")  # A holds it before B starts
    rows = locks.describe_locks()
    assert any(label == key and "held by" in value and "test holder A" in value for label, value, _ in rows), rows
    second = _start(key, "B", 0.1, env)
    out_a, _ = first.communicate(timeout=30)
    out_b, err_b = second.communicate(timeout=30)
    assert second.returncode == 0, err_b
    assert "waiting for" in out_b and "test holder A" in out_b  # says whom it waits for
    released_a = float(out_a.split("released")[1].split()[0])
    acquired_b = float(out_b.split("acquired")[1].split()[0])
    assert acquired_b >= released_a  # the two holds never overlap
    assert any(label == key and value == "free" for label, value, _ in locks.describe_locks())


def test_a_killed_holder_frees_the_device(tmp_path: Path) -> None:
    env = _env(tmp_path)
    key = locks.gpu_key("GPU-1234", 0)
    first = _start(key, "A", 60, env)
    assert first.stdout is not None and first.stdout.readline().startswith("acquired")
    first.kill()
    first.wait(timeout=10)
    started = time.monotonic()
    second = _start(key, "B", 0, env)
    out_b, _ = second.communicate(timeout=30)
    assert "acquired" in out_b and time.monotonic() - started < 20


def test_keys_name_the_host_and_other_hosts_locks_never_matter(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOOPTREE_LOCK_DIR", str(tmp_path / "locks"))
    host = locks.host()
    assert locks.key_for(None, concurrency=1) == f"cpu-{host}"
    assert locks.key_for(None, concurrency=4) is None  # the user allowed overlapping CPU benches
    assert locks.key_for(0, uuid="GPU-ab:cd") == f"gpu-{host}-GPU-ab_cd"
    assert locks.key_for(1) == f"gpu-{host}-index1"
    # another host's lock in a shared folder, held right now: this host neither waits nor lists it
    other = "gpu-some-other-node-GPU-1"
    holder = _start(other, "remote", 30, _env(tmp_path))
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("acquired")
        started = time.monotonic()
        with locks.hold(locks.key_for(0, uuid="GPU-1"), "local bench", timeout=5):
            pass
        assert time.monotonic() - started < 2
        assert all(label != other for label, _, _ in locks.describe_locks())
    finally:
        holder.kill()
        holder.wait(timeout=10)


SOLVER = "VALUE = 100\n# knob\n"
BENCH = """\
import os
import solver
with open(os.environ.get("LOOPTREE_METRICS", "metrics.csv"), "w") as fh:
    fh.write("iteration,runtime_ms (lower is better)\\n")
    fh.write(f"0,{float(solver.VALUE)}\\n")
"""


async def test_a_run_waits_for_another_process_holding_the_cpu_and_says_so(tmp_path: Path, monkeypatch) -> None:
    """A real engine run (bench.concurrency 1, CPU) while another process holds cpu-<host>."""
    import json

    from looptree.engine.core.config import validate_config
    from looptree.engine.core.events import read_events
    from looptree.engine.run.engine import Engine
    from looptree.gpu.devices.telemetry import NoneBackend

    env = _env(tmp_path)
    monkeypatch.setenv("LOOPTREE_LOCK_DIR", env["LOOPTREE_LOCK_DIR"])
    project = tmp_path / "proj"
    project.mkdir()
    (project / "solver.py").write_text(SOLVER)
    (project / "bench.py").write_text(BENCH)
    reply = {"role": "ideas", "node_id": None, "request_hash": None, "when": None, "request": None,
             "response": {"text": json.dumps(["one idea"]), "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                          "finish_reason": "stop", "model": "test-model"}}
    cassette = tmp_path / "cassette.jsonl"
    cassette.write_text(json.dumps(reply) + "\n")
    config = validate_config({
        "project": {"goal": "Lower runtime_ms.", "writable": ["solver.py"], "readonly": ["bench.py"]},
        "bench": {"command": f"{sys.executable} bench.py", "repeats": 1, "compare": "off", "timeout": 60,
                  "device": "cpu"},
        "agent": {"provider": "replay", "cassette": str(cassette)},
        "search": {"num_samples": 1, "num_phases": 1, "num_workers": 1, "max_fix_attempts": 0},
    })
    holder = _start(locks.cpu_key(), "A", 2.0, env)
    assert holder.stdout is not None and holder.stdout.readline().startswith("acquired")
    engine = await Engine.create(project, config, telemetry=NoneBackend("no GPU in this test"))
    await engine.run()
    holder.communicate(timeout=30)
    events = list(read_events(engine.run_dir / "events.jsonl"))
    waits = [e for e in events if e["type"] == "message" and "waiting for device lock" in str(e.get("text"))]
    assert waits and locks.cpu_key() in waits[0]["text"] and "test holder A" in waits[0]["text"]
    assert any(e["type"] == "node_evaluated" for e in events)  # and it benchmarked once the lock was free
