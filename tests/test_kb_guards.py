"""The KernelBench bench against hostile candidates: every cheap hack is refused or made suspect.

Each hack in sample_projects/kernelbench/level1/solutions/hacks/ runs through the real bench in
a real process (it patches the process it runs in, so never in pytest's). A test here fails
when the guard it names is taken out: the old bench credited each of these as correct and
faster (or, for the memory test, was killed).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from looptree.gpu.kernelbench import runner as kb_bench

REPO = Path(__file__).resolve().parents[1]
LEVEL1 = REPO / "sample_projects" / "kernelbench" / "level1"
HACKS = LEVEL1 / "solutions" / "hacks"
QUICK = ["--no-compile", "--warmup-seconds", "0", "--trials", "6", "--seeds", "2"]


def run_bench(problem: Path, solution: Path, tmp_path: Path, *extra: str,
              limit_mb: int | None = None, timeout: float = 120) -> tuple[int, dict, str]:
    out = tmp_path / "result.json"

    def limit() -> None:
        if limit_mb is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 2**20, limit_mb * 2**20))

    proc = subprocess.run([sys.executable, "-m", "looptree.gpu.kernelbench.runner", "--problem", str(problem),
                           "--solution", str(solution), "--json", str(out), "--metrics", str(tmp_path / "m.csv"),
                           *QUICK, *extra], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit)
    return proc.returncode, json.loads(out.read_text()), proc.stderr


def credited(result: dict) -> bool:
    """What fast_p counts: correct, not suspect, and faster."""
    return bool(result["correct"]) and not result["suspect"] and (result["speedup_vs_eager"] or 0) > 1.0


@pytest.mark.parametrize(
    ("hack", "words"),
    [
        ("1_slow_clock.py", "time.perf_counter"),  # the clock is taken before the import
        ("1_rand_repeat.py", "torch.rand"),  # torch's RNG functions are put back before inputs are made
        ("1_precompute_in_inputs.py", "problem.get_inputs"),  # work moved into input creation
        ("1_threads.py", "instead of 1)"),  # threads restored and checked per trial
    ],
)
def test_tampering_with_the_process_is_put_back_and_suspect(tmp_path: Path, hack: str, words: str) -> None:
    rc, result, stderr = run_bench(LEVEL1 / "1_Matmul_ReLU.py", HACKS / hack, tmp_path, "--in-process")
    assert rc == kb_bench.EXIT_CANDIDATE, stderr
    assert result["suspect"] is True and not result["ok"] and not credited(result)
    assert result["reason"].startswith("suspect: solution.py tampered with the process") and words in result["reason"]
    assert not (tmp_path / "m.csv").exists(), "a suspect bench leaves no metrics row to credit"
    if hack == "1_slow_clock.py":  # timed with the real clock: no 50x "speed-up"
        assert result["speedup_vs_eager"] < 5


def test_a_cache_keyed_by_input_content_never_pays(tmp_path: Path) -> None:
    """Every timed trial gets fresh inputs: the fingerprint cache misses each time."""
    problem = tmp_path / "1_Heavy.py"
    problem.write_text(
        "import torch\nimport torch.nn as nn\n\nclass Model(nn.Module):\n    def forward(self, A, B):\n"
        "        return torch.relu(A @ B)\n\ndef get_inputs():\n    return [torch.randn(192, 192), torch.randn(192, 192)]\n\n"
        "def get_init_inputs():\n    return []\n")
    rc, result, stderr = run_bench(problem, HACKS / "1_cache_by_content.py", tmp_path, "--in-process")
    assert rc == 0, stderr
    assert result["correct"] is True
    assert result["speedup_vs_eager"] < 2.0, "a content cache hit during timing would be many times faster"


def test_outputs_produced_while_timed_are_spot_checked(tmp_path: Path) -> None:
    """Correct on the correctness trials, wrong once timing starts: a spot check catches it."""
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(
        "import torch\nimport torch.nn as nn\n\nclass ModelNew(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.calls = 0\n    def forward(self, A, B):\n        self.calls += 1\n"
        "        if self.calls > 4:\n            return torch.relu(A[:, :1] @ B[:1]) + 1\n"
        "        return torch.relu(A @ B)\n")
    rc, result, _ = run_bench(LEVEL1 / "1_Matmul_ReLU.py", sneaky, tmp_path, "--in-process", "--warmup", "0")
    assert rc == kb_bench.EXIT_CANDIDATE
    assert result["correct"] is False
    assert "while being timed" in result["reason"] or "stale result" in result["reason"]


@pytest.mark.parametrize(
    ("problem", "hack", "words"),
    [
        ("1_Matmul_ReLU.py", "1_float64.py", "dtype float64 != expected float32"),
        ("3_LayerNorm.py", "3_layernorm_bf16.py", "beyond atol=0.0001, rtol=0.0001"),
    ],
)
def test_other_precisions_fail_the_fp32_tolerance(tmp_path: Path, problem: str, hack: str, words: str) -> None:
    rc, result, _ = run_bench(LEVEL1 / problem, HACKS / hack, tmp_path, "--in-process")
    assert rc == kb_bench.EXIT_CANDIDATE and result["correct"] is False
    assert words in result["reason"]


def test_bf16_precision_uses_kernelbench_tolerance(tmp_path: Path) -> None:
    """--precision bf16: inputs and weights in bf16, 1e-2 tolerance; a bf16 LayerNorm is then honest."""
    honest = tmp_path / "ln.py"
    honest.write_text("import torch.nn as nn\nimport torch.nn.functional as F\n\nclass ModelNew(nn.Module):\n"
                      "    def __init__(self, shape):\n        super().__init__()\n        self.ln = nn.LayerNorm(shape)\n"
                      "    def forward(self, x):\n        ln = self.ln\n"
                      "        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)\n")
    rc, result, stderr = run_bench(LEVEL1 / "3_LayerNorm.py", honest, tmp_path, "--in-process", "--precision", "bf16")
    assert rc == 0, stderr
    assert result["precision"] == "bf16" and result["atol"] == result["rtol"] == 1e-2


@pytest.mark.slow
def test_the_launchers_clock_catches_a_clock_patched_inside_the_bench(tmp_path: Path) -> None:
    """The hack reaches into looptree's own captured clock: the launcher times every trial on its
    own clock, so the hack gains nothing, and the times it made its process claim contradict it.

    On a problem of a few milliseconds a call: the launcher resolves a claim only above its own
    floor (``OUTSIDE_FLOOR_MS``, a scheduling delay); below it the slowed clock is merely ignored
    (the reported figures are the launcher's either way)."""
    problem = tmp_path / "1_Heavy.py"
    problem.write_text(
        "import torch\nimport torch.nn as nn\n\nclass Model(nn.Module):\n    def forward(self, A, B):\n"
        "        return torch.relu(A @ B)\n\ndef get_inputs():\n    return [torch.randn(768, 768), torch.randn(768, 768)]\n\n"
        "def get_init_inputs():\n    return []\n")
    rc, result, stderr = run_bench(problem, HACKS / "1_slow_clock_inside.py", tmp_path)
    assert rc == kb_bench.EXIT_CANDIDATE, stderr
    assert result["suspect"] is True and not credited(result)
    assert "launcher's clock" in result["reason"]
    # The figures are the launcher's: the slowed clock's 50x is only the candidate's claim.
    assert result["outside"]["runtime_ms"] > 0 and "speedup_vs_eager" in result["outside"]
    assert result["speedup_vs_eager"] < 5 and result["runtime_claimed_ms"] < result["runtime_ms"] / 5


@pytest.mark.slow
def test_an_honest_solution_is_confirmed_by_the_launcher(tmp_path: Path) -> None:
    rc, result, stderr = run_bench(LEVEL1 / "4_Conv1dGELU.py", LEVEL1 / "solutions" / "4_Conv1dGELU.py", tmp_path)
    assert rc == 0, stderr
    assert result["ok"] and not result["suspect"]
    assert result["outside"]["eager_ms"] > 0 and result["outside"]["runtime_ms"] > 0
    # stage lines as it goes, so a timeout says which stage was slow
    assert "] checking correctness" in stderr and "] timing ModelNew" in stderr


@pytest.mark.slow
def test_sigkill_of_the_bench_is_named_by_the_launcher(tmp_path: Path) -> None:
    killer = tmp_path / "killer.py"
    killer.write_text("import os, signal\nimport torch.nn as nn\n\nclass ModelNew(nn.Module):\n"
                      "    def forward(self, A, B):\n        os.kill(os.getpid(), signal.SIGKILL)\n")
    rc, result, _ = run_bench(LEVEL1 / "1_Matmul_ReLU.py", killer, tmp_path)
    assert rc == kb_bench.EXIT_CANDIDATE
    assert result["correct"] is False
    assert "killed by SIGKILL while" in result["reason"] and "correctness" in result["reason"]


def test_cpu_allocator_failure_is_named_out_of_memory(tmp_path: Path) -> None:
    problem = tmp_path / "1_Big.py"
    problem.write_text(
        "import torch\nimport torch.nn as nn\n\nclass Model(nn.Module):\n    def forward(self, x):\n"
        "        raise RuntimeError('[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can\\'t allocate memory: "
        "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)')\n\n"
        "def get_inputs():\n    return [torch.randn(4)]\n\ndef get_init_inputs():\n    return []\n")
    rc, result, _ = run_bench(problem, LEVEL1 / "solutions" / "2_Softmax.py", tmp_path, "--in-process")
    assert rc == kb_bench.EXIT_OOM and result["oom"] is True
    assert result["reason"].startswith("out of memory while running the reference")


CROSS_ENTROPY = """import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, predictions, targets):
        return torch.nn.functional.cross_entropy(predictions, targets)


def get_inputs():
    return [torch.rand(2048, 8192), torch.randint(0, 8192, (2048,))]


def get_init_inputs():
    return []
"""

CROSS_ENTROPY_SOLUTION = """import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def forward(self, predictions, targets):
        return -torch.log_softmax(predictions, dim=1).gather(1, targets.unsqueeze(1)).mean()
"""


def _baseline_vm_mb() -> int:
    """Address space a bench process has before it makes any input (torch loaded)."""
    code = ("import torch, looptree.gpu.kernelbench.runner, numpy; torch.set_num_threads(1); "
            "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])")
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    return int(proc.stdout.strip()) // 1024


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc to size the limit")
def test_a_correct_cross_entropy_passes_under_an_address_space_limit(tmp_path: Path) -> None:
    """64 MiB of logits: the old check kept float64 copies of every input set (~13x) and was killed
    at +1.2 GiB; now inputs are made one set at a time and compared in chunks."""
    (tmp_path / "1_CrossEntropy.py").write_text(CROSS_ENTROPY)
    (tmp_path / "sol.py").write_text(CROSS_ENTROPY_SOLUTION)
    limit = _baseline_vm_mb() + 500
    rc, result, stderr = run_bench(tmp_path / "1_CrossEntropy.py", tmp_path / "sol.py", tmp_path, "--in-process",
                                   "--trials", "2", limit_mb=limit)
    assert rc == 0, stderr[-2000:]
    assert result["correct"] is True and result["oom"] is False
