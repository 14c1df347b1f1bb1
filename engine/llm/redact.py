"""Scrub API keys from anything we write to disk or show.

Why: a run directory is meant to be shared (it is a cassette, a bug report, a demo), so no key may
reach it — not in a recorded request, not in a server's error message that echoes the key back.
Two layers: the exact key values this process knows (registered by `resolve_endpoint`), and
patterns for key-shaped strings we were never told about.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

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
