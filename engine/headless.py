"""Drive an engine without the dashboard: print its events, turn Ctrl-C into a clean stop.

Why its own module: `looptree run/resume --no-tui` and `looptree kernelbench` (one run per
task) drive engines the same way; the first SIGINT/SIGTERM asks for a stop (the run ends
"stopped by user" and can be resumed), a second one exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass

from looptree.engine.events import read_events
from looptree.engine.printer import Printer


@dataclass
class Driven:
    reason: str
    interrupted: bool


async def drive(engine, *, json_mode: bool = False) -> Driven:  # engine: engine.engine.Engine
    printer = Printer(engine.state, json_mode=json_mode)
    for event in read_events(engine.run_dir / "events.jsonl")[-1:]:
        printer(event)  # run_started / engine_attached, written before the printer was attached
    engine.listeners.append(printer)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            engine.handle_command({"cmd": "stop"})
        else:
            os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        reason = await engine.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return Driven(reason, signals > 0)
