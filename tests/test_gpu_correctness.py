"""Correctness: an honest candidate passes; every shortcut an agent might take is caught."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from looptree.gpu.bench.correctness import check_outputs, default_tolerance  # noqa: E402


def make_inputs(seed: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 16, generator=g), torch.randn(16, 4, generator=g)


def ref(a: Any, b: Any) -> Any:
    return torch.relu(a @ b)


def test_correct_candidate_passes() -> None:
    def cand(a: Any, b: Any) -> Any:
        return torch.clamp((a.double() @ b.double()).float(), min=0)  # different algorithm, same result

    rep = check_outputs(ref, cand, make_inputs)
    assert rep.ok, rep.reason
    assert rep.seeds_checked == [0, 1, 2, 3, 4]
    assert 0 <= rep.max_abs_err < 1e-4
    assert "5 seeds" in rep.reason


def test_candidate_gets_its_own_fresh_inputs() -> None:
    # Hold the reference's tensors themselves, not their id()s: a freed tensor's id can be reused
    # by the next allocation, which made an id-based check fail by chance.
    seen: list[Any] = []

    def ref_spy(a: Any, b: Any) -> Any:
        seen.append(a)
        return ref(a, b)

    def cand(a: Any, b: Any) -> Any:
        assert all(a is not x for x in seen)  # never the reference's tensors
        out = ref(a, b)
        a.zero_()  # scribbling on its own inputs cannot corrupt the reference's
        return out

    assert check_outputs(ref_spy, cand, make_inputs).ok


def test_wrong_values_fail_with_location() -> None:
    rep = check_outputs(ref, lambda a, b: ref(a, b) * 1.01, make_inputs)
    assert not rep.ok and rep.failed_seed == 0
    assert "differ beyond atol=0.0001, rtol=0.0001" in rep.reason and rep.failed_output == "out"


def test_cached_output_is_caught() -> None:
    cache: dict[str, Any] = {}

    def cand(a: Any, b: Any) -> Any:
        if "out" not in cache:
            cache["out"] = ref(a, b)
        return cache["out"].clone()

    rep = check_outputs(ref, cand, make_inputs)
    assert not rep.ok
    assert rep.failed_seed == 1 and "same output for different inputs" in rep.reason


def test_all_zeros_is_caught() -> None:
    rep = check_outputs(ref, lambda a, b: torch.zeros(8, 4), make_inputs)
    assert not rep.ok and "all zeros" in rep.reason


def test_returning_an_input_is_caught() -> None:
    def same(seed: int) -> tuple[Any, Any]:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)

    def ref_add(a: Any, b: Any) -> Any:
        return a + b

    rep = check_outputs(ref_add, lambda a, b: a, same)
    assert not rep.ok and "shares memory with an input" in rep.reason
    rep = check_outputs(ref_add, lambda a, b: b.clone(), same)
    assert not rep.ok and "equals an input unchanged" in rep.reason
    # but an identity reference may return its input, and so may the candidate
    assert check_outputs(lambda a, b: a, lambda a, b: a, same).ok


def test_returning_the_references_own_output_is_caught() -> None:
    last: dict[str, Any] = {}

    def ref_keep(a: Any, b: Any) -> Any:
        last["out"] = ref(a, b)
        return last["out"]

    rep = check_outputs(ref_keep, lambda a, b: last["out"], make_inputs)
    assert not rep.ok and "reference's own output" in rep.reason
    rep = check_outputs(ref_keep, lambda a, b: last["out"].view(8, 4), make_inputs)  # a view, same storage
    assert not rep.ok and "reference's own output" in rep.reason


def test_nan_is_caught_but_matching_nan_is_fine() -> None:
    def cand(a: Any, b: Any) -> Any:
        out = ref(a, b)
        out[0, 0] = float("nan")
        return out

    rep = check_outputs(ref, cand, make_inputs)
    assert not rep.ok and "NaN/inf" in rep.reason

    def ref_log(a: Any, b: Any) -> Any:
        return torch.log(a)  # NaN where a < 0, in both

    assert check_outputs(ref_log, lambda a, b: torch.log(a.clone()), make_inputs).ok


def test_wrong_shape_and_dtype_are_caught() -> None:
    rep = check_outputs(ref, lambda a, b: ref(a, b).reshape(4, 8), make_inputs)
    assert not rep.ok and "shape [4, 8] != expected [8, 4]" in rep.reason
    rep = check_outputs(ref, lambda a, b: ref(a, b).double(), make_inputs)
    assert not rep.ok and "dtype float64 != expected float32" in rep.reason


def test_nested_outputs_compared_elementwise() -> None:
    def ref2(a: Any, b: Any) -> Any:
        m = a @ b
        return m, [m.sum(), {"max": m.max()}]

    def good(a: Any, b: Any) -> Any:
        m = a @ b
        return (m.clone(), [m.sum(), {"max": m.max()}])

    def bad(a: Any, b: Any) -> Any:
        m = a @ b
        return (m.clone(), [m.sum() + 1, {"max": m.max()}])

    assert check_outputs(ref2, good, make_inputs).ok
    rep = check_outputs(ref2, bad, make_inputs)
    assert not rep.ok and rep.failed_output == "out[1][0]"
    rep = check_outputs(ref2, lambda a, b: (a @ b,), make_inputs)
    assert not rep.ok and "expected 2 outputs, got 1" in rep.reason


def test_candidate_crash_is_a_failed_report() -> None:
    def cand(a: Any, b: Any) -> Any:
        raise RuntimeError("CUDA error: illegal memory access")

    rep = check_outputs(ref, cand, make_inputs)
    assert not rep.ok and rep.reason.startswith("candidate raised RuntimeError: CUDA error")


def test_nondeterministic_make_inputs_is_reported() -> None:
    rep = check_outputs(ref, ref, lambda seed: (torch.randn(8, 16), torch.randn(16, 4)))
    assert not rep.ok and "not deterministic" in rep.reason


def test_dtype_aware_tolerances() -> None:
    assert default_tolerance("float16") == (1e-2, 1e-2)
    assert default_tolerance("bfloat16") == (1e-2, 1e-2)
    assert default_tolerance("float32") == (1e-4, 1e-4)
    assert default_tolerance("int64") == (0.0, 0.0)
    assert default_tolerance("bool") == (0.0, 0.0)

    def half_inputs(seed: int) -> tuple[Any, Any]:
        a, b = make_inputs(seed)
        return a.half(), b.half()

    # fp16 result via an fp32 matmul rounded back: within fp16 tolerance
    rep = check_outputs(lambda a, b: a @ b, lambda a, b: (a.float() @ b.float()).half(), half_inputs)
    assert rep.ok, rep.reason

    def int_inputs(seed: int) -> tuple[Any]:
        return (torch.arange(10) + seed,)

    rep = check_outputs(lambda x: x * 2, lambda x: x * 2 + (x == 5).long(), int_inputs)
    assert not rep.ok and "1 of 10 values differ" in rep.reason


def test_numpy_and_python_floats() -> None:
    def np_inputs(seed: int) -> tuple[Any]:
        return (np.random.default_rng(seed).standard_normal(32),)

    assert check_outputs(lambda x: np.sort(x), lambda x: np.sort(x.copy(), kind="stable"), np_inputs).ok
    rep = check_outputs(lambda x: np.sort(x), lambda x: x, np_inputs)
    assert not rep.ok and "shares memory with an input" in rep.reason
    assert check_outputs(lambda x: float(x.sum()), lambda x: float(np.sum(x[::-1])), np_inputs).ok
    rep = check_outputs(lambda x: float(x.sum()), lambda x: float(x.sum()) + 1e-3, np_inputs)
    assert not rep.ok
