"""Is the candidate's output really the reference's output, computed honestly?

Why so many guards: an optimizing agent is rewarded for speed, and the cheapest "speed-ups" are
not computing at all: returning a cached result, zeros, an input, or the reference's own tensor.
Each such shortcut is caught here with a reason a person can act on. Every trial uses fresh
inputs from ``make_inputs(seed)`` (a new seed per trial, and a separate copy for the candidate
so it never sees the reference's tensors).

Why no copies: a check that kept float64 host copies of every input and output per seed needed
15–30x the input size in RAM (a correct CrossEntropy solution was killed for it). Inputs are
made one set at a time and dropped once used; equality with an input or with the previous
seed's output is judged by a digest of the raw bytes; values are compared in chunks of
``CHUNK`` elements, cast to float64 one chunk at a time. The peak is the reference's output
plus what running the candidate alone needs.

Conventions: ``make_inputs(seed)`` returns a tuple or list of positional arguments (anything
else is passed as the single argument) and must be deterministic in ``seed``. Outputs may be
torch tensors (any device), numpy arrays, Python/numpy scalars, ``None``, or tuples/lists/dicts
of these. torch is never imported here: a value is a tensor only if torch is already loaded.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# dtype name → (atol, rtol). Integers and bools compare exactly.
_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-2, 1e-2),
    "bfloat16": (1e-2, 1e-2),
    "float32": (1e-4, 1e-4),
    "float64": (1e-7, 1e-7),
    "complex64": (1e-4, 1e-4),
    "complex128": (1e-7, 1e-7),
}
_FP8_TOL = (1e-1, 1e-1)


def default_tolerance(dtype_name: str) -> tuple[float, float]:
    """(atol, rtol) for a dtype: fp16/bf16 1e-2, fp32 1e-4, fp64 1e-7, ints and bools exact."""
    name = dtype_name.replace("torch.", "")
    if name in _TOLERANCES:
        return _TOLERANCES[name]
    if name.startswith("float8"):
        return _FP8_TOL
    if name == "float":  # a Python float is a double
        return _TOLERANCES["float64"]
    return (0.0, 0.0)


@dataclass
class CorrectnessReport:
    """The verdict. ``reason`` is one line; ``failed_seed`` says which trial failed."""

    ok: bool
    reason: str
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    seeds_checked: list[int] = field(default_factory=list)
    failed_seed: int | None = None
    failed_output: str | None = None  # path in the output structure, e.g. "out[1]"


class _Fail(Exception):
    def __init__(self, reason: str, where: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where = where


# --------------------------------------------------------------------------- leaves

CHUNK = 1 << 20  # elements compared at a time: 8 MiB of float64 per operand


@dataclass
class _Leaf:
    """One value of an output or input structure, by reference: no copy of its data is kept."""

    path: str
    obj: Any
    kind: str  # "tensor" | "ndarray" | "scalar" | "none" | "other"
    dtype: str
    shape: tuple[int, ...]
    mem: tuple[str, int, int] | None  # (device, start, end) of the backing memory
    _digest: bytes | None = None

    @property
    def comparable(self) -> bool:
        """Has numeric values (a tensor, a numeric array or a number)."""
        if self.kind == "tensor" or self.kind == "scalar":
            return True
        return self.kind == "ndarray" and np.dtype(self.obj.dtype).kind in "fciub"

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def digest(self) -> bytes:
        """A hash of dtype, shape and raw bytes: equal digests mean identical values."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{self.kind}|{self.dtype}|{self.shape}".encode())
            if self.kind == "tensor":
                torch = sys.modules["torch"]
                flat = _flat_tensor(self.obj)
                for i in range(0, flat.numel(), CHUNK):
                    part = flat[i:i + CHUNK].to("cpu").contiguous()
                    if part.dtype == torch.bool:
                        part = part.to(torch.uint8)
                    h.update(part.view(torch.uint8).numpy().tobytes())
            elif self.kind == "ndarray":
                flat = np.asarray(self.obj).reshape(-1)
                for i in range(0, flat.size, CHUNK):
                    h.update(np.ascontiguousarray(flat[i:i + CHUNK]).tobytes())
            elif self.kind in ("scalar", "other"):
                h.update(repr(self.obj).encode())
            self._digest = h.digest()
        return self._digest

    def chunks(self) -> Iterable[np.ndarray]:
        """The values, flattened, as float64/complex128/int64/bool numpy chunks of ``CHUNK``."""
        if self.kind == "tensor":
            flat = _flat_tensor(self.obj)
            for i in range(0, flat.numel(), CHUNK):
                yield _tensor_values(flat[i:i + CHUNK])
        elif self.kind == "ndarray":
            flat = np.asarray(self.obj).reshape(-1)
            for i in range(0, flat.size, CHUNK):
                yield _array_values(flat[i:i + CHUNK])
        elif self.kind == "scalar":
            yield _scalar_values(self.obj)


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _flat_tensor(t: Any) -> Any:
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    return t.reshape(-1)


