"""The `config`, `ab`, `pareto`, `runs` and `export` subcommands of `looptree`.

Why a hook instead of editing engine/cli.py's parser: the experiment commands are one feature,
so they live together; `register(sub)` adds them to the engine's argparse subparsers and each
parser carries its handler (`args.handler`), which engine/cli.py's dispatch prefers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from looptree.engine.errors import LooptreeError, RunLockedError


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="print the resolved config and where each value came from")
    p.add_argument("dir", nargs="?", default=".")
    p.add_argument("--config", metavar="F", help="config file (default DIR/looptree.toml)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(handler=cmd_config)

    p = sub.add_parser("ab", help="compare a control and a test config over a suite with sequential tests")
    p.add_argument("--control", metavar="A.toml", help="overlay of the control arm")
    p.add_argument("--test", metavar="B.toml", help="overlay of the test arm")
    p.add_argument("--suite", metavar="SUITE", help="folder of task projects, or kernelbench:DATASET:LEVEL:TASKS")
    p.add_argument("--out", metavar="DIR", help="the experiment's directory (default ./ab_experiment)")
    p.add_argument("--resume", action="store_true", help="continue the experiment in --out DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per pair, then the verdict, on stdout")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(handler=cmd_ab)

    p = sub.add_parser("pareto", help="cost against quality over runs, arms or experiments")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--quality", default="speedup", choices=["speedup", "success"])
    p.add_argument("--cost", default="tokens", choices=["tokens", "dollars", "gpu_hours"])
    p.add_argument("--group", default="auto", choices=["auto", "run", "config"],
                   help="auto: experiment arms, other runs one by one")
    p.add_argument("--plot", metavar="FILE", help="also draw the plot into FILE (.png or .svg)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_pareto)

    p = sub.add_parser("runs", help="one row per run: project, config hash, model, prompt hashes, status, cost, best ratio")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="keep rows whose column matches")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("export", help="one row per node (metrics, verdict, cost) as csv, jsonl or parquet")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--format", default="csv", choices=["csv", "jsonl", "parquet"])
    p.add_argument("--out", metavar="FILE")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(handler=cmd_export)


# --------------------------------------------------------------------------- config


def cmd_config(args: argparse.Namespace) -> int:
    from looptree.engine.core.config import resolve_config

    project = Path(args.dir).resolve()
    resolved = resolve_config(project, Path(args.config).resolve() if args.config else None, args.overrides)
    data = resolved.config.to_dict()
    experiment = resolved.experiment.model_dump()
    if any(k.startswith("experiment.") for k in resolved.sources):
        data["experiment"] = experiment
    if args.json:
        flat = _flatten(data)
        print(json.dumps({"config": data, "sources": {k: resolved.sources.get(k, "default") for k in flat}}, indent=2))
        return 0
    sys.stdout.write(render_config(data, resolved.sources))
    return 0


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def render_config(data: dict[str, Any], sources: dict[str, str]) -> str:
    """TOML with each value's source as a trailing comment (`# default` for built-in defaults)."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if scalars:
            lines.append(f"[{name}]")
            rendered = [(k, f"{k} = {_toml_value(v)}") for k, v in scalars.items()]
            width = min(60, max(len(text) for _, text in rendered))
            for key, text in rendered:
                lines.append(f"{text.ljust(width)}  # {sources.get(f'{name}.{key}', 'default')}")
            lines.append("")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{name}.{key}", value)

    for name, values in data.items():
        table(name, values)
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    """One value as inline TOML (arrays on one line, so each key keeps its source comment)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '""'
    return json.dumps(str(value), ensure_ascii=False)


# --------------------------------------------------------------------------- ab


def cmd_ab(args: argparse.Namespace) -> int:
    from looptree.engine.experiments.ab import run_ab

    if not args.resume and not (args.control and args.test):
        raise LooptreeError("ab needs --control A.toml and --test B.toml (or --resume --out DIR)")
    try:
        return run_ab(args.control, args.test, args.suite, args.out, list(args.overrides or []),
                      resume=args.resume, json_mode=args.json)
    except RunLockedError:
        raise LooptreeError(f"experiment {args.out or 'ab_experiment'} is already being run by another process") from None


# --------------------------------------------------------------------------- pareto / runs / export


def cmd_pareto(args: argparse.Namespace) -> int:
    from looptree.engine.experiments.pareto import (
        points,
        render_plot,
        render_table,
        save_plot,
    )

    pts = points(args.paths, group=args.group, quality=args.quality, cost=args.cost)
    if args.plot:
        save_plot(pts, Path(args.plot), args.quality, args.cost)
    if args.json:
        print(json.dumps({"quality": args.quality, "cost": args.cost, "points": pts}, indent=2))
        return 0
    sys.stdout.write(render_table(pts, args.quality, args.cost))
    sys.stdout.write(render_plot(pts, args.quality, args.cost))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from looptree.engine.experiments.catalog import filter_rows, render_runs, runs_table

    rows = filter_rows(runs_table(args.paths), args.where)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        sys.stdout.write(render_runs(rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from looptree.engine.experiments.catalog import (
        export_rows,
        filter_rows,
        write_export,
    )

    rows = filter_rows(export_rows(args.paths), args.where)
    text = write_export(rows, args.format, Path(args.out) if args.out else None)
    if text is not None:
        sys.stdout.write(text)
    return 0
