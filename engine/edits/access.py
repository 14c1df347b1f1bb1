"""Who may touch which file: the project's writable / readonly / hidden rules.

Why one module: every path an agent names passes through here before anything is read or
written, so the rules (and their refusal messages, which a fix agent reads) live in one place.

Pattern language (all relative to the project root, anchored there, `/`-separated):
- `*` and `?` match within one path segment, `**` matches any number of segments (zero too),
  `{a,b}` alternatives, `[abc]` classes (wcmatch `globmatch` with GLOBSTAR and BRACE).
- A pattern without glob characters names a file *or* a directory: `secrets` covers
  `secrets/key.txt` too; a trailing `/` (`secrets/`) means the same as `secrets/**`.
- Hidden and readonly patterns let `*`/`**` match dot-files (`secrets/**` hides
  `secrets/.env`): there the safe side is to match more. Writable patterns do not (like a
  shell), so `**/*.py` never makes `.venv/...` writable; name a dot path explicitly to allow it.
- Precedence: hidden > readonly > writable. `.git` and `.looptree` are always hidden.
- `hidden_needed` patterns name hidden files a command (build, check, bench) reads: they stay in
  a candidate's worktree; every other hidden file is removed from it (`drop_hidden`). Either
  way a hidden file never reaches a prompt (engine.llm.redact scrubs what the code prints).
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Any, Literal

from wcmatch import glob

from looptree.engine.errors import ConfigError, EditRejected

Kind = Literal["writable", "readonly", "hidden", "outside"]

# Directories no agent may see or touch, whatever the patterns say (any segment with this name).
ALWAYS_OFF = (".git", ".looptree")
_MAGIC = set("*?[{")
_BASE_FLAGS = glob.GLOBSTAR | glob.BRACE


def _has_magic(pattern: str) -> bool:
    return any(ch in _MAGIC for ch in pattern)


class _PatternSet:
    """A list of patterns compiled once; answers 'does this relative path match any of them'."""

    def __init__(self, patterns: list[str], dotglob: bool) -> None:
        self.original = list(patterns)
        self.normalized: list[str] = []
        self._literals: list[str] = []
        globs: list[str] = []
        for raw in patterns:
            pat = self.normalize(raw)
            self.normalized.append(pat)
            if _has_magic(pat):
                globs.append(pat)
            else:
                self._literals.append(pat)
        flags = _BASE_FLAGS | (glob.DOTGLOB if dotglob else 0)
        self._dotglob = dotglob
        self._flags = flags
        self._matcher = glob.compile(globs, flags=flags) if globs else None

    @staticmethod
    def normalize(raw: str) -> str:
        """Canonical form of a user pattern; refuses patterns that could never be safe."""
        pat = raw.strip()
        if not pat:
            raise ConfigError("access pattern is empty; remove it or name a file or glob")
        if "\\" in pat or "\x00" in pat:
            raise ConfigError(f"access pattern {raw!r} contains a backslash or NUL; use '/'")
        while pat.startswith("./"):
            pat = pat[2:]
        pat = pat.lstrip("/")  # '/solver.py' means the root file, as in .gitignore
        if pat.endswith("/"):
            pat = pat.rstrip("/") + "/**"
        if not pat or ".." in pat.split("/"):
            raise ConfigError(f"access pattern {raw!r} points outside the project")
        return pat

    def match(self, rel: str) -> bool:
        for lit in self._literals:
            if rel == lit or rel.startswith(lit + "/"):
                return True
        return bool(self._matcher and self._matcher.match(rel))

    def matching(self, rel: str) -> list[int]:
        """Indexes of the patterns (in the user's order) that match `rel` (for unmatched_patterns)."""
        out = []
        for idx, pat in enumerate(self.normalized):
            if _has_magic(pat):
                if glob.globmatch(rel, pat, flags=self._flags):
                    out.append(idx)
            elif rel == pat or rel.startswith(pat + "/"):
                out.append(idx)
        return out

    def may_match_under(self, dir_rel: str) -> bool:
        """Could some file below directory `dir_rel` match? Lets tree walks skip `.venv` and friends."""
        parts = dir_rel.split("/")
        for pat in self.normalized:
            if "{" in pat:
                return True  # braces may hide '/', don't try to be clever
            segs = pat.split("/")
            literal: list[str] = []
            for seg in segs:
                if _has_magic(seg):
                    break
                literal.append(seg)
            all_literal = len(literal) == len(segs)
            if any(a != b for a, b in zip(parts, literal)):
                continue
            if not self._dotglob and any(p.startswith(".") for p in parts[len(literal):]):
                continue  # '*' and '**' do not match dot names here
            if all_literal:
                return True  # dir is a prefix of the pattern, or inside a literal dir pattern
            if "**" in segs or len(parts) < len(segs):
                return True
        return False


def _normalize_rel(relpath: str) -> str | None:
    """`./a//b.py` → `a/b.py`; None for paths that leave the root or are absolute."""
    if not relpath or relpath.startswith("/") or "\x00" in relpath:
        return None
    norm = posixpath.normpath(relpath)
    if norm == "." or norm == ".." or norm.startswith("../"):
        return None
    return norm


class AccessPolicy:
    """The writable / readonly / hidden rules of one project."""

    def __init__(self, writable: list[str], readonly: list[str], hidden: list[str],
                 hidden_needed: list[str] | None = None) -> None:
        self._writable = _PatternSet(writable, dotglob=False)
        self._readonly = _PatternSet(readonly, dotglob=True)
        self._hidden = _PatternSet(hidden, dotglob=True)
        self._needed = _PatternSet(hidden_needed or [], dotglob=True)

    @property
    def writable_patterns(self) -> list[str]:
        return list(self._writable.original)

    # ---- classification -------------------------------------------------------------------
    def classify(self, relpath: str) -> Kind:
        """What the agent may do with `relpath` (relative to the root, `/`-separated)."""
        rel = _normalize_rel(relpath)
        if rel is None:
            return "outside"
        if any(seg in ALWAYS_OFF for seg in rel.split("/")):
            return "hidden"
        if self._hidden.match(rel):
            return "hidden"
        if self._readonly.match(rel):
            return "readonly"
        if self._writable.match(rel):
            return "writable"
        return "outside"

    def _refuse_kind(self, shown: str, kind: Kind, via: str = "") -> None:
        """Raise the user-facing refusal for a path that is not writable."""
        if kind == "hidden":
            # Never say more than the name: the agent must not learn what a hidden file holds.
            raise EditRejected(f"{shown}{via} is off limits (hidden from the agent); edit another file")
        if kind == "readonly":
            raise EditRejected(f"{shown}{via} is read-only")
        if kind == "outside":
            allowed = ", ".join(self._writable.original) or "(none)"
            raise EditRejected(f"{shown}{via} is not writable; writable: {allowed}")

    # ---- edits -----------------------------------------------------------------------------
    def resolve_for_edit(self, root: Path, relpath: str) -> Path:
        """The absolute file to write for `relpath`, or EditRejected saying exactly why not.

        Lexical checks come first (cheap, and they never touch the disk), then the
        classification of the path as named, then symlinks: the *resolved* target must lie
        inside the root and be writable too, so a link cannot smuggle an edit into a
        read-only, hidden or foreign file.
        """
        shown = repr(relpath) if not relpath or any(c in relpath for c in "\x00\\\n\r\t") else relpath
        if not relpath or not relpath.strip():
            raise EditRejected("an edit names an empty path")
        if "\x00" in relpath:
            raise EditRejected(f"path {shown} contains a NUL byte")
        if "\\" in relpath:
            raise EditRejected(f"path {shown} contains a backslash; use '/' and a path relative to the project root")
        if relpath.startswith("/") or re.match(r"[A-Za-z]:", relpath):
            raise EditRejected(f"{shown} is an absolute path; name files relative to the project root")
        if ".." in relpath.split("/"):
            raise EditRejected(f"{shown} contains a '..' segment; name files relative to the project root")
        rel = _normalize_rel(relpath)
        if rel is None:
            raise EditRejected(f"{shown} points outside the project root")
        segs = rel.split("/")
        if any(seg in ALWAYS_OFF for seg in segs):
            raise EditRejected(f"{shown} is off limits: looptree never edits .git or .looptree")
        self._refuse_kind(shown, self.classify(rel))

        root_r = root.resolve()
        # Walk the parents so the refusal names the symlink that escapes.
        cur = root_r
        for i, seg in enumerate(segs[:-1]):
            cur = cur / seg
            prefix = "/".join(segs[: i + 1])
            if cur.is_symlink():
                try:
                    target = cur.resolve()
                except (OSError, RuntimeError):
                    raise EditRejected(f"{shown}: directory {prefix} is a broken or looping symlink") from None
                if not target.is_relative_to(root_r):
                    raise EditRejected(f"{shown}: directory {prefix} is a symlink that resolves outside the project")
            if cur.exists() and not cur.is_dir():
                raise EditRejected(f"{shown}: {prefix} is a file, not a directory")
        try:
            full = (root_r / rel).resolve()
        except (OSError, RuntimeError):
            raise EditRejected(f"{shown} is a looping symlink") from None
        if not full.is_relative_to(root_r):
            raise EditRejected(f"{shown} is a symlink that resolves outside the project")
        real_rel = full.relative_to(root_r).as_posix()
        if real_rel != rel:
            if any(seg in ALWAYS_OFF for seg in real_rel.split("/")):
                raise EditRejected(f"{shown} is a symlink into .git or .looptree, which are off limits")
            kind = self.classify(real_rel)
            if kind == "hidden":
                raise EditRejected(f"{shown} is a symlink to a file that is off limits")
            self._refuse_kind(shown, kind, via=f" (a symlink to {real_rel})")
        if full.is_dir():
            raise EditRejected(f"{shown} is a directory, not a file")
        return full

    # ---- listings ----------------------------------------------------------------------------
    def _walk(self, root: Path, patterns: list[_PatternSet]):
        """Yield (relpath, abs path) of plain files and file symlinks, never entering .git/.looptree,
        symlinked directories, or directories no pattern could reach."""
        root_r = root.resolve()
        for dirpath, dirnames, filenames in os.walk(root_r, followlinks=False):
            base = Path(dirpath)
            rel_dir = base.relative_to(root_r).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir
            keep = []
            for d in sorted(dirnames):
                if d in ALWAYS_OFF:
                    continue
                child = f"{rel_dir}/{d}" if rel_dir else d
                if any(p.may_match_under(child) for p in patterns):
                    keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                yield (f"{rel_dir}/{name}" if rel_dir else name), base / name

    def visible_files(self, root: Path) -> dict[str, str]:
        """Existing files the agent may see, relpath → "writable" | "readonly" (for prompts).

        Hidden files, `.git`, `.looptree`, and symlinks that leave the root or land on a hidden
        file are never listed. A symlink is reported with the stricter of its own and its
        target's kind.
        """
        root_r = root.resolve()
        out: dict[str, str] = {}
        for rel, full in self._walk(root, [self._writable, self._readonly]):
            kind = self.classify(rel)
            if kind not in ("writable", "readonly"):
                continue
            if full.is_symlink():
                try:
                    target = full.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue
                if not target.is_relative_to(root_r) or not target.is_file():
                    continue
                tkind = self.classify(target.relative_to(root_r).as_posix())
                if tkind not in ("writable", "readonly"):
                    continue
                if tkind == "readonly":
                    kind = "readonly"
            elif not full.is_file():
                continue  # fifos, sockets, ...
            out[rel] = kind
        return dict(sorted(out.items()))

    def unmatched_patterns(self, root: Path) -> list[str]:
        """Writable patterns (as the user wrote them) that match no existing file under root."""
        hit = [False] * len(self._writable.original)
        for rel, full in self._walk(root, [self._writable]):
            if not (full.is_file() or full.is_symlink()):
                continue
            for idx in self._writable.matching(rel):
                hit[idx] = True
            if all(hit):
                break
        return [pat for pat, ok in zip(self._writable.original, hit) if not ok]

    # ---- hidden files ---------------------------------------------------------------------------
    def hidden_files(self, root: Path) -> list[str]:
        """Existing files (and symlinks) under root that the user's hidden patterns cover.

        `.git` and `.looptree` are not listed: they are looptree's business, not project files.
        """
        out = []
        for rel, full in self._walk(root, [self._hidden]):
            if self._hidden.match(rel) and (full.is_symlink() or full.is_file()):
                out.append(rel)
        return out

    def needed(self, rel: str) -> bool:
        """Is this hidden file one a command reads (`project.hidden_needed`)?"""
        return self._needed.match(rel)

    def drop_hidden(self, root: Path) -> list[str]:
        """Remove from a candidate's worktree every hidden file no command needs; return them.

        The worktree is looptree's own checkout: the files stay in the commit (and in the user's
        project), so nothing is lost, and the candidate's code cannot print what is not there.
        """
        dropped = []
        for rel in self.hidden_files(root):
            if self.needed(rel):
                continue
            try:
                (root / rel).unlink()
            except FileNotFoundError:
                continue
            dropped.append(rel)
        return dropped

    def unmatched_needed(self, root: Path) -> list[str]:
        """`hidden_needed` patterns (as written) that match no hidden file under root."""
        hidden = self.hidden_files(root)
        return [pat for idx, pat in enumerate(self._needed.original)
                if not any(idx in self._needed.matching(rel) for rel in hidden)]

    def has_writable_file(self, root: Path) -> bool:
        """Does any existing file end up writable once hidden and readonly patterns have had their say?"""
        return "writable" in self.visible_files(root).values()


def check_patterns(config: Any, project_dir: Path) -> None:
    """Refuse, before spending tokens, access patterns that cannot be what the user meant.

    A writable pattern that matches no file is almost always a typo; hidden/readonly patterns
    that cover every writable file leave the agents nothing to edit (every edit is refused and
    paid for); a `hidden_needed` pattern that matches no hidden file keeps nothing.
    """
    # `config` is a looptree.engine.core.config.Config; only its [project] patterns are read.
    policy = AccessPolicy(config.project.writable, config.project.readonly, config.project.hidden,
                          config.project.hidden_needed)
    missing = policy.unmatched_patterns(project_dir)
    if missing:
        raise ConfigError(
            f"looptree.toml: project.writable pattern {missing[0]!r} matches no file in {project_dir}"
        )
    if not policy.has_writable_file(project_dir):
        raise ConfigError(
            f"looptree.toml: project.hidden/readonly patterns cover every file project.writable matches in "
            f"{project_dir}: no file is left for the agents to edit (hidden beats readonly beats writable)"
        )
    unneeded = policy.unmatched_needed(project_dir)
    if unneeded:
        raise ConfigError(
            f"looptree.toml: project.hidden_needed pattern {unneeded[0]!r} matches no hidden file in {project_dir} "
            "(list hidden files that build, check or bench read)"
        )
