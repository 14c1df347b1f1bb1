"""The `looptree kernelbench` flags, apart from the sweep.

Why a module of their own: the `looptree` parser is built on every command (`--help`, `tree`, a
config error), so the flags must not import the sweep, the config models or the bench runner.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `kernelbench` sub-command's flags, each with its help (engine/cli.py calls this when it builds its parser)."""
    p.add_argument("--dataset", required=True, metavar="DIR",
                   help="KernelBench checkout or problem folder holding level{L}/{N}_{Name}.py files")
    p.add_argument("--level", required=True, metavar="L", help="level to run: 1, 2, 3 (or level1, level_1)")
    p.add_argument("--tasks", required=True, metavar="A-B",
                   help="problem numbers: a range 1-10, one number 7, or a list 1-3,7,9-10")
    p.add_argument("--eval-only", action="store_true",
                   help="no agent: run each task's bench once (reference eager and torch.compile, and --solutions)")
    p.add_argument("--solutions", default=None, metavar="DIR",
                   help="with --eval-only: judge and time DIR/{N}_*.py (ModelNew) against each task's baselines")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the per-task projects, summary.json and summary.csv go (default kernelbench_runs/level{L})")
    p.add_argument("--protocol", choices=("looptree", "kernelbench"), default="looptree",
                   help="kernelbench: upstream's timing (100 trials, mean) and fast_p thresholds, for figures "
                        "beside published tables; looptree (default): median of 20 trials on CPU")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of inputs and weights; sets the tolerance (fp32 1e-4, fp16/bf16 1e-2, as KernelBench)")
    p.add_argument("--no-tui", action="store_true", help="agent runs: print event lines instead of the dashboard")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every task, e.g. agent.model=gpt-4.1 bench.timeout=1800")
