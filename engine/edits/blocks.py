"""Parse an agent's change reply into edits, and apply them to a worktree all-or-nothing.

Why so tolerant on input and so strict on output: models drift (marker lengths, fences, path
decorations, indentation, wrong diff line numbers), and a reply refused for cosmetics wastes a
whole agent call; but a half-applied reply yields a node nobody asked for, so every path is
checked and every new file content computed in memory before the first byte is written. When
an edit does not apply, the error says exactly where and why, because a fix agent reads it.

Reply format: a short description (the first paragraph of prose), then edits:
- SEARCH/REPLACE blocks, the file's path on the line before (or the fence's first line/info);
  several blocks may follow one path line; an empty SEARCH creates a new file;
- unified diffs (```diff fences, or `--- a/x` / `+++ b/x` headers);
- whole-file replacements: a fenced block right after a path line, with no SEARCH markers.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from looptree.engine.edits.access import AccessPolicy
from looptree.engine.errors import EditError, EditParseError, SearchNotFound

MAX_WHOLE_FILE_LINES = 400
MAX_DESCRIPTION_CHARS = 300


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditBlock:
    """Replace `search` with `replace` in `path`; both are newline-terminated lines.

    `search == ""` creates a new file holding `replace`.
    """

    path: str
    search: str
    replace: str


@dataclass(frozen=True)
class WholeFile:
    """Replace (or create) `path` with `content`."""

    path: str
    content: str


@dataclass(frozen=True)
class UnifiedDiff:
    """Hunks (`@@ ... @@` headers and their lines) to apply to `path` by context."""

    path: str
    hunks_text: str


Edit = EditBlock | WholeFile | UnifiedDiff


@dataclass
class ParsedReply:
    description: str
    edits: list[Edit] = field(default_factory=list)


@dataclass
class ApplyResult:
    """Files whose content changed on disk (created ones included), and those newly created."""

    changed_files: list[str]
    created_files: list[str]


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------
_SEARCH_RE = re.compile(r"^\s*<{5,9}\s*SEARCH\s*$", re.IGNORECASE)
_DIVIDER_RE = re.compile(r"^\s*={5,9}\s*$")
_REPLACE_RE = re.compile(r"^\s*>{5,9}\s*REPLACE\s*$", re.IGNORECASE)
_FENCE_OPEN_RE = re.compile(r"^\s*(`{3,}|~{3,})\s*(.*)$")
_HUNK_RE = re.compile(r"^@@+\s*(?:-(\d+)(?:,(\d+))?\s+\+(\d+)(?:,(\d+))?)?\s*@@+")
_PATH_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.\-/+@~]+$")
_BARE_NAMES = {"Makefile", "makefile", "GNUmakefile", "Dockerfile", "Justfile", "Rakefile", "Gemfile"}
_LABEL_RE = re.compile(r"^(?:file(?:name)?|path|in|edit|update|modify|create)\s*:\s*", re.IGNORECASE)
_SUFFIX_RE = re.compile(r"\s*\((?:new(?: file)?|created?|updated?|modified|changed)\)\s*$", re.IGNORECASE)
_ELIDED_RE = re.compile(
    r"^\s*(?:#|//|/\*|--|;|<!--)?\s*(?:\.\.\.|…)\s*"
    r"(?:\(?\s*)?(?:rest|existing|remaining|unchanged|same|other|previous|original)\b",
    re.IGNORECASE,
)
_GENERIC_HEADINGS = {
    "description", "summary", "change", "changes", "plan", "explanation", "approach",
    "the change", "proposed change", "solution", "edit", "edits", "idea",
}


def _path_from_line(line: str) -> str | None:
    """The file path a line names, if the line is nothing but a (decorated) path.

    Accepted decorations: backticks, bold/italic, `#` headings, `File:`/`Path:` labels, a
    trailing colon, a comment leader (`# x`, `// x`) when it is a fence's first line, and a
    trailing `(new file)`. A bare word with neither `.` nor `/` is only a path for well-known
    names (Makefile), so prose like `Also:` is never taken for a file.
    """
    s = line.strip()
    if not s or len(s) > 300 or s.startswith(("--- ", "+++ ", "@@")):
        return None
    s = re.sub(r"^#{1,6}\s+", "", s)             # markdown heading, or a '# path' comment
    s = re.sub(r"^(?://|--(?!-)|;)\s*", "", s)        # other comment leaders (fence first line)
    s = re.sub(r"^[-+*]\s+", "", s)              # list bullet
    s = s.replace("**", "").replace("`", "").strip()
    s = _LABEL_RE.sub("", s)
    s = _SUFFIX_RE.sub("", s).strip().rstrip(":").strip()
    for _ in range(2):                            # *italic*, __bold__, quotes
        if len(s) > 2 and s[0] == s[-1] and s[0] in "*_'\"":
            s = s[1:-1].strip()
    while s.startswith("./"):
        s = s[2:]
    if not s or not _PATH_TOKEN_RE.match(s) or not re.search(r"[A-Za-z0-9]", s):
        return None
    if s.startswith(("-", "+", "@", "~")) or s.endswith("/") or s.endswith("."):
        return None
    if "." not in s and "/" not in s and s not in _BARE_NAMES:
        return None
    return s


def _path_from_info(info: str) -> str | None:
    """A path in a fence's info string: ```solver.py, ```python:solver.py, ```python title="x.py"."""
    for tok in re.split(r"[\s:]+", info.strip()):
        tok = re.sub(r"^(?:title|file(?:name)?|path)=", "", tok, flags=re.IGNORECASE).strip("\"'`")
        if ("." in tok or "/" in tok) and _path_from_line(tok) == tok:
            return tok
    return None


