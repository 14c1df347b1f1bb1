"""The `looptree` command (see CONTRACT.md "Command line").

Why argparse: no extra dependency, `--help` stays in step with the contract, and every user
error is caught here and printed as one line (`looptree: error: …`, exit 2); only genuine
internal failures show a traceback (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from looptree.engine.core.terminal import SafeStream
from looptree.engine.errors import LooptreeError

EPILOG = """\
KEY=VALUE overrides any config key by its dotted path, e.g. search.num_samples=10
agent.model=gpt-4.1 budget.max_tokens=2e6. Runs live in <project>/.looptree/runs/<N>/;
every evaluated node is a commit on branch looptree/<ID> of the project's repository.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="looptree", description="LLM agents optimize real code against real benchmarks.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="looptree 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init", help="write a commented looptree.toml into DIR (default .)")
    p.add_argument("dir", nargs="?", default=".")

    p = sub.add_parser("run", help="start run N+1 on the project in DIR (default .)")
    p.add_argument("dir", nargs="?", default=".")
    p.add_argument("--config", metavar="F", help="config file (default DIR/looptree.toml)")
    p.add_argument("--no-tui", action="store_true", help="no dashboard: one line per event on stderr")
    p.add_argument("--json", action="store_true", help="one JSON object per event on stdout (implies --no-tui)")
    p.add_argument("--color", default=None, help="dashboard colours: auto, truecolor, 256, 16, none")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--run-dir", help=argparse.SUPPRESS)

    p = sub.add_parser("resume", help="continue a run that stopped or crashed")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--no-tui", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--color", default=None)

    p = sub.add_parser("attach", help="dashboard on a run that another process drives (or on an A/B experiment directory)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--color", default=None)

    p = sub.add_parser("replay", help="play a saved run back from its event log")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--speed", type=float, default=1.0, metavar="X")
    p.add_argument("--no-tui", action="store_true")
    p.add_argument("--color", default=None)

    p = sub.add_parser("ctl", help="pause | resume | stop | prune ID | pin ID | unpin ID | fork ID [--hint TEXT] | budget [+|-]TOKENS | kill ID")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("cmd", metavar="COMMAND")
    p.add_argument("arg", nargs="?", metavar="ID|TOKENS")
    p.add_argument("--hint", default="")

    p = sub.add_parser("tree", help="print the tree with each node's metrics")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("show", help="one node: description, diff, metrics, analysis, logs")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("node_id", metavar="ID")

    p = sub.add_parser("eval", help="eval-only: benchmark git refs or node IDs, no agent")
    p.add_argument("dir", nargs="?", default=".")
    p.add_argument("refs", nargs="*", metavar="REF")
    p.add_argument("--repeats", type=int, default=None, metavar="N")
    p.add_argument("--config", metavar="F")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("kernelbench", help="optimize KernelBench-format problems, one run each")
    from looptree.gpu.kernelbench.arguments import add_arguments  # argparse only: the sweep is imported on use

    add_arguments(p)

    p = sub.add_parser("gpus", help="what NVML sees (prints a clear line when no GPU); with DIR whose config "
                                    "names a Ray cluster, the cluster's GPUs, node by node")
    p.add_argument("dir", nargs="?", default=None, metavar="DIR")
    p.add_argument("--config", metavar="F")

    p = sub.add_parser("doctor", help="what a run would get here: sandbox, memory limit, device locks, GPUs, "
                                      "endpoints reached, cluster")
    p.add_argument("dir", nargs="?", default=".")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    from looptree.engine.experiments.cli import register as register_experiments

    register_experiments(sub)  # config, ab, pareto, runs, export (each parser carries its handler)
    return parser


# The dashboard is plugged in by the console script (`looptree.app.cli:main`): the engine never imports
# the UI, and `python -m looptree.engine.cli` is the headless build of the same command.
Dashboard = Callable[..., int]
_dashboard: Dashboard | None = None


