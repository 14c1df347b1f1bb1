"""`looptree doctor [DIR]`: one screen of what a run would get here, against a real local server.

The endpoint rows come from a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/llm_server.py)
reached by a real `looptree doctor` subprocess; the wrong-port case points at a port nothing
listens on. A section whose module is missing must say "not available: <why>", never crash.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from looptree.engine.run.doctor import Section, cluster_section, guarded, render

try:
    from llm_server import llm_server
except ImportError:  # tests/ became a package
    from tests.llm_server import llm_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
[project]
goal = "Make solve() faster."
writable = ["solver.py"]

[bench]
command = "python bench.py"

[agent]
provider = "local"
model = "test-model"
base_url = "{url}"
"""


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def project(tmp_path: Path, url: str) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "solver.py").write_text("def solve(xs):\n    return sum(xs)\n")
    (proj / "looptree.toml").write_text(CONFIG.format(url=url))
    return proj


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "LOOPTREE_"))}
    return subprocess.run([sys.executable, "-m", "looptree.engine.cli", "doctor", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def section_lines(out: str, title: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index(title)
    block = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        block.append(line)
    return block


def test_doctor_reaches_a_real_server(tmp_path: Path, llm_server) -> None:
    result = doctor(str(project(tmp_path, llm_server.base_url)))
    assert "Traceback" not in result.stderr, result.stderr
    out = result.stdout
    for title in ("configuration", "sandbox and memory limit", "device locks", "GPUs (NVML)", "agent endpoints",
                  "cluster"):
        assert title in out.splitlines(), out
    endpoint = section_lines(out, "agent endpoints")
    assert len(endpoint) == 1 and endpoint[0].startswith("  ok    test-model at http://127.0.0.1:"), out
    assert "test-model" in endpoint[0].split("  ", 3)[-1]  # the reason names the model it found
    assert any(r.path.endswith("/models") for r in llm_server.other_requests)  # it really asked the server
    assert section_lines(out, "cluster") == ["        executor  local executor (cluster.backend = local)"]
    assert ("no failed check" in out) == (result.returncode == 0)


def test_doctor_names_a_wrong_port_and_fails(tmp_path: Path) -> None:
    port = closed_port()
    result = doctor(str(project(tmp_path, f"http://127.0.0.1:{port}/v1")))
    assert "Traceback" not in result.stderr, result.stderr
    endpoint = section_lines(result.stdout, "agent endpoints")
    assert len(endpoint) == 1 and endpoint[0].startswith(f"  FAIL  test-model at http://127.0.0.1:{port}"), result.stdout
    assert "reached" not in endpoint[0]
    assert result.returncode == 1
    assert "agent endpoints" in result.stdout.splitlines()[-1]  # the summary names the failed section


def test_doctor_without_a_config_uses_the_defaults(tmp_path: Path) -> None:
    result = doctor(str(tmp_path))
    assert "Traceback" not in result.stderr, result.stderr
    assert f"none in {tmp_path}: the rest uses the defaults" in result.stdout
    assert "not checked: no valid config" in result.stdout
    assert "sandbox and memory limit" in result.stdout


def test_doctor_reports_a_broken_config_and_goes_on(tmp_path: Path) -> None:
    (tmp_path / "looptree.toml").write_text("[project\n")
    result = doctor(str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "FAIL  looptree.toml" in result.stdout and "invalid TOML" in result.stdout
    assert "GPUs (NVML)" in result.stdout


def test_doctor_of_a_missing_directory_is_a_user_error(tmp_path: Path) -> None:
    result = doctor(str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"looptree: error: {tmp_path / 'nope'} is not a directory"


def test_a_missing_section_provider_says_not_available() -> None:
    def build() -> list:
        import looptree.gpu.no_such_module  # noqa: F401 - a module this build does not have

        return []

    def broken() -> list:
        raise RuntimeError("NVML_ERROR_UNKNOWN\n  at init")

    missing = guarded("device locks", "device locks", build)
    failing = guarded("GPUs (NVML)", "NVML", broken)
    assert missing.rows == [("device locks", "not available: looptree.gpu.no_such_module is not in this build", None)]
    assert failing.rows == [("NVML", "not available: NVML_ERROR_UNKNOWN at init", None)]
    text = render(Path("/p"), [missing, failing, Section("agent endpoints", [("m at u", "refused", False)])])
    assert "1 section(s) with a failed check: agent endpoints" in text


class FakeClusterConfig:
    """A fake config carrying only what `cluster_section` reads: `cluster.backend` and `.address`."""

    class cluster:
        backend = "ray"
        address = "127.0.0.1:1"  # nothing listens there


def test_a_ray_cluster_without_support_says_not_available() -> None:
    section = cluster_section(FakeClusterConfig())
    [(label, value, ok)] = section.rows
    # Ray is an optional extra this environment lacks (or nothing listens): a FAIL row with why
    assert label == "Ray cluster" and value.startswith("not available: ") and ok is False
    assert "cluster.backend = ray" in value


@pytest.mark.parametrize("argv", [["doctor", "--help"]])
def test_doctor_is_listed(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "looptree.engine.cli", *argv], cwd=ROOT, capture_output=True, check=False,
                            text=True, timeout=60)
    assert result.returncode == 0 and "KEY=VALUE" in result.stdout


def test_a_ray_cluster_that_listens_is_reachable() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        class Config:
            """A fake config: only `cluster.backend` and `cluster.address` are read."""

            class cluster:
                backend = "ray"
                address = f"127.0.0.1:{server.getsockname()[1]}"

        [(label, value, ok)] = cluster_section(Config()).rows
    assert label == "Ray cluster" and ok is True and value.startswith(f"reachable at {Config.cluster.address}")