def _tensor_values(t: Any) -> np.ndarray:
    torch = sys.modules["torch"]
    t = t.to("cpu")
    if t.is_complex():
        return t.to(torch.complex128).numpy()
    if t.is_floating_point():
        return t.to(torch.float64).numpy()
    if t.dtype == torch.bool:
        return t.numpy().copy()
    return t.to(torch.int64).numpy()


def _array_values(a: np.ndarray) -> np.ndarray:
    kind = a.dtype.kind
    if kind == "c":
        return a.astype(np.complex128)
    if kind == "f":
        return a.astype(np.float64)
    if kind == "b":
        return a.astype(np.bool_)
    return a.astype(np.int64)


def _scalar_values(x: Any) -> np.ndarray:
    if isinstance(x, (bool, np.bool_)):
        return np.array([bool(x)])
    if isinstance(x, (int, np.integer)):
        return np.array([int(x)], dtype=np.int64)
    if isinstance(x, (complex, np.complexfloating)):
        return np.array([complex(x)])
    return np.array([float(x)], dtype=np.float64)


def _tensor_mem(t: Any) -> tuple[str, int, int] | None:
    try:
        storage = t.untyped_storage()
        start, size = int(storage.data_ptr()), int(storage.nbytes())
    except Exception:  # noqa: BLE001 - sparse / meta tensors have no plain storage
        return None
    if size == 0 or start == 0:
        return None
    return (str(t.device), start, start + size)


def _array_mem(a: np.ndarray) -> tuple[str, int, int] | None:
    if a.nbytes == 0:
        return None
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    lo = int(base.__array_interface__["data"][0])
    return ("cpu", lo, lo + int(base.nbytes))


def _leaf(path: str, x: Any) -> _Leaf:
    if _is_tensor(x):
        return _Leaf(path, x, "tensor", str(x.dtype).replace("torch.", ""), tuple(x.shape), _tensor_mem(x))
    if isinstance(x, np.ndarray):
        return _Leaf(path, x, "ndarray", str(x.dtype), x.shape, _array_mem(x))
    if x is None:
        return _Leaf(path, x, "none", "none", (), None)
    if isinstance(x, (bool, np.bool_)):
        return _Leaf(path, x, "scalar", "bool", (), None)
    if isinstance(x, (int, np.integer)):
        return _Leaf(path, x, "scalar", "int", (), None)
    if isinstance(x, (float, np.floating)):
        name = "float" if isinstance(x, float) else str(np.asarray(x).dtype)
        return _Leaf(path, x, "scalar", name, (), None)
    if isinstance(x, (complex, np.complexfloating)):
        return _Leaf(path, x, "scalar", "complex128", (), None)
    return _Leaf(path, x, "other", type(x).__name__, (), None)


