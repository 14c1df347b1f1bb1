"""Drive an engine without the dashboard: print its events, turn signals into a clean stop.

Why its own module: `looptree run/resume --no-tui` and `looptree kernelbench` (one run per
task) drive engines the same way. The first SIGINT (Ctrl-C) or SIGTERM (a SLURM preemption, a
`kill`, a container stop) asks for a stop: the run ends "stopped by user" for SIGINT and
"stopped by signal SIGTERM" for SIGTERM, and can be resumed either way; a second one exits at
once. The signal is kept (`Driven.signal`) so the command can exit with its own status.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from looptree.engine.run.printer import Printer

if TYPE_CHECKING:
    from looptree.engine.run.engine import Engine

HANDLED = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Driven:
    reason: str
    interrupted: bool
    signal: signal.Signals | None = None  # the first signal that stopped the run, if any


def stop_reason_for(sig: signal.Signals) -> str:
    """Ctrl-C is the user's own stop; any other signal is named, so a preemption is not mistaken for one."""
    return "stopped by user" if sig == signal.SIGINT else f"stopped by signal {sig.name}"


def exit_status_for(sig: signal.Signals | None) -> int | None:
    """The status a command stopped by `sig` exits with: 128 + N for SIGTERM (the shell's convention),
    None for SIGINT (a user's stop is a normal end) and for no signal."""
    if sig is None or sig == signal.SIGINT:
        return None
    return 128 + int(sig)


async def drive(engine: Engine, *, json_mode: bool = False) -> Driven:
    printer = Printer(engine.state, json_mode=json_mode)
    if engine.log.last is not None:  # run_started / engine_attached, written before the printer was attached
        printer(engine.log.last)
    engine.listeners.append(printer)
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if len(received) == 1:
            engine.request_stop(stop_reason_for(sig))
        else:
            os._exit(128 + int(sig))

    for sig in HANDLED:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        reason = await engine.run()
    finally:
        for sig in HANDLED:
            loop.remove_signal_handler(sig)
    return Driven(reason, bool(received), received[0] if received else None)
