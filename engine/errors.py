"""Errors that reach the user as one line.

Why a hierarchy: the CLI prints a `LooptreeError` as `looptree: error: <message>` with exit
status 2 and no traceback; anything else is an internal failure (exit 1). Modules raise the
most specific subclass so callers (the fix step, the dashboard) can react by kind.
"""

from __future__ import annotations


class LooptreeError(Exception):
    """A user-facing failure: bad config, bad input, refused operation."""

    exit_code = 2


class ConfigError(LooptreeError):
    """looptree.toml or a KEY=VALUE override is invalid."""


class RunLockedError(LooptreeError):
    """Another engine already drives this run directory."""


class GitError(LooptreeError):
    """A git command failed; the message carries git's own first error line."""


class EditError(LooptreeError):
    """An agent's edit could not be parsed, was refused, or did not apply."""


class EditParseError(EditError):
    """The reply held no usable edit, or a malformed one."""


class EditRejected(EditError):
    """An edit named a path the access rules forbid (readonly, hidden, outside, escaping)."""


class SearchNotFound(EditError):
    """A SEARCH section did not match the file; the message names the closest match."""


class MetricsError(LooptreeError):
    """The bench command's metrics CSV is missing, malformed, or holds NaN/inf."""


class BudgetExhausted(LooptreeError):
    """The next LLM call cannot fit in what is left of the token or cost budget."""


class NoGpu(LooptreeError):
    """No usable GPU: the NVML library is missing, the driver is not loaded, or CUDA is absent.

    Here, at the bottom, so the bench-side timing helpers can raise it without importing the
    engine's device management.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"no GPU: {reason}")
        self.reason = reason