def _is_closer(line: str, char: str, length: int) -> bool:
    s = line.strip()
    return len(s) >= length and set(s) == {char}


def _diff_path(spec: str, prefix: str) -> str | None:
    """`a/solver.py\t2024-...` → `solver.py`; `/dev/null` → None."""
    p = spec.split("\t")[0].strip().strip('"')
    if p == "/dev/null":
        return None
    if p.startswith(prefix):
        p = p[len(prefix):]
    return p


def _is_hunk_line(line: str) -> bool:
    return line == "" or line[0] in " +-\\"


class _Parser:
    """One pass over the reply's lines; see parse_change_reply."""

    def __init__(self, text: str) -> None:
        self.lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.edits: list[Edit] = []
        self.starts: list[int] = []   # line index where each edit (with its path line) begins
        self.current_path: str | None = None
        self.fence: tuple[str, int] | None = None  # open fence holding SEARCH/REPLACE blocks

    # -- helpers ---------------------------------------------------------------------------
    def _prev_nonblank(self, i: int) -> int:
        j = i - 1
        while j >= 0 and not self.lines[j].strip():
            j -= 1
        return j

    def _add(self, edit: Edit, start: int) -> None:
        self.edits.append(edit)
        self.starts.append(start)
        self.current_path = edit.path

    def _lookback_path(self, i: int) -> tuple[str | None, int]:
        """The path named just before line i (skipping blanks and one fence opener)."""
        j = self._prev_nonblank(i)
        if j < 0:
            return None, i
        m = _FENCE_OPEN_RE.match(self.lines[j])
        if m and m.group(2).strip():
            p = _path_from_info(m.group(2))
            if p:
                return p, j
        if m:  # fence opener without a path: the path may stand before the fence
            k = self._prev_nonblank(j)
            if k >= 0:
                p = _path_from_line(self.lines[k])
                if p:
                    return p, k
            return None, j
        p = _path_from_line(self.lines[j])
        if p:
            k = self._prev_nonblank(j)
            start = k if k >= 0 and _FENCE_OPEN_RE.match(self.lines[k]) and self.fence else j
            return p, start
        return None, i

    def _mentioned_path(self, i: int) -> tuple[str | None, int]:
        """Last resort for the first block: prose like 'In `solver.py`:' just before it.

        Only used when no file has been named yet, so it can never redirect a block away from
        the file the previous blocks edited; exactly one backticked path-like token must appear.
        """
        j = self._prev_nonblank(i)
        if j >= 0 and _FENCE_OPEN_RE.match(self.lines[j]):
            j = self._prev_nonblank(j)
        if j < 0 or not self.lines[j].rstrip().endswith(":"):
            return None, i
        toks = [t for t in re.findall(r"`([^`\s]+)`", self.lines[j]) if "." in t or "/" in t]
        if len(toks) == 1 and _path_from_line(toks[0]) == toks[0].removeprefix("./"):
            return toks[0].removeprefix("./"), j
        return None, i

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> ParsedReply:
        lines, n, i = self.lines, len(self.lines), 0
        while i < n:
            line = lines[i]
            if _SEARCH_RE.match(line):
                i = self._block(i)
                continue
            if _REPLACE_RE.match(line):
                raise EditParseError(f"line {i + 1}: '{line.strip()}' without a matching <<<<<<< SEARCH")
            if self.fence is not None:
                if _is_closer(line, *self.fence):
                    self.fence = None
                i += 1
                continue
            m = _FENCE_OPEN_RE.match(line)
            if m:
                i = self._fence(i, m.group(1), m.group(2))
                continue
            if line.startswith("--- ") and i + 1 < n and lines[i + 1].startswith("+++ "):
                start = i - 1 if i > 0 and lines[i - 1].startswith("diff --git ") else i
                i = self._diff(i, n, None, start, fenced=False)
                continue
            if _HUNK_RE.match(line):
                j = self._prev_nonblank(i)
                p = _path_from_line(lines[j]) if j >= 0 else None
                if p:
                    i = self._diff(i, n, p, j, fenced=False)
                    continue
            i += 1
        if not self.edits:
            raise EditParseError(
                "the reply contains no edit blocks; name the file on a line, then "
                "<<<<<<< SEARCH / ======= / >>>>>>> REPLACE"
            )
        return ParsedReply(description=self._description(min(self.starts)), edits=self.edits)

    def _block(self, i: int) -> int:
        """Read one SEARCH/REPLACE block starting at the SEARCH marker on line i."""
        path, start = self._lookback_path(i)
        if path is None:
            path, start = self.current_path, i
        if path is None:
            path, start = self._mentioned_path(i)
        if path is None:
            raise EditParseError(
                f"line {i + 1}: edit block names no file; put the file's path on the line before <<<<<<< SEARCH"
            )
        lines, n = self.lines, len(self.lines)
        search: list[str] = []
        j = i + 1
        while True:
            if j >= n:
                raise EditParseError(
                    f"unterminated edit block for {path} starting at line {i + 1}: no ======= divider "
                    "(was the reply cut off?)"
                )
            if _DIVIDER_RE.match(lines[j]):
                break
            if _SEARCH_RE.match(lines[j]) or _REPLACE_RE.match(lines[j]):
                raise EditParseError(
                    f"edit block for {path} starting at line {i + 1}: line {j + 1} "
                    f"'{lines[j].strip()}' comes before the ======= divider"
                )
            search.append(lines[j])
            j += 1
        replace: list[str] = []
        j += 1
        while True:
            if j >= n:
                raise EditParseError(
                    f"unterminated edit block for {path} starting at line {i + 1}: no >>>>>>> REPLACE "
                    "(was the reply cut off?)"
                )
            if _REPLACE_RE.match(lines[j]):
                break
            if _SEARCH_RE.match(lines[j]):
                raise EditParseError(
                    f"unterminated edit block for {path} starting at line {i + 1}: a new <<<<<<< SEARCH "
                    f"at line {j + 1} comes before >>>>>>> REPLACE"
                )
            replace.append(lines[j])
            j += 1
        # '# ... existing code ...' in REPLACE (and not in SEARCH) would delete the code it stands for
        kept = {s.strip() for s in search}
        for k, r in enumerate(replace):
            if _ELIDED_RE.match(r) and r.strip() not in kept:
                raise EditParseError(
                    f"edit block for {path} starting at line {i + 1} elides code at line {j - len(replace) + k + 1} "
                    f"({r.strip()[:60]!r}); write out every line the REPLACE section keeps"
                )
        self._add(EditBlock(path, "".join(s + "\n" for s in search), "".join(r + "\n" for r in replace)), start)
        return j + 1

    def _fence(self, i: int, marker: str, info: str) -> int:
        """A code fence opened on line i: SEARCH blocks inside, a diff, a whole file, or prose code."""
        lines, n = self.lines, len(self.lines)
        char, length = marker[0], len(marker)
        close: int | None = None
        for k in range(i + 1, n):
            if _SEARCH_RE.match(lines[k]):
                self.fence = (char, length)  # blocks inside; the main loop reads them
                return i + 1
            if _is_closer(lines[k], char, length):
                close = k
                break
        end = close if close is not None else n
        content = lines[i + 1:end]
        lang = (info.split() or [""])[0].lower()
        info_path = _path_from_info(info)
        jb = self._prev_nonblank(i)
        before_path = _path_from_line(lines[jb]) if jb >= 0 else None
        first_idx = next((k for k, c in enumerate(content) if c.strip()), None)
        first_path = _path_from_line(content[first_idx]) if first_idx is not None else None
        # A first line that is code (`x.shape`) rather than a path is unlikely to be *alone* on
        # its line *and* be the only thing naming a file; still, prefer the explicit places.
        path = info_path or before_path or first_path
        start = jb if (before_path and not info_path) else i
        body_from = 0
        if first_path is not None and first_path == path and first_idx is not None:
            body_from = first_idx + 1
        body = content[body_from:]
        nonblank = [c for c in body if c.strip()]
        has_header = any(
            body[k].startswith("--- ") and k + 1 < len(body) and body[k + 1].startswith("+++ ")
            for k in range(len(body))
        )
        is_diff = lang in ("diff", "patch", "udiff") or has_header or bool(nonblank and _HUNK_RE.match(nonblank[0]))
        if is_diff and (has_header or path is not None):
            if close is None:
                raise EditParseError(
                    f"the diff for {path or 'a file'} opened at line {i + 1} is never closed (was the reply cut off?)"
                )
            base = i + 1 + body_from
            self._diff(base, end, path, start, fenced=True)
            return end + 1
        if path is None or is_diff:
            return end + 1 if close is not None else n  # prose code: an example, not an edit
        if close is None:
            raise EditParseError(
                f"the code block for {path} opened at line {i + 1} is never closed (was the reply cut off?)"
            )
        if len(body) > MAX_WHOLE_FILE_LINES:
            raise EditParseError(
                f"whole-file replacement of {path} has {len(body)} lines; the limit is "
                f"{MAX_WHOLE_FILE_LINES}: use SEARCH/REPLACE blocks"
            )
        for k, c in enumerate(body):
            if _ELIDED_RE.match(c):
                raise EditParseError(
                    f"whole-file replacement of {path} elides code at line {i + 2 + body_from + k} "
                    f"({c.strip()[:60]!r}); send the complete file or SEARCH/REPLACE blocks"
                )
        self._add(WholeFile(path, "".join(c + "\n" for c in body)), start)
        return end + 1

    def _diff(self, i: int, end: int, default_path: str | None, start: int, fenced: bool) -> int:
        """Unified diff lines from i (a `---` header or a `@@` hunk) up to `end`; returns the next line."""
        lines = self.lines
        path = default_path
        new_file = False
        hunks: list[str] = []
        first_start = start

        def flush() -> None:
            nonlocal hunks
            if not hunks:
                return
            if path is None:
                raise EditParseError(f"line {i + 1}: a diff hunk names no file; add '--- a/PATH' / '+++ b/PATH'")
            if new_file:
                added = [h[1:] for h in hunks if h.startswith("+")]
                self._add(EditBlock(path, "", "".join(a + "\n" for a in added)), first_start)
            else:
                self._add(UnifiedDiff(path, "\n".join(hunks) + "\n"), first_start)
            hunks = []

        k = i
        while k < end:
            line = lines[k]
            if line.startswith(("diff --git ", "index ", "new file mode", "deleted file mode", "similarity index")):
                k += 1
                continue
            if line.startswith("--- ") and k + 1 < end and lines[k + 1].startswith("+++ "):
                flush()
                first_start = k if k != i else start
                old = _diff_path(line[4:], "a/")
                new = _diff_path(lines[k + 1][4:], "b/")
                if new is None:
                    raise EditParseError(f"line {k + 2}: the diff deletes {old}; deleting files is not supported")
                path, new_file = new, old is None
                k += 2
                continue
            if _HUNK_RE.match(line):
                body: list[str] = [line]
                k += 1
                while k < end and _is_hunk_line(lines[k]) and not _HUNK_RE.match(lines[k]):
                    if lines[k].startswith("--- ") and k + 1 < end and lines[k + 1].startswith("+++ "):
                        break
                    if lines[k].startswith("diff --git "):
                        break
                    body.append(lines[k])
                    k += 1
                while len(body) > 1 and body[-1] == "":
                    body.pop()
                hunks.extend(body)
                continue
            if fenced:
                k += 1  # stray text inside a diff fence
                continue
            break
        flush()
        return k

    # -- description -----------------------------------------------------------------------
    def _description(self, upto: int) -> str:
        """First paragraph of prose before the first edit, heading marks stripped, ≤ ~300 chars."""
        paragraphs: list[list[str]] = [[]]
        fence: tuple[str, int] | None = None
        for line in self.lines[:upto]:
            if fence is not None:
                if _is_closer(line, *fence):
                    fence = None
                continue
            m = _FENCE_OPEN_RE.match(line)
            if m:
                fence = (m.group(1)[0], len(m.group(1)))
                paragraphs.append([])
                continue
            s = line.strip()
            if not s or re.fullmatch(r"[-*_=]{3,}", s):
                paragraphs.append([])
                continue
            heading = re.match(r"^#{1,6}\s+(.*)$", s)
            if heading:
                paragraphs.append([heading.group(1)])
                paragraphs.append([])
                continue
            paragraphs[-1].append(s)
        for para in paragraphs:
            text = " ".join(para).strip()
            text = re.sub(r"\s+", " ", text)
            text = text.replace("**", "").replace("__", "").strip()
            label = text.rstrip(":").strip().lower()
            if not text or label in _GENERIC_HEADINGS:
                continue
            text = re.sub(r"^(?:description|summary|change)\s*:\s*", "", text, flags=re.IGNORECASE)
            if len(text) > MAX_DESCRIPTION_CHARS:
                cut = text[:MAX_DESCRIPTION_CHARS - 1]
                if " " in cut[MAX_DESCRIPTION_CHARS // 2:]:
                    cut = cut[: cut.rfind(" ")]
                text = cut.rstrip(" ,;:") + "…"
            return text
        return ""


def parse_change_reply(text: str) -> ParsedReply:
    """Read a change reply: its description and its edits, in order. Raises EditParseError."""
    return _Parser(text).run()


# ---------------------------------------------------------------------------------------------
# Applying
# ---------------------------------------------------------------------------------------------
@dataclass
class _Doc:
    """A file's text split into lines, with what it takes to write it back the same way."""

    lines: list[str]
    trailing_newline: bool
    crlf: bool = False
    bom: bool = False

    @classmethod
    def from_text(cls, text: str) -> _Doc:
        bom = text.startswith("\ufeff")
        if bom:
            text = text[1:]
        lf = text.count("\n")
        crlf = lf > 0 and text.count("\r\n") == lf
        if crlf:
            text = text.replace("\r\n", "\n")
        trailing = text.endswith("\n")
        body = text[:-1] if trailing else text
        return cls(body.split("\n") if body or trailing else [], trailing, crlf, bom)

    def text(self) -> str:
        out = "\n".join(self.lines)
        if self.lines and self.trailing_newline:
            out += "\n"
        if self.crlf:
            out = out.replace("\n", "\r\n")
        return ("\ufeff" if self.bom else "") + out


def _split(text: str) -> list[str]:
    """Newline-terminated lines → list without the terminators."""
    if not text:
        return []
    return (text[:-1] if text.endswith("\n") else text).split("\n")


def _leading_ws(s: str) -> str:
    return s[: len(s) - len(s.lstrip(" \t"))]


def _indent_shift(window: list[str], search: list[str]) -> tuple[int, str] | None:
    """If `window` equals `search` shifted by one uniform indent, return (sign, extra indent)."""
    shift: tuple[int, str] | None = None
    seen = False
    for f, s in zip(window, search):
        f, s = f.rstrip(), s.rstrip()
        if not f and not s:
            continue
        if not f or not s or f.lstrip(" \t") != s.lstrip(" \t"):
            return None
        wf, ws = _leading_ws(f), _leading_ws(s)
        if len(wf) >= len(ws) and wf.endswith(ws):
            cur = (1, wf[: len(wf) - len(ws)])
        elif ws.endswith(wf):
            cur = (-1, ws[: len(ws) - len(wf)])
        else:
            return None
        if not cur[1]:
            cur = (0, "")
        if seen and cur != shift:
            return None
        shift, seen = cur, True
    return shift if seen and shift and shift[0] != 0 else None


def _reindent(lines: list[str], shift: tuple[int, str]) -> list[str]:
    sign, extra = shift
    out = []
    for line in lines:
        if not line.strip():
            out.append(line)
        elif sign > 0:
            out.append(extra + line)
        elif line.startswith(extra):
            out.append(line[len(extra):])
        else:
            ws = _leading_ws(line)
            out.append(line[min(len(ws), len(extra)):])
    return out


def _find(lines: list[str], search: list[str]) -> tuple[list[int], tuple[int, str] | None]:
    """All places `search` matches: exact, else ignoring trailing whitespace, else re-indented."""
    n = len(search)
    span = range(len(lines) - n + 1)
    hits = [i for i in span if lines[i:i + n] == search]
    if hits:
        return hits, None
    rs = [s.rstrip() for s in search]
    rl = [s.rstrip() for s in lines]
    hits = [i for i in span if rl[i:i + n] == rs]
    if hits:
        return hits, None
    key = next((s.strip() for s in search if s.strip()), None)
    if key is None:
        return [], None
    off = next(k for k, s in enumerate(search) if s.strip())
    found: list[int] = []
    shifts: list[tuple[int, str]] = []
    for i in span:
        if rl[i + off].strip() != key:
            continue
        sh = _indent_shift(lines[i:i + n], search)
        if sh is not None:
            found.append(i)
            shifts.append(sh)
    if len(found) == 1:
        return found, shifts[0]
    return found, (shifts[0] if shifts else None)


_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def _closest(lines: list[str], search: list[str], candidates: int = 12) -> tuple[int, int, float]:
    """(start, end) 0-based half-open and similarity of the file region most like `search`.

    Why two stages: a difflib ratio of every window of a long file costs minutes. A sliding
    bag-of-tokens overlap (linear in the file, blind to line shifts) picks a few candidate
    windows; those are ranked by the mean difflib ratio of their lines against the SEARCH lines
    (indentation ignored, so a mis-indented block still finds its region).
    """
    n = max(1, len(search))
    if len(lines) <= n:
        starts = [0]
    else:
        want: dict[str, int] = {}
        for line in search:
            for t in _TOKEN_RE.findall(line):
                want[t] = want.get(t, 0) + 1
        toks = [_TOKEN_RE.findall(line) for line in lines]
        have: dict[str, int] = {}
        overlap = 0
        scores: list[int] = []
        for i, row in enumerate(toks):
            for t in row:
                c = have.get(t, 0)
                if c < want.get(t, 0):
                    overlap += 1
                have[t] = c + 1
            if i >= n:
                for t in toks[i - n]:
                    c = have[t] - 1
                    have[t] = c
                    if c < want.get(t, 0):
                        overlap -= 1
            if i >= n - 1:
                scores.append(overlap)
        starts = sorted(range(len(scores)), key=lambda k: (-scores[k], k))[:candidates]
    best, best_i = -1.0, 0
    for i in sorted(starts):
        window = lines[i:i + n]
        pairs = list(zip(search, window))
        r = sum(difflib.SequenceMatcher(None, x.strip(), y.strip()).ratio() for x, y in pairs) / n
        if r > best:
            best, best_i = r, i
    return best_i, min(len(lines), best_i + n), max(best, 0.0)


def _not_found(label: str, path: str, lines: list[str], search: list[str]) -> SearchNotFound:
    first = next((s for s in search if s.strip()), search[0] if search else "")
    head = f"{label} for {path} does not match the file (its first line: {first.strip()!r})"
    if not lines:
        return SearchNotFound(f"{head}; {path} is empty")
    a, b, ratio = _closest(lines, search)
    shown = lines[a:min(b, a + 8)]
    width = len(str(a + len(shown)))
    body = "\n".join(f"  {a + k + 1:>{width}} | {s}" for k, s in enumerate(shown))
    more = f"\n  ... ({b - a - len(shown)} more lines)" if b - a > len(shown) else ""
    span = f"line {a + 1}" if b - a <= 1 else f"lines {a + 1}-{b}"
    return SearchNotFound(
        f"{head}; the closest region is {span} (similarity {ratio:.2f}):\n{body}{more}"
    )


def _ambiguous(label: str, path: str, hits: list[int]) -> EditError:
    where = ", ".join(str(h + 1) for h in hits[:8]) + (", ..." if len(hits) > 8 else "")
    return EditError(
        f"{label} for {path} matches {len(hits)} places (lines {where}); add context lines so it matches once"
    )


def _apply_block(doc: _Doc | None, edit: EditBlock, label: str) -> _Doc:
    """One SEARCH/REPLACE against the current in-memory state of the file (None: absent)."""
    replace = _split(edit.replace)
    if edit.search == "":
        if doc is not None and any(s.strip() for s in doc.lines):
            raise EditError(
                f"{label} for {edit.path} has an empty SEARCH section, which creates a new file, "
                f"but {edit.path} already exists; put the lines to change in SEARCH"
            )
        base = doc or _Doc([], True)
        return _Doc(replace, True, base.crlf, base.bom)
    search = _split(edit.search)
    if doc is None:
        raise SearchNotFound(
            f"{label}: {edit.path} does not exist; to create it, leave the SEARCH section empty"
        )
    lines = doc.lines
    hits, shift = _find(lines, search)
    if not hits:
        # Models add or drop blank lines at the edges of a block: retry without them.
        lo = next((k for k, s in enumerate(search) if s.strip()), len(search))
        hi = len(search) - next((k for k, s in enumerate(reversed(search)) if s.strip()), 0)
        if 0 < hi - lo < len(search):
            hits, shift = _find(lines, search[lo:hi])
            if hits:
                cut_head, cut_tail = lo, len(search) - hi
                search = search[lo:hi]
                while cut_head and replace and not replace[0].strip():
                    replace, cut_head = replace[1:], cut_head - 1
                while cut_tail and replace and not replace[-1].strip():
                    replace, cut_tail = replace[:-1], cut_tail - 1
    if not hits:
        raise _not_found(label, edit.path, lines, search)
    if len(hits) > 1:
        raise _ambiguous(label, edit.path, hits)
    if shift is not None:
        replace = _reindent(replace, shift)
    i = hits[0]
    return _Doc(lines[:i] + replace + lines[i + len(search):], doc.trailing_newline, doc.crlf, doc.bom)


@dataclass
class _Hunk:
    old_start: int | None   # 0-based index where the old lines should start, per the header
    old: list[str]
    new: list[str]
    tags: list[str]         # ' ', '-', '+' per body line, for fuzz trimming
    body: list[str]


def _parse_hunks(text: str, path: str) -> list[_Hunk]:
    hunks: list[_Hunk] = []
    cur: _Hunk | None = None
    for line in text.split("\n"):
        m = _HUNK_RE.match(line)
        if m:
            start = None
            if m.group(1) is not None:
                a = int(m.group(1))
                count = int(m.group(2)) if m.group(2) is not None else 1
                start = a if count == 0 else max(a - 1, 0)
            cur = _Hunk(start, [], [], [], [])
            hunks.append(cur)
            continue
        if cur is None or line.startswith("\\"):
            continue
        tag, body = (line[0], line[1:]) if line else (" ", "")
        if tag not in " +-":
            continue
        cur.tags.append(tag)
        cur.body.append(body)
        if tag in " -":
            cur.old.append(body)
        if tag in " +":
            cur.new.append(body)
    if not hunks:
        raise EditParseError(f"the diff for {path} has no @@ hunks")
    for h in hunks:  # drop the empty lines models leave after the last real line
        while h.tags and h.tags[-1] == " " and h.body[-1] == "" and h.old and h.new:
            h.tags.pop()
            h.body.pop()
            h.old.pop()
            h.new.pop()
    return hunks


def _apply_hunk(lines: list[str], h: _Hunk, hint: int | None, path: str, label: str) -> tuple[list[str], int]:
    """Apply one hunk; returns the new lines and the change in line count."""
    if not h.old:
        at = len(lines) if hint is None else max(0, min(hint, len(lines)))
        return lines[:at] + h.new + lines[at:], len(h.new)
    # fuzz: allow dropping up to 2 context lines at either end, as patch(1) does
    for fuzz in range(3):
        tags, body = h.tags, h.body
        lo, hi = 0, len(tags)
        for _ in range(fuzz):
            if lo < hi and tags[lo] == " ":
                lo += 1
        for _ in range(fuzz):
            if hi > lo and tags[hi - 1] == " ":
                hi -= 1
        if fuzz and (lo, hi) == (0, len(tags)):
            continue
        old = [b for t, b in zip(tags[lo:hi], body[lo:hi]) if t in " -"]
        new = [b for t, b in zip(tags[lo:hi], body[lo:hi]) if t in " +"]
        if not old:
            continue
        exact = [i for i in range(len(lines) - len(old) + 1) if lines[i:i + len(old)] == old]
        if not exact:
            ro = [s.rstrip() for s in old]
            rl = [s.rstrip() for s in lines]
            exact = [i for i in range(len(lines) - len(old) + 1) if rl[i:i + len(old)] == ro]
        if not exact:
            continue
        if hint is None:
            if len(exact) > 1:
                raise _ambiguous(f"{label} (a hunk without line numbers)", path, exact)
            at = exact[0]
        else:
            at = min(exact, key=lambda i: (abs(i - (hint + lo)), i))
        return lines[:at] + new + lines[at + len(old):], len(new) - len(old)
    raise _not_found(f"{label} (hunk near line {(hint or 0) + 1})", path, lines, h.old)


def _apply_diff(doc: _Doc | None, edit: UnifiedDiff, label: str) -> _Doc:
    hunks = _parse_hunks(edit.hunks_text, edit.path)
    if doc is None:
        if any(h.old for h in hunks):
            raise SearchNotFound(f"{label}: the diff changes {edit.path}, which does not exist")
        doc = _Doc([], True)
    lines = list(doc.lines)
    delta = 0
    for h in hunks:
        hint = None if h.old_start is None else h.old_start + delta
        lines, d = _apply_hunk(lines, h, hint, edit.path, label)
        delta += d
    return _Doc(lines, doc.trailing_newline or not doc.lines, doc.crlf, doc.bom)


def _read(path: Path, rel: str) -> _Doc | None:
    if not path.exists():
        return None
    try:
        return _Doc.from_text(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise EditError(f"{rel} is not UTF-8 text; looptree only edits text files") from None
    except OSError as exc:
        raise EditError(f"cannot read {rel}: {exc.strerror}") from None


def apply_edits(root: Path, edits: list[Edit], policy: AccessPolicy) -> ApplyResult:
    """Apply `edits` to the tree at `root`, all or nothing.

    1. every path goes through `policy.resolve_for_edit` (EditRejected on the first refusal);
    2. every new file content is computed in memory, blocks for one file in order;
    3. only then is anything written: each file to a temp file beside it, then renamed over,
       keeping its mode, newline style and (trailing) newline.
    """
    root_r = root.resolve()
    targets: list[tuple[Edit, Path, str]] = []
    for edit in edits:
        if not isinstance(edit, (EditBlock, WholeFile, UnifiedDiff)):
            raise TypeError(f"not an edit: {edit!r}")
        full = policy.resolve_for_edit(root, edit.path)
        targets.append((edit, full, full.relative_to(root_r).as_posix()))

    originals: dict[Path, _Doc | None] = {}
    state: dict[Path, _Doc | None] = {}
    names: dict[Path, str] = {}
    for n, (edit, full, rel) in enumerate(targets, start=1):
        if full not in originals:
            originals[full] = _read(full, rel)
            state[full] = originals[full]
            names[full] = rel
        label = f"edit {n}" if len(targets) > 1 else "the edit"
        cur = state[full]
        if isinstance(edit, EditBlock):
            state[full] = _apply_block(cur, edit, label)
        elif isinstance(edit, WholeFile):
            new = _Doc.from_text(edit.content)
            if cur is not None:
                new = _Doc(new.lines, cur.trailing_newline or not cur.lines, cur.crlf, cur.bom)
            state[full] = new
        else:
            state[full] = _apply_diff(cur, edit, label)

    writes: list[tuple[Path, bytes, int | None]] = []
    changed: list[str] = []
    created: list[str] = []
    for full, doc in state.items():
        assert doc is not None
        data = doc.text().encode("utf-8")
        orig = originals[full]
        if orig is not None and orig.text().encode("utf-8") == data:
            continue
        mode = stat.S_IMODE(full.stat().st_mode) if orig is not None else None
        writes.append((full, data, mode))
        changed.append(names[full])
        if orig is None:
            created.append(names[full])
    _write_all(root_r, writes)
    return ApplyResult(changed_files=changed, created_files=created)


def _write_all(root: Path, writes: list[tuple[Path, bytes, int | None]]) -> None:
    """Write every file to a temp sibling first, then rename them all; undo on failure."""
    temps: list[tuple[Path, Path]] = []
    made_dirs: list[Path] = []
    try:
        for full, data, mode in writes:
            missing = []
            d = full.parent
            while not d.exists():
                missing.append(d)
                d = d.parent
            for d in reversed(missing):
                d.mkdir()
                made_dirs.append(d)
            tmp = full.with_name(f".{full.name}.looptree-{os.getpid()}.tmp")
            tmp.write_bytes(data)
            temps.append((tmp, full))
            if mode is not None:
                os.chmod(tmp, mode)
    except OSError as exc:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        for d in reversed(made_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        rel = full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)
        raise EditError(f"cannot write {rel}: {exc.strerror or exc}") from None
    for tmp, full in temps:
        os.replace(tmp, full)