def _structure(x: Any, path: str = "out") -> Any:
    """Nested containers → the same nesting of ``_Leaf``s (tuples/lists as lists)."""
    if isinstance(x, (tuple, list)):
        return [_structure(v, f"{path}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, dict):
        return {k: _structure(v, f"{path}[{k!r}]") for k, v in x.items()}
    return _leaf(path, x)


def _leaves(s: Any) -> Iterable[_Leaf]:
    if isinstance(s, list):
        for v in s:
            yield from _leaves(v)
    elif isinstance(s, dict):
        for v in s.values():
            yield from _leaves(v)
    else:
        yield s


def _pairs(ref: Any, cand: Any) -> list[tuple[_Leaf, _Leaf]]:
    """Walk both structures together; a structural difference is a failure."""
    if isinstance(ref, list):
        if not isinstance(cand, list):
            raise _Fail(f"output structure differs: expected a sequence of {len(ref)}, got {_describe(cand)}")
        if len(ref) != len(cand):
            raise _Fail(f"output structure differs: expected {len(ref)} outputs, got {len(cand)}")
        return [p for r, c in zip(ref, cand) for p in _pairs(r, c)]
    if isinstance(ref, dict):
        if not isinstance(cand, dict) or set(ref) != set(cand):
            got = sorted(map(str, cand)) if isinstance(cand, dict) else _describe(cand)
            raise _Fail(f"output structure differs: expected keys {sorted(map(str, ref))}, got {got}")
        return [p for k in ref for p in _pairs(ref[k], cand[k])]
    if isinstance(cand, (list, dict)):
        raise _Fail(f"output structure differs at {ref.path}: expected one value, got {_describe(cand)}", ref.path)
    return [(ref, cand)]


def _describe(s: Any) -> str:
    if isinstance(s, list):
        return f"a sequence of {len(s)}"
    if isinstance(s, dict):
        return f"a dict with keys {sorted(map(str, s))}"
    return f"{s.kind} {s.dtype}"


def _overlaps(a: tuple[str, int, int] | None, b: tuple[str, int, int] | None) -> bool:
    return a is not None and b is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def _digests(leaves: list[_Leaf]) -> list[bytes]:
    return [leaf.digest() for leaf in leaves]


# --------------------------------------------------------------------------- the check


def _args(inputs: Any) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _call(fn: Callable[..., Any], inputs: Any, who: str) -> Any:
    try:
        out = fn(*_args(inputs))
        _device_sync()
        return out
    except Exception as exc:  # noqa: BLE001 - a crash is a verdict, not an error here
        raise _Fail(f"{who} raised {type(exc).__name__}: {exc}") from exc


def _device_sync() -> None:
    """Wait for every CUDA stream, so work left running on a side stream is finished (and its
    asynchronous errors surface) before outputs are read."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _tolerance(r: _Leaf, atol: float | None, rtol: float | None) -> tuple[float, float]:
    d_atol, d_rtol = default_tolerance(r.dtype)
    return (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)


def compare_leaves(r: _Leaf, c: _Leaf, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """(max abs err, max rel err) of ``c`` against ``r``, chunk by chunk; ``_Fail`` on a mismatch."""
    if not r.comparable or not c.comparable:
        if r.kind == "none" and c.kind == "none":
            return 0.0, 0.0
        if r.kind == "other" and c.kind == "other":
            if r.obj == c.obj:
                return 0.0, 0.0
            raise _Fail(f"{c.path}: value differs ({c.obj!r} vs expected {r.obj!r})", c.path)
        raise _Fail(f"{c.path}: expected {r.kind} {r.dtype}, got {c.kind} {c.dtype}", c.path)
    a, t = _tolerance(r, atol, rtol)
    if r.size == 0:
        return 0.0, 0.0
    if r.shape != c.shape and r.kind != "scalar":
        raise _Fail(f"{c.path}: shape {list(c.shape)} != expected {list(r.shape)}", c.path)
    abs_err = rel_err = 0.0
    n_bad = 0
    first: tuple[int, Any, Any] | None = None
    offset = 0
    for ref, cand in zip(r.chunks(), c.chunks()):
        if ref.dtype.kind in "biu" and cand.dtype.kind in "biu" and a == 0 and t == 0:
            diff = np.abs(ref.astype(np.int64) - cand.astype(np.int64))
            bad = diff != 0
            if diff.size:
                abs_err = max(abs_err, float(diff.max()))
                rel_err = max(rel_err, float((diff / np.maximum(np.abs(ref.astype(np.float64)), 1e-300)).max()))
        else:
            as_complex = ref.dtype.kind == "c" or cand.dtype.kind == "c"
            rf = ref.astype(np.complex128 if as_complex else np.float64, copy=False)
            cf = cand.astype(rf.dtype, copy=False)
            both_nan = np.isnan(rf) & np.isnan(cf)
            same_inf = np.isinf(rf) & (rf == cf)
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                diff = np.abs(rf - cf)
                ok_special = both_nan | same_inf
                diff[ok_special] = 0.0
                bad = ~(diff <= a + t * np.abs(rf))  # NaN in diff counts as bad
                bad &= ~ok_special
                finite = np.isfinite(diff)
                if finite.any():
                    abs_err = max(abs_err, float(diff[finite].max()))
                rel = diff / np.maximum(np.abs(rf), np.finfo(np.float64).tiny)
                fin_rel = np.isfinite(rel)
                if fin_rel.any():
                    rel_err = max(rel_err, float(rel[fin_rel].max()))
        count = int(np.count_nonzero(bad))
        if count and first is None:
            k = int(np.flatnonzero(bad)[0])
            first = (offset + k, cand[k], ref[k])
        n_bad += count
        offset += ref.size
    if n_bad and first is not None:
        flat, got, expected = first
        pos = np.unravel_index(flat, r.shape) if r.shape else ()
        raise _Fail(
            f"{c.path}: {n_bad} of {r.size} values differ beyond atol={a:g}, rtol={t:g} "
            f"(max abs err {abs_err:.3g}; first at {tuple(int(p) for p in pos)}: "
            f"got {got!r}, expected {expected!r})",
            c.path,
        )
    return abs_err, rel_err


def _extra_nonfinite(r: _Leaf, c: _Leaf) -> int:
    """How many NaN/inf values ``c`` has where ``r`` (same shape) is finite."""
    if not (r.comparable and c.comparable) or r.shape != c.shape:
        return 0
    extra = 0
    for ref, cand in zip(r.chunks(), c.chunks()):
        if cand.dtype.kind not in "fc":
            return 0
        cn = ~np.isfinite(cand)
        if ref.dtype.kind in "fc":
            cn &= np.isfinite(ref)
        extra += int(np.count_nonzero(cn))
    return extra


def _all_zero(leaf: _Leaf) -> bool:
    return all(not np.any(chunk) for chunk in leaf.chunks())


def _check_pair(
    r: _Leaf,
    c: _Leaf,
    ref_aliases: bool,
    cand_in_mem: list[tuple[str, int, int] | None],
    input_digests: list[bytes],
    ref_out_all: list[_Leaf],
    atol: float | None,
    rtol: float | None,
) -> tuple[float, float]:
    # 1. the reference's own object or memory handed back
    arrays = ("tensor", "ndarray")
    if c.kind in arrays and any(c.obj is x.obj or _overlaps(c.mem, x.mem) for x in ref_out_all if x.kind in arrays):
        raise _Fail(f"{c.path}: candidate returned the reference's own output object (same memory)", c.path)
    # 2. shape and dtype
    if r.kind in arrays or c.kind in arrays:
        if r.kind != c.kind:
            raise _Fail(f"{c.path}: expected a {r.kind}, got a {c.kind} ({c.dtype})", c.path)
        if r.shape != c.shape:
            raise _Fail(f"{c.path}: shape {list(c.shape)} != expected {list(r.shape)}", c.path)
        if r.dtype != c.dtype:
            raise _Fail(f"{c.path}: dtype {c.dtype} != expected {r.dtype}", c.path)
    # 3. an input handed back (its memory, or a copy of its values) where the reference computes
    if not ref_aliases and any(_overlaps(c.mem, m) for m in cand_in_mem):
        raise _Fail(f"{c.path}: output shares memory with an input (the reference's does not)", c.path)
    if c.kind in arrays and c.size > 0 and c.digest() in input_digests and r.digest() != c.digest():
        try:
            return compare_leaves(r, c, None, None)  # the reference is (nearly) that input: fine
        except _Fail:
            raise _Fail(f"{c.path}: output equals an input unchanged (the reference's does not)", c.path) from None
    # 4. NaN/inf the reference does not have
    extra = _extra_nonfinite(r, c)
    if extra:
        raise _Fail(f"{c.path}: {extra} NaN/inf values where the reference has finite ones", c.path)
    # 5. all zeros where the reference is not
    if c.kind != "scalar" and c.comparable and r.comparable and c.size > 0 and _all_zero(c) and not _all_zero(r):
        raise _Fail(f"{c.path}: output is all zeros (the reference's is not)", c.path)
    # 6. values
    return compare_leaves(r, c, atol, rtol)


def check_outputs(
    ref_fn: Callable[..., Any],
    cand_fn: Callable[..., Any],
    make_inputs: Callable[[int], Any],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    atol: float | None = None,
    rtol: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> CorrectnessReport:
    """Run reference and candidate on fresh inputs for every seed and compare; see module doc.

    ``atol``/``rtol`` of ``None`` pick per-dtype defaults (``default_tolerance``). The first
    failing check ends the report with ``ok=False`` and a one-line reason. ``progress`` is told
    about each seed as it starts (the bench prints it, so a slow check says where it is).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("check_outputs needs at least one seed")
    max_abs = max_rel = 0.0
    checked: list[int] = []
    prev_ref: list[bytes] | None = None
    prev_cand: list[bytes] | None = None
    for index, seed in enumerate(seeds):
        if progress is not None:
            progress(f"correctness trial {index + 1}/{len(seeds)} (seed {seed})")
        ref_inputs = cand_inputs = ref_out = cand_out = None
        try:
            # The reference first, on its own inputs; only their digests and addresses are kept.
            ref_inputs = make_inputs(seed)
            ref_in = list(_leaves(_structure(ref_inputs, "input")))
            in_digests = _digests(ref_in)
            ref_out = _call(ref_fn, ref_inputs, "reference")
            ref_s = _structure(ref_out)
            ref_leaves = list(_leaves(ref_s))
            ref_in_mem = [leaf.mem for leaf in _leaves(_structure(ref_inputs, "input"))]
            aliases = {id(r): any(_overlaps(r.mem, m) for m in ref_in_mem) for r in ref_leaves}
            del ref_in
            ref_inputs = None
            # Then the candidate, on a fresh set made from the same seed.
            cand_inputs = make_inputs(seed)
            cand_in = list(_leaves(_structure(cand_inputs, "input")))
            if _digests(cand_in) != in_digests:
                raise _Fail(f"make_inputs({seed}) is not deterministic: two calls gave different inputs")
            del cand_in
            cand_out = _call(cand_fn, cand_inputs, "candidate")
            cand_s = _structure(cand_out)
            cand_leaves = list(_leaves(cand_s))
            if cand_out is ref_out and isinstance(ref_out, (list, dict, tuple)) and ref_leaves:
                raise _Fail("candidate returned the reference's own output object")
            ref_digests = _digests(ref_leaves)
            cand_digests = _digests(cand_leaves)
            # the same answer for different inputs: a cache, not a computation
            if prev_ref is not None and prev_cand is not None:
                if ref_digests != prev_ref and cand_digests == prev_cand:
                    raise _Fail(
                        f"candidate returned the same output for different inputs (seed {seed} "
                        "vs the previous seed) although the reference's changed: cached result?"
                    )
            cand_in_mem = [leaf.mem for leaf in _leaves(_structure(cand_inputs, "input"))]
            for r, c in _pairs(ref_s, cand_s):
                a, rel = _check_pair(r, c, aliases.get(id(r), False), cand_in_mem, in_digests, ref_leaves,
                                     atol, rtol)
                max_abs, max_rel = max(max_abs, a), max(max_rel, rel)
        except _Fail as fail:
            return CorrectnessReport(False, fail.reason, max_abs, max_rel, checked, seed, fail.where)
        checked.append(seed)
        prev_ref, prev_cand = ref_digests, cand_digests
        # free this seed's tensors before the next seed's are made
        del ref_s, cand_s, ref_leaves, cand_leaves
        ref_inputs = cand_inputs = ref_out = cand_out = None
    note = "" if len(seeds) > 1 else " (one seed: cached-output check skipped)"
    return CorrectnessReport(
        True,
        f"outputs match on {len(checked)} seed{'s' if len(checked) != 1 else ''} "
        f"(max abs err {max_abs:.3g}){note}",
        max_abs,
        max_rel,
        checked,
    )
