"""Is the candidate's output really the reference's output, computed honestly?

Why so many guards: an optimizing agent is rewarded for speed, and the cheapest "speed-ups" are
not computing at all: returning a cached result, zeros, an input, or the reference's own tensor.
Each such shortcut is caught here with a reason a person can act on. Every trial uses fresh
inputs from ``make_inputs(seed)`` (a new seed per trial, and a separate copy for the candidate
so it never sees the reference's tensors).

Conventions: ``make_inputs(seed)`` returns a tuple or list of positional arguments (anything
else is passed as the single argument) and must be deterministic in ``seed``. Outputs may be
torch tensors (any device), numpy arrays, Python/numpy scalars, ``None``, or tuples/lists/dicts
of these. torch is never imported here: a value is a tensor only if torch is already loaded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

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


@dataclass
class _Leaf:
    """One array-like value, normalized: a float64/complex128/int/bool numpy copy on the host."""

    path: str
    obj: Any
    kind: str  # "tensor" | "ndarray" | "scalar" | "none" | "other"
    dtype: str
    shape: tuple[int, ...]
    values: np.ndarray | None
    mem: tuple[str, int, int] | None  # (device, start, end) of the backing memory


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _tensor_values(t: Any) -> np.ndarray:
    torch = sys.modules["torch"]
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    t = t.to("cpu")
    if t.is_complex():
        return t.to(torch.complex128).numpy().copy()
    if t.is_floating_point():
        return t.to(torch.float64).numpy().copy()
    if t.dtype == torch.bool:
        return t.numpy().copy()
    return t.to(torch.int64).numpy().copy()


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
        return _Leaf(path, x, "tensor", str(x.dtype).replace("torch.", ""), tuple(x.shape), _tensor_values(x), _tensor_mem(x))
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "fc":
            vals = x.astype(np.complex128 if x.dtype.kind == "c" else np.float64, copy=True)
        elif x.dtype.kind in "iub":
            vals = x.astype(np.bool_ if x.dtype.kind == "b" else np.int64, copy=True)
        else:
            vals = None
        return _Leaf(path, x, "ndarray", str(x.dtype), x.shape, vals, _array_mem(x))
    if x is None:
        return _Leaf(path, x, "none", "none", (), None, None)
    if isinstance(x, (bool, np.bool_)):
        return _Leaf(path, x, "scalar", "bool", (), np.array(bool(x)), None)
    if isinstance(x, (int, np.integer)):
        return _Leaf(path, x, "scalar", "int", (), np.array(int(x), dtype=np.int64), None)
    if isinstance(x, (float, np.floating)):
        name = "float" if isinstance(x, float) else str(np.asarray(x).dtype)
        return _Leaf(path, x, "scalar", name, (), np.array(float(x), dtype=np.float64), None)
    if isinstance(x, (complex, np.complexfloating)):
        return _Leaf(path, x, "scalar", "complex128", (), np.array(complex(x)), None)
    return _Leaf(path, x, "other", type(x).__name__, (), None, None)


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


def _exactly_equal(a: _Leaf, b: _Leaf) -> bool:
    if a.values is None or b.values is None:
        return a.kind == b.kind == "none"
    if a.values.shape != b.values.shape:
        return False
    return bool(np.array_equal(a.values, b.values, equal_nan=a.values.dtype.kind in "fc"))


def _all_equal(xs: list[_Leaf], ys: list[_Leaf]) -> bool:
    return len(xs) == len(ys) and all(_exactly_equal(x, y) for x, y in zip(xs, ys))


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


def _compare_values(r: _Leaf, c: _Leaf, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """Returns (max abs err, max rel err); raises ``_Fail`` on a mismatch."""
    if r.values is None or c.values is None:
        if r.kind == "none" and c.kind == "none":
            return 0.0, 0.0
        if r.kind == "other" and c.kind == "other":
            if r.obj == c.obj:
                return 0.0, 0.0
            raise _Fail(f"{c.path}: value differs ({c.obj!r} vs expected {r.obj!r})", c.path)
        raise _Fail(f"{c.path}: expected {r.kind} {r.dtype}, got {c.kind} {c.dtype}", c.path)
    ref, cand = r.values, c.values
    d_atol, d_rtol = default_tolerance(r.dtype)
    a = d_atol if atol is None else atol
    t = d_rtol if rtol is None else rtol
    if ref.size == 0:
        return 0.0, 0.0
    if ref.shape != cand.shape:
        raise _Fail(f"{c.path}: shape {list(cand.shape)} != expected {list(ref.shape)}", c.path)
    if ref.dtype.kind in "biu" and cand.dtype.kind in "biu" and a == 0 and t == 0:
        diff = np.abs(ref.astype(np.int64) - cand.astype(np.int64))
        bad = diff != 0
        abs_err = float(diff.max())
        rel_err = float((diff / np.maximum(np.abs(ref.astype(np.float64)), 1e-300)).max())
    else:
        as_complex = ref.dtype.kind == "c" or cand.dtype.kind == "c"
        rf = ref.astype(np.complex128 if as_complex else np.float64)
        cf = cand.astype(rf.dtype)
        both_nan = np.isnan(rf) & np.isnan(cf)
        same_inf = np.isinf(rf) & (rf == cf)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(rf - cf)
            diff = np.where(both_nan | same_inf, 0.0, diff)
            bad = ~(diff <= a + t * np.abs(rf))  # NaN in diff counts as bad
            bad &= ~(both_nan | same_inf)
            finite = np.isfinite(diff)
            abs_err = float(diff[finite].max()) if finite.any() else 0.0
            rel = diff / np.maximum(np.abs(rf), np.finfo(np.float64).tiny)
            rel_err = float(rel[np.isfinite(rel)].max()) if np.isfinite(rel).any() else 0.0
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        flat = int(np.flatnonzero(bad)[0])
        pos = np.unravel_index(flat, ref.shape) if ref.shape else ()
        raise _Fail(
            f"{c.path}: {n_bad} of {ref.size} values differ beyond atol={a:g}, rtol={t:g} "
            f"(max abs err {abs_err:.3g}; first at {tuple(int(p) for p in pos)}: "
            f"got {cand.flat[flat]!r}, expected {ref.flat[flat]!r})",
            c.path,
        )
    return abs_err, rel_err


def _nonfinite(leaf: _Leaf) -> np.ndarray | None:
    v = leaf.values
    if v is None or v.dtype.kind not in "fc":
        return None
    return ~np.isfinite(v)


def _check_pair(
    r: _Leaf,
    c: _Leaf,
    ref_in: list[_Leaf],
    cand_in: list[_Leaf],
    pristine_in: list[_Leaf],
    ref_out_all: list[_Leaf],
    atol: float | None,
    rtol: float | None,
) -> tuple[float, float]:
    # 1. the reference's own object or memory handed back
    arrays = ("tensor", "ndarray")
    if c.kind in arrays and any(c.obj is x.obj or _overlaps(c.mem, x.mem) for x in ref_out_all if x.kind in arrays):
        raise _Fail(f"{c.path}: candidate returned the reference's own output object (same memory)", c.path)
    # 2. shape and dtype
    if r.kind in ("tensor", "ndarray") or c.kind in ("tensor", "ndarray"):
        if r.kind != c.kind:
            raise _Fail(f"{c.path}: expected a {r.kind}, got a {c.kind} ({c.dtype})", c.path)
        if r.shape != c.shape:
            raise _Fail(f"{c.path}: shape {list(c.shape)} != expected {list(r.shape)}", c.path)
        if r.dtype != c.dtype:
            raise _Fail(f"{c.path}: dtype {c.dtype} != expected {r.dtype}", c.path)
    # 3. an input handed back (its memory, or a copy of its values) where the reference computes
    ref_aliases = any(_overlaps(r.mem, x.mem) for x in ref_in)
    if not ref_aliases and any(_overlaps(c.mem, x.mem) for x in cand_in):
        raise _Fail(f"{c.path}: output shares memory with an input (the reference's does not)", c.path)
    if c.values is not None and c.values.size > 0:
        for x in pristine_in:
            if _exactly_equal(c, x) and not _exactly_equal(r, x) and not _close(r, x):
                raise _Fail(f"{c.path}: output equals an input unchanged (the reference's does not)", c.path)
    # 4. NaN/inf the reference does not have
    cn, rn = _nonfinite(c), _nonfinite(r)
    if cn is not None and (rn is None or rn.shape == cn.shape):
        extra = cn if rn is None else cn & ~rn
        if extra.any():
            raise _Fail(f"{c.path}: {int(extra.sum())} NaN/inf values where the reference has finite ones", c.path)
    # 5. all zeros where the reference is not
    if (
        c.values is not None
        and r.values is not None
        and c.values.size > 0
        and not np.any(c.values)
        and np.any(r.values)
        and c.kind != "scalar"
    ):
        raise _Fail(f"{c.path}: output is all zeros (the reference's is not)", c.path)
    # 6. values
    return _compare_values(r, c, atol, rtol)


def _close(a: _Leaf, b: _Leaf) -> bool:
    if a.values is None or b.values is None or a.values.shape != b.values.shape:
        return False
    try:
        _compare_values(a, b, None, None)
    except _Fail:
        return False
    return True


def check_outputs(
    ref_fn: Callable[..., Any],
    cand_fn: Callable[..., Any],
    make_inputs: Callable[[int], Any],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    atol: float | None = None,
    rtol: float | None = None,
) -> CorrectnessReport:
    """Run reference and candidate on fresh inputs for every seed and compare; see module doc.

    ``atol``/``rtol`` of ``None`` pick per-dtype defaults (``default_tolerance``). The first
    failing check ends the report with ``ok=False`` and a one-line reason.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("check_outputs needs at least one seed")
    max_abs = max_rel = 0.0
    checked: list[int] = []
    prev_ref: list[_Leaf] | None = None
    prev_cand: list[_Leaf] | None = None
    for seed in seeds:
        try:
            ref_inputs = make_inputs(seed)
            cand_inputs = make_inputs(seed)
            pristine = _structure(make_inputs(seed), "input")
            ref_in = list(_leaves(_structure(ref_inputs, "input")))
            cand_in = list(_leaves(_structure(cand_inputs, "input")))
            pristine_in = list(_leaves(pristine))
            if not (_all_equal(ref_in, pristine_in) and _all_equal(cand_in, pristine_in)):
                raise _Fail(f"make_inputs({seed}) is not deterministic: two calls gave different inputs")
            ref_out = _call(ref_fn, ref_inputs, "reference")
            ref_s = _structure(ref_out)
            cand_out = _call(cand_fn, cand_inputs, "candidate")
            cand_s = _structure(cand_out)
            ref_leaves = list(_leaves(ref_s))
            cand_leaves = list(_leaves(cand_s))
            if cand_out is ref_out and isinstance(ref_out, (list, dict, tuple)) and ref_leaves:
                raise _Fail("candidate returned the reference's own output object")
            # the same answer for different inputs: a cache, not a computation
            if prev_ref is not None and prev_cand is not None:
                if not _all_equal(ref_leaves, prev_ref) and _all_equal(cand_leaves, prev_cand):
                    raise _Fail(
                        f"candidate returned the same output for different inputs (seed {seed} "
                        "vs the previous seed) although the reference's changed: cached result?"
                    )
            ref_in_now = list(_leaves(_structure(ref_inputs, "input")))
            cand_in_now = list(_leaves(_structure(cand_inputs, "input")))
            for r, c in _pairs(ref_s, cand_s):
                a, rel = _check_pair(r, c, ref_in_now, cand_in_now, pristine_in, ref_leaves, atol, rtol)
                max_abs, max_rel = max(max_abs, a), max(max_rel, rel)
        except _Fail as fail:
            return CorrectnessReport(False, fail.reason, max_abs, max_rel, checked, seed, fail.where)
        checked.append(seed)
        prev_ref, prev_cand = ref_leaves, cand_leaves
        del ref_out, cand_out
    note = "" if len(seeds) > 1 else " (one seed: cached-output check skipped)"
    return CorrectnessReport(
        True,
        f"outputs match on {len(checked)} seed{'s' if len(checked) != 1 else ''} "
        f"(max abs err {max_abs:.3g}){note}",
        max_abs,
        max_rel,
        checked,
    )
