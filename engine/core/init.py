"""`looptree init`: a commented looptree.toml that guesses what it can from the project."""

from __future__ import annotations

from pathlib import Path

from looptree.engine.core.config import CONFIG_NAME
from looptree.engine.errors import LooptreeError

TEMPLATE = '''\
# looptree.toml: what to improve, what the agents may touch, how to measure.
# Every key can be overridden on the command line: looptree run . search.num_samples=8

[project]
# The goal, in your words: the agents read it in every prompt.
goal = "{goal}"
# The agents may change only these files (globs relative to this directory; ** spans folders).
writable = {writable}
# Shown to the agents for context, never changed.
readonly = {readonly}
# Never shown, never changed (held-out tests, secrets).
hidden = []

[build]                     # optional: runs first in each candidate's worktree
command = "{build}"
timeout = 120               # seconds

[check]                     # optional correctness gate, runs before the benchmark
command = "{check}"
timeout = 600

[bench]
command = "{bench}"         # writes the metrics CSV (see README: metrics protocol)
metrics = "metrics.csv"     # relative to the candidate's worktree
timeout = 600
repeats = 5                 # whole bench runs per node
max_repeats = 10            # parent and candidate run in interleaved pairs; close calls get more, up to this
test = "paired"             # paired (Wilcoxon signed-rank on the pairs) | mann-whitney

[agent]
provider = "replay"         # replay | openai | google | openrouter | cborg | deepseek | local
model = "gpt-4.1-mini"
base_url = ""               # any OpenAI-compatible endpoint overrides the provider default
api_key_env = ""            # default: the provider's usual variable (OPENAI_API_KEY, ...)
cassette = ".looptree/cassette.jsonl"   # provider = "replay": recorded responses to play back

[search]
strategy = "tree"
num_samples = 4             # agents per phase
num_phases = 3
max_fix_attempts = 2
num_workers = 8             # concurrent LLM requests
early_stop_patience = 2     # phases without improvement before stopping (0: never)

[budget]
max_tokens = 2000000        # hard cap across every agent call of the run
max_cost_usd = 0            # 0 = no cost cap
requests_per_minute = 60

[gpu]
devices = "auto"            # "auto", "none", or a list of indices; one benchmark per device at a time
'''


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def write_config(project: Path) -> Path:
    project = project.resolve()
    if not project.is_dir():
        raise LooptreeError(f"{project} is not a directory")
    path = project / CONFIG_NAME
    if path.exists():
        raise LooptreeError(f"{path} already exists; edit it, or remove it to start over")
    py = sorted(p.name for p in project.glob("*.py"))
    bench = next((p for p in py if p.startswith("bench")), None)
    tests = [p for p in py if p.startswith(("test", "check"))]
    writable = [p for p in py if p != bench and p not in tests and p not in ("setup.py", "conftest.py")]
    readonly = ([bench] if bench else []) + tests
    text = TEMPLATE.format(
        goal="Make the code faster without changing its results.",
        writable=_toml_list(writable or ["CHANGE_ME.py"]),
        readonly=_toml_list(readonly),
        build=f"python -m py_compile {' '.join(writable)}" if writable else "",
        check=f"python {tests[0]}" if tests else "",
        bench=f"python {bench}" if bench else "python bench.py",
    )
    path.write_text(text)
    return path
