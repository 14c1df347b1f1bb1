"""Scrub secrets from anything we write to disk, show, or put into a prompt.

Why one module: "what must never leave this process" is one policy. A run directory is meant to
be shared (it is a cassette, a bug report, a demo), so no key may reach it — not in a recorded
request, not in a server's error message that echoes the key back. And the text the candidate's
code prints (log tails, failure reasons) goes back to the LLM in fix prompts, so that text must
carry neither a hidden file's contents nor the value of a secret-looking environment variable,
whatever the code does to print them.

Layers: the exact key values this process knows (registered by `resolve_endpoint`), patterns
for key-shaped strings we were never told about (`Redactor`), and for prompts `PromptScrubber`:
the values of secret-looking environment variables plus every run of `HIDDEN_RUN` or more
characters of a hidden file, whitespace-normalised (`HiddenIndex`).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

REDACTED = "[REDACTED]"

# Values shorter than this are not treated as secrets: redacting "abc" everywhere would mangle
# prompts, and a key that short is a placeholder (local servers accept anything).
MIN_SECRET_LEN = 8

# Mapping keys whose values are credentials whatever they look like.
_SECRET_FIELD = re.compile(
    r"^(authorization|proxy-authorization|api[-_]?key|x-api-key|x-goog-api-key|access[-_]?token|"
    r"secret|client[-_]?secret|password|token)$",
    re.IGNORECASE,
)

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # "Authorization: Bearer abc..." and bare "Bearer abc..." (real tokens are long)
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{16,}"), r"\1 " + REDACTED),
    # OpenAI / OpenRouter / Anthropic / DeepSeek style: sk-..., sk-proj-..., sk-or-v1-...
    # (must hold a digit, so prose like "sk-learn-compatible" survives)
    (re.compile(r"\bsk-(?=[A-Za-z0-9_\-]*\d)[A-Za-z0-9_\-]{16,}"), "sk-" + REDACTED),
    # Google API keys
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"), REDACTED),
    # ?key=... / &api_key=... in URLs (not `key=` in code: sorted(xs, key=len) must survive)
    (
        re.compile(r"(?i)([?&](?:api[-_]?key|access[-_]?token|key|token)=)[^&\s\"']+"),
        r"\1" + REDACTED,
    ),
    # "api_key": "<long value with a digit>" inside text (e.g. an echoed config or header dump)
    (
        re.compile(
            r"(?i)(\b(?:api[-_]?key|x-api-key|x-goog-api-key)\b[\"']?\s*[:=]\s*[\"']?)"
            r"(?=[A-Za-z0-9_\-]*\d)[A-Za-z0-9_\-]{16,}"
        ),
        r"\1" + REDACTED,
    ),
]


class Redactor:
    """Replaces known secret values and key-shaped strings in text and JSON-like objects."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add_secret(secret)

    def add_secret(self, value: str | None) -> None:
        """Remember an exact secret value (e.g. the API key read from the environment)."""
        if value and len(value.strip()) >= MIN_SECRET_LEN:
            with self._lock:
                self._secrets.add(value.strip())

    def text(self, text: str) -> str:
        """`text` with every known secret and key-shaped string replaced."""
        if not text:
            return text
        with self._lock:
            # Longest first, so a key that contains another key is replaced whole.
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def obj(self, value: Any) -> Any:
        """A redacted deep copy of a JSON-like value (dicts, lists, strings, scalars)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                if isinstance(key, str) and _SECRET_FIELD.match(key) and item:
                    out[key] = REDACTED
                else:
                    out[key] = self.obj(item)
            return out
        if isinstance(value, (list, tuple)):
            return [self.obj(item) for item in value]
        return value


# The process-wide redactor: `resolve_endpoint` registers every key it reads, so any module
# that writes user-visible files can call `redact_text`/`redact_obj` without plumbing keys around.
DEFAULT = Redactor()


def register_secret(value: str | None) -> None:
    """Add an exact secret value to the process-wide redactor."""
    DEFAULT.add_secret(value)


def redact_text(text: str) -> str:
    """`text` scrubbed by the process-wide redactor."""
    return DEFAULT.text(text)


def redact_obj(value: Any) -> Any:
    """A JSON-like value scrubbed by the process-wide redactor."""
    return DEFAULT.obj(value)


# ----------------------------------------------------------------------------- prompt scrubbing

HIDDEN_MARK = "[REDACTED: hidden]"
SECRET_MARK = "[REDACTED: secret]"
# Pinned (issue 8): variables whose name holds one of these words (any case) are secrets, and so
# is every configured `agent.api_key_env`; values shorter than MIN_ENV_SECRET_LEN are not
# ("1", "true" and "yes" would blank out half a log).
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
MIN_ENV_SECRET_LEN = 6
# A hidden file leaks when any run of this many of its characters (whitespace removed) shows up.
HIDDEN_RUN = 16
# Hidden text indexed at most (characters, whitespace removed): 8 bytes of index per character.
MAX_HIDDEN_CHARS = 16 * 1024 * 1024
_WS = re.compile(r"\s+")
_BASE = np.uint64(1_000_003)


def env_secrets(environ: Mapping[str, str] | None = None, extra_names: Iterable[str] = ()) -> list[str]:
    """Values of the secret-looking variables of `environ` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    names = {n for n in extra_names if n}
    values = {v.strip() for k, v in environ.items()
              if (SECRET_NAME.search(k) or k in names) and v and len(v.strip()) >= MIN_ENV_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def _normalise(text: str) -> tuple[str, list[int]]:
    """`text` without whitespace, and for each kept character its index in `text`."""
    kept: list[str] = []
    where: list[int] = []
    start = 0
    for match in _WS.finditer(text):
        kept.append(text[start:match.start()])
        where.extend(range(start, match.start()))
        start = match.end()
    kept.append(text[start:])
    where.extend(range(start, len(text)))
    return "".join(kept), where


def _window_hashes(norm: str, width: int = HIDDEN_RUN) -> np.ndarray:
    """A 64-bit polynomial hash of every `width`-character window of `norm` (wrapping arithmetic)."""
    if len(norm) < width:
        return np.empty(0, dtype=np.uint64)
    codes = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    count = len(codes) - width + 1
    out = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(width):
            out *= _BASE
            out += codes[offset:offset + count]
    return out


class HiddenIndex:
    """Every `HIDDEN_RUN`-character window of the hidden files' text, whitespace removed.

    Why windows of normalised text: printed hidden content is often re-wrapped, re-indented or
    cut, so an exact-substring test would miss it; every run of 16 non-space characters it keeps
    is still found. The index is a sorted array of 64-bit window hashes (8 bytes per hidden
    character, a binary search per window of the text scrubbed). Windows that also occur in the
    files the agent may see are dropped: they tell the agent nothing it has not been shown.
    """

    def __init__(self, hidden_texts: Iterable[str], visible_texts: Iterable[str] = ()) -> None:
        parts: list[np.ndarray] = []
        total = 0
        self.truncated = False
        for text in hidden_texts:
            norm = _WS.sub("", text)
            if total + len(norm) > MAX_HIDDEN_CHARS:
                norm = norm[: max(0, MAX_HIDDEN_CHARS - total)]
                self.truncated = True
            total += len(norm)
            parts.append(_window_hashes(norm))
        hashes = _sorted_unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
        visible = [_window_hashes(_WS.sub("", t)) for t in visible_texts]
        if visible and len(hashes):
            hashes = hashes[~_member(hashes, _sorted_unique(np.concatenate(visible)))]
        self._hashes = hashes
        self.chars = total

    def __len__(self) -> int:
        return len(self._hashes)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """[start, end) spans of `text` that hold hidden content, merged, in order."""
        if not len(self._hashes) or len(text) < HIDDEN_RUN:
            return []
        norm, where = _normalise(text)
        windows = _window_hashes(norm)
        if not len(windows):
            return []
        hits = np.flatnonzero(_member(windows, self._hashes))
        spans: list[tuple[int, int]] = []
        for k in hits.tolist():
            start, end = where[k], where[k + HIDDEN_RUN - 1] + 1
            if spans and start <= spans[-1][1] + _gap(text, spans[-1][1], start):
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((start, end))
        return spans

    def scrub(self, text: str) -> str:
        spans = self.spans(text)
        if not spans:
            return text
        out, last = [], 0
        for start, end in spans:
            out.append(text[last:start])
            out.append(HIDDEN_MARK)
            last = end
        out.append(text[last:])
        return "".join(out)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique is an order of magnitude slower on large arrays)."""
    if not len(values):
        return values
    ordered = np.sort(values)
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def _member(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """For each value, whether it is in the sorted array `table` (a binary search each)."""
    if not len(table) or not len(values):
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(table, values)
    pos[pos >= len(table)] = 0
    return table[pos] == values


def _gap(text: str, end: int, start: int) -> int:
    """Only whitespace between two spans: merge them (so one leak shows one mark)."""
    return start - end if start > end and not text[end:start].strip() else 0


def read_hidden_texts(paths: Iterable[Path]) -> list[str]:
    """The text of each hidden file that is UTF-8 text (binary files are not characters)."""
    texts = []
    for path in paths:
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return texts


class PromptScrubber:
    """The one redaction step every untrusted text passes before it is put into a prompt.

    Untrusted text is whatever the candidate's code could have influenced: log tails, failure
    reasons, analyses, the agent's own earlier replies. Order matters: secret values first (a
    secret inside a hidden file is then replaced by the secret mark), then hidden runs, then
    the key-shaped patterns of `Redactor`.
    """

    def __init__(self, hidden: HiddenIndex | None = None, secrets: Iterable[str] = ()) -> None:
        self.hidden = hidden
        self._secrets = sorted({s for s in secrets if s and len(s) >= MIN_ENV_SECRET_LEN}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, SECRET_MARK)
        if self.hidden is not None:
            text = self.hidden.scrub(text)
        return DEFAULT.text(text)
