"""The engine's own reads, removals and checks of files inside a candidate's worktree.

Why this module exists: the engine runs outside the sandbox, with the user's rights, and the
worktree is the one place the candidate's code may write. Anything the engine opens there by
name (the metrics CSV, the read-only files it protects) may have been replaced by a symlink
into the user's home, another run or the project's hidden files, by a FIFO that blocks the
engine's ``open`` forever, or by a folder renamed aside with a look-alike put in its place.
So every path below a worktree is walked one component at a time with ``O_NOFOLLOW`` (no
symlink is ever followed, whatever it points to), the last one must be a regular file (opened
``O_NONBLOCK`` so a FIFO cannot hang the event loop), and read-only files are compared with
what the engine checked out before the first command ran.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from looptree.engine.errors import LooptreeError

__all__ = ["ProtectedFiles", "UnsafePath", "open_beneath", "relative_beneath", "unlink_beneath"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafePath(LooptreeError):
    """A path below a worktree that the engine refuses to follow (a symlink, a FIFO, a device…)."""


def relative_beneath(root: Path, path: Path | str) -> str | None:
    """``path`` relative to ``root`` when it lies below it (lexically), else None (a host path)."""
    full = os.path.normpath(os.path.join(root, path))
    rel = os.path.relpath(full, os.path.normpath(root))
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        return None
    return rel


def _walk_dirs(root: Path, rel: str) -> tuple[int, str]:
    """(an fd of the folder holding ``rel``'s last component, that component); never follows a link."""
    parts = [p for p in rel.split(os.sep) if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UnsafePath(f"{rel} is not a path inside the worktree")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index, part in enumerate(parts[:-1]):
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                shown = os.sep.join(parts[: index + 1])
                if os.path.islink(os.path.join(root, shown)):
                    raise UnsafePath(f"folder {shown} is a symlink ({_target(root, shown)}); the engine "
                                     "does not follow links in a worktree") from None
                raise exc
            os.close(fd)
            fd = nxt
        return fd, parts[-1]
    except BaseException:
        os.close(fd)
        raise


def _target(root: Path, rel: str) -> str:
    try:
        return "-> " + os.readlink(os.path.join(root, rel))
    except OSError:
        return "unreadable"


def open_beneath(root: Path, rel: str) -> int | None:
    """A read-only fd of the regular file ``root/rel``, None when it does not exist.

    Raises ``UnsafePath`` when a component is a symlink or the file is not a regular file (a
    FIFO, a socket, a device): the engine then never reads it.
    """
    try:
        dir_fd, name = _walk_dirs(root, rel)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    try:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    raise UnsafePath(f"{rel} is a symlink ({_target(root, rel)}); the engine reads only "
                                     "a regular file the bench wrote") from None
            raise UnsafePath(f"{rel} cannot be opened ({exc.strerror})") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise UnsafePath(f"{rel} is not a regular file (a {_kind(mode)}); the engine reads only a "
                             "regular file the bench wrote")
        return fd
    finally:
        os.close(dir_fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def unlink_beneath(root: Path, rel: str) -> None:
    """Remove ``root/rel`` (a file or a symlink: never what a link points to); absent is fine.

    Raises ``UnsafePath`` when a folder on the way is a symlink (removing through it would
    delete a file outside the worktree), ``OSError`` when it cannot be removed (a folder).
    """
    try:
        dir_fd, name = _walk_dirs(root, rel)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _fingerprint(root: Path, rel: str) -> tuple[int, ...] | None:
    """Identity and change stamps of a protected file reached without links (None: not a plain file).

    (device, inode, size, mtime, ctime): a file replaced has another inode, one written in place a
    new ctime, which no process can set back; one fstat, whatever the file's size.
    """
    try:
        fd = open_beneath(root, rel)
    except (UnsafePath, OSError):
        return None
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    finally:
        os.close(fd)


class ProtectedFiles:
    """The read-only (and needed hidden) files of one worktree as the engine checked them out.

    Taken before the first command of the worktree runs; ``changed()`` after each command names
    the files that are no longer the same regular file, unchanged (inode, size, mtime, ctime),
    at the same path, reached without a symlink. The sandbox's read-only binds stop a write to such a file; this
    catches the rest (its folder renamed aside and a look-alike put in its place, a symlink,
    ``sandbox.mode = "off"``), so that no later stage runs a bench or a check the candidate wrote.
    """

    def __init__(self, root: Path, files: Iterable[str]) -> None:
        self.root = Path(root)
        self.files = {rel: _fingerprint(self.root, rel) for rel in files}

    def changed(self) -> list[str]:
        """The protected files that differ from the snapshot (sorted), [] when all are intact."""
        return sorted(rel for rel, before in self.files.items() if before != _fingerprint(self.root, rel))

    def reason(self, stage: str) -> str | None:
        """A failure reason naming what the stage changed, or None."""
        changed = self.changed()
        if not changed:
            return None
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        return (f"{stage} changed read-only project files in its worktree ({shown}): the bench, checks and "
                "data the project marks readonly must stay as committed")