def _run_dashboard(run_dir: Path, **kwargs: object) -> int:
    if _dashboard is None:
        raise LooptreeError("this entry point has no dashboard; use `looptree` or pass --no-tui")
    return _dashboard(run_dir, **kwargs)


def main(argv: list[str] | None = None, *, dashboard: Dashboard | None = None) -> int:
    global _dashboard
    if dashboard is not None:
        _dashboard = dashboard
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "ctl" and args.arg is None and len(extra) == 1 \
            and extra[0].startswith("-") and extra[0][1:2].isdigit():
        args.arg, extra = extra[0], []  # `ctl RUN budget -1e5`: argparse takes it for an option
    if extra:
        # KEY=VALUE may follow options (`run DIR --no-tui a.b=1`), which argparse alone refuses.
        if getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "dir", None) and "=" in args.dir and getattr(args, "overrides", None) is not None \
            and not Path(args.dir).is_dir():
        args.overrides = [args.dir, *args.overrides]  # `looptree run a.b=1`: DIR left out
        args.dir = "."
    if args.command is None:
        parser.print_help()
        return 2
    handler = getattr(args, "handler", None) or globals()[f"cmd_{args.command}"]
    # Everything a command prints may quote the run (logs, reasons, replies): escape sequences in
    # it are shown, never obeyed (engine/core/terminal.py). The dashboard draws on sys.__stderr__.
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeStream(sys.stdout), SafeStream(sys.stderr)  # type: ignore[assignment]
    try:
        return int(handler(args) or 0)
    except LooptreeError as exc:
        print(f"looptree: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("looptree: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception:  # internal: exit 1 with the traceback, which may quote the run, so escaped as well
        traceback.print_exc()
        return 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        sys.stdout, sys.stderr = streams


# -- init ------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from looptree.engine.core.init import write_config
    from looptree.engine.vcs import gitops

    path = write_config(Path(args.dir))
    asyncio.run(gitops.open_repo(path.parent))  # the tree's commits need a repository (contract)
    print(f"wrote {path}; edit goal, writable and bench.command, then `looptree run {args.dir}`")
    return 0


# -- run / resume ------------------------------------------------------------------------------
def _wants_tui(args: argparse.Namespace) -> bool:
    return not (getattr(args, "no_tui", False) or getattr(args, "json", False)) and sys.stdin.isatty() and sys.stdout.isatty()


def cmd_run(args: argparse.Namespace) -> int:
    from looptree.engine.core.config import load_config

    project = Path(args.dir).resolve()
    if not project.is_dir():
        raise LooptreeError(f"{args.dir} is not a directory")
    config = load_config(project, Path(args.config).resolve() if args.config else None, args.overrides, deep=False)
    _check_cheap_first(project, config, Path(args.config).name if args.config else None)
    if _wants_tui(args):
        return _run_with_dashboard(args, project, config)
    run_dir = Path(args.run_dir) if args.run_dir else None
    return asyncio.run(_drive(lambda: _create(project, config, run_dir), json_mode=args.json))


def _check_cheap_first(project: Path, config, source: str | None) -> None:
    """The config mistakes that cost nothing to find, before anything heavy is imported.

    Why: a missing API key or a writable pattern that matches nothing must be reported in well
    under a second; the significance check imports scipy and the engine imports numpy, git and
    the LLM client, which takes seconds on a busy machine (tests/test_cli.py checks the modules).
    """
    from looptree.engine.core.config import CONFIG_NAME, check_deep
    from looptree.engine.edits.access import check_patterns

    check_patterns(config, project)
    if config.agent.provider != "replay":
        from looptree.engine.agents.llm.providers import resolve_endpoint

        resolve_endpoint(config.agent.provider, config.agent.base_url, config.agent.api_key_env)
    check_deep(config, source or CONFIG_NAME)


async def _create(project: Path, config, run_dir: Path | None):
    from looptree.engine.run.engine import Engine

    return await Engine.create(project, config, run_dir=run_dir)


def cmd_resume(args: argparse.Namespace) -> int:
    from looptree.engine.core.runs import resolve_run_dir

    run_dir = resolve_run_dir(args.run_dir)
    if _wants_tui(args):
        from looptree.engine.core.runs import check_resumable
        from looptree.engine.core.state import RunState

        check_resumable(RunState.load(run_dir), run_dir, "resume")  # before a process is spawned
        return _spawn_and_attach(["resume", str(run_dir), "--no-tui"], run_dir, args.color)
    from looptree.engine.run.engine import Engine

    return asyncio.run(_drive(lambda: Engine.reopen(run_dir), json_mode=args.json))


async def _drive(make_engine, *, json_mode: bool) -> int:
    """Run an engine headless; SIGINT/SIGTERM ask for a clean stop, a second one forces it."""
    from looptree.engine.run.headless import drive, exit_status_for

    engine = await make_engine()
    driven = await drive(engine, json_mode=json_mode)
    reason = driven.reason
    print(f"looptree: run {engine.state.run} finished: {reason}; see `looptree tree {engine.run_dir}`", file=sys.stderr)
    if reason.startswith("error:"):
        return 1
    return exit_status_for(driven.signal) or 0  # SIGTERM: 143, so a scheduler sees the preemption


def _run_with_dashboard(args: argparse.Namespace, project: Path, config) -> int:
    """Start the engine as its own process (it outlives the dashboard and the SSH session), then attach."""
    from looptree.engine.run.engine import allocate_run_dir

    run_dir = allocate_run_dir(project)
    argv = ["run", str(project), "--no-tui", "--run-dir", str(run_dir), *args.overrides]
    if args.config:
        argv += ["--config", str(Path(args.config).resolve())]
    return _spawn_and_attach(argv, run_dir, args.color)


def engine_command(argv: list[str]) -> list[str]:
    """The command line of an engine process started behind the dashboard.

    `-P`: the current directory (often the user's project) is not put on sys.path, so a project
    with a `looptree/` folder of its own cannot stand in for the engine.
    """
    return [sys.executable, "-P", "-m", "looptree.engine.cli", *argv]


def _spawn_and_attach(argv: list[str], run_dir: Path, color: str | None) -> int:
    log_path = run_dir / "engine.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(engine_command(argv), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, cwd=os.getcwd())
    deadline = time.monotonic() + 60
    events = run_dir / "events.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None and proc.returncode != 0:
            try:
                tail = log_path.read_text(errors="replace").strip().splitlines()
            except OSError:
                tail = []
            if not (events.exists() and events.stat().st_size > 0) and argv[0] == "run":
                shutil.rmtree(run_dir, ignore_errors=True)  # a start refused before its first event
            raise LooptreeError(tail[-1].removeprefix("looptree: error: ") if tail else f"engine exited with {proc.returncode}")
        if events.exists() and events.stat().st_size > 0:
            break
        time.sleep(0.05)
    return _run_dashboard(run_dir, mode="live", color=color)


# -- viewers -----------------------------------------------------------------------------------
def cmd_attach(args: argparse.Namespace) -> int:
    from looptree.engine.core.runs import resolve_run_dir

    run_dir = resolve_run_dir(args.run_dir)
    return _run_dashboard(run_dir, mode="live", color=args.color)


def cmd_replay(args: argparse.Namespace) -> int:
    from looptree.engine.core.runs import resolve_run_dir

    run_dir = resolve_run_dir(args.run_dir)
    if args.speed <= 0:
        raise LooptreeError("--speed must be greater than 0")
    if args.no_tui or not sys.stdout.isatty():
        return _replay_headless(run_dir, args.speed)
    return _run_dashboard(run_dir, mode="replay", speed=args.speed, color=args.color)


def _replay_headless(run_dir: Path, speed: float) -> int:
    from looptree.engine.core.events import EVENTS_NAME, iter_events
    from looptree.engine.core.state import RunState
    from looptree.engine.run.printer import Printer

    state = RunState()
    printer = Printer(state)
    previous = None
    for event in iter_events(run_dir / EVENTS_NAME):
        if previous is not None:
            time.sleep(min(2.0, max(0.0, event.get("ts", 0) - previous)) / speed)
        previous = event.get("ts", previous)
        state.apply(event)
        printer(event)
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    from looptree.engine.core.events import RunLock
    from looptree.engine.core.runs import check_resumable, resolve_run_dir
    from looptree.engine.core.state import RunState
    from looptree.engine.run.control import NEEDS_ID, append_control, make_command, new_budget

    run_dir = resolve_run_dir(args.run_dir)
    record = make_command(args.cmd, args.arg if args.cmd in NEEDS_ID else None, hint=args.hint,
                          tokens=args.arg if args.cmd == "budget" else None)
    state = RunState.load(run_dir)
    check_resumable(state, run_dir, "control")
    if args.cmd == "budget" and state.max_tokens is not None:
        new_budget(int(state.max_tokens), args.arg)  # refuses a cap below 1 token
    if args.cmd in NEEDS_ID:
        if args.arg not in state.nodes:
            raise LooptreeError(f"no node {args.arg} in run {state.run} (see `looptree tree {run_dir}`)")
    append_control(run_dir, record)
    live = RunLock.is_held(run_dir)
    print(f"sent {args.cmd}{' ' + args.arg if args.arg else ''} to run {run_dir.name}"
          + ("" if live else " (no engine is running it now; it takes effect on `looptree resume`)"))
    return 0


def cmd_tree(args: argparse.Namespace) -> int:
    from looptree.engine.core.runs import resolve_run_dir
    from looptree.engine.core.state import RunState
    from looptree.engine.run.report import render_tree, tree_json

    run_dir = resolve_run_dir(args.run_dir)
    state = RunState.load(run_dir)
    if args.json:
        print(json.dumps(tree_json(state), indent=2))
    else:
        print(render_tree(state))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from looptree.engine.core.runs import resolve_run_dir
    from looptree.engine.core.state import RunState
    from looptree.engine.run.report import render_show
    from looptree.engine.vcs import gitops

    run_dir = resolve_run_dir(args.run_dir)
    state = RunState.load(run_dir)
    node = state.nodes.get(args.node_id)
    diff_text = ""
    if node is not None and node.commit:
        parent = state.nodes.get(node.parent or "")
        old = parent.commit if parent and parent.commit else None
        if old is None and node.kind == "fix" and parent is not None:
            grand = state.nodes.get(parent.parent or "")
            old = grand.commit if grand else None
        if old:
            async def get_diff() -> str:
                repo = await gitops.open_repo(Path(state.project or "."), create=False)
                return await gitops.diff(repo, old, node.commit or "")
            try:
                diff_text = asyncio.run(get_diff())
            except LooptreeError as exc:
                diff_text = f"(diff unavailable: {exc})"
    sys.stdout.write(render_show(state, run_dir, args.node_id, diff_text))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from looptree.engine.run.evalonly import eval_refs

    return asyncio.run(eval_refs(Path(args.dir).resolve(), args.refs, repeats=args.repeats,
                                 config_file=Path(args.config).resolve() if args.config else None, json_mode=args.json))


def cmd_kernelbench(args: argparse.Namespace) -> int:
    try:
        from looptree.gpu.kernelbench.cli import run_kernelbench
    except ImportError:
        raise LooptreeError("kernelbench support is not installed in this build") from None
    return run_kernelbench(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from looptree.engine.run.doctor import run_doctor

    return run_doctor(Path(args.dir).resolve(), args.overrides)


def cmd_gpus(args: argparse.Namespace) -> int:
    from looptree.gpu.devices.telemetry import choose_backend, format_gpus

    if args.dir is not None:
        from looptree.engine.core.config import load_config

        config = load_config(Path(args.dir), Path(args.config) if args.config else None)
        if config.cluster.backend == "ray":  # sampled on every worker node, with their host names
            from looptree.engine.cluster.telemetry import cluster_gpus, format_cluster_gpus

            print(format_cluster_gpus(cluster_gpus(config.cluster.address)))
            return 0
    backend = choose_backend("auto")
    try:
        print(format_gpus(backend))
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
