"""Process state that candidate code must not change while it is judged or timed.

Why: a KernelBench solution runs in the bench's own process, so it can patch what the bench
relies on: the clocks (``time.perf_counter_ns`` slowed 50x makes anything "fast"), the random
number functions (``torch.randn`` patched so "fresh" inputs repeat and a cache keyed by content
pays), the torch functions the reference calls, or the thread count (``torch.set_num_threads``
raised on a CPU timed with one thread). ``ProcessGuard`` takes a snapshot of all of these
*before* the candidate is imported; ``restore()`` puts every changed entry back and returns what
it found changed, so the bench can both time on a clean process and say the candidate tampered.

A snapshot holds references to the original objects (functions are immutable), so a guard
cannot be fooled by patching the function it compares against; code in the same process can
still reach into this module, which is why the bench also keeps a clock outside the process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

_MISSING = object()


def _namespaces(extra: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """(label, object whose ``__dict__`` is watched): time, random, numpy.random, torch & co."""
    import random
    import time

    found: list[tuple[str, Any]] = [("time", time), ("random", random)]
    np = sys.modules.get("numpy")
    if np is not None:
        found.append(("numpy.random", np.random))
    torch = sys.modules.get("torch")
    if torch is not None:
        found += [("torch", torch), ("torch.Tensor", torch.Tensor), ("torch.nn.Module", torch.nn.Module),
                  ("torch.nn.functional", torch.nn.functional), ("torch.random", torch.random),
                  ("torch.linalg", torch.linalg), ("torch.fft", torch.fft), ("torch.special", torch.special),
                  ("torch.cuda", torch.cuda)]
        events = getattr(torch.cuda, "Event", None)
        if events is not None:
            found.append(("torch.cuda.Event", events))
    found += list(extra)
    return found


def _watched(obj: Any) -> dict[str, Any]:
    ns = vars(obj)
    return {k: v for k, v in ns.items() if not k.startswith("__") and (callable(v) or isinstance(v, ModuleType))}


class ProcessGuard:
    """A snapshot of clocks, RNG and torch functions, and the torch thread count."""

    def __init__(self, extra: Iterable[tuple[str, Any]] = (), *, threads: int | None = None) -> None:
        self._spaces = _namespaces(extra)
        self._snapshot = [(label, obj, _watched(obj)) for label, obj in self._spaces]
        torch = sys.modules.get("torch")
        self._get_threads: Callable[[], int] | None = torch.get_num_threads if torch is not None else None
        self._set_threads: Callable[[int], None] | None = torch.set_num_threads if torch is not None else None
        self.threads = threads  # None: the thread count is not watched (it does not matter on a GPU)

    def add(self, label: str, obj: Any) -> None:
        """Watch one more namespace (the problem module, the reference's nn.Module classes)."""
        self._snapshot.append((label, obj, _watched(obj)))

    def changes(self) -> list[str]:
        """Names of every watched entry that differs from the snapshot (nothing is restored)."""
        return self._compare(put_back=False)

    def restore(self) -> list[str]:
        """Put every changed entry back; returns what was changed (empty when nothing was)."""
        return self._compare(put_back=True)

    def _compare(self, *, put_back: bool) -> list[str]:
        found: list[str] = []
        for label, obj, saved in self._snapshot:
            ns = vars(obj)
            for name, value in saved.items():
                if ns.get(name, _MISSING) is not value:
                    found.append(f"{label}.{name}")
                    if put_back:
                        try:
                            setattr(obj, name, value)
                        except (AttributeError, TypeError):  # an immutable type: it cannot have changed either
                            pass
        if self._get_threads is not None and self.threads is not None:
            now = self._get_threads()
            if now != self.threads:
                found.append(f"torch thread count ({now} instead of {self.threads})")
                if put_back:
                    assert self._set_threads is not None
                    self._set_threads(self.threads)
        return found


def describe(changes: list[str], limit: int = 4) -> str:
    """``"time.perf_counter_ns, torch.randn and 2 more"``."""
    head = ", ".join(changes[:limit])
    return head + (f" and {len(changes) - limit} more" if len(changes) > limit else "")
