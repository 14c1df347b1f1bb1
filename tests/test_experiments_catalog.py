"""The pure parts of the catalog and the Pareto front: `--where` matching and front marking."""

from __future__ import annotations

import pytest

from looptree.engine.errors import LooptreeError
from looptree.engine.experiments.catalog import filter_rows
from looptree.engine.experiments.pareto import mark_front

ROWS = [
    {"project": "/p/a", "run": 1, "arm": "test", "success": True, "tokens": 1000, "best_ratio": 2.0, "model": "m1"},
    {"project": "/p/b", "run": 2, "arm": "control", "success": False, "tokens": 3000, "best_ratio": 1.0, "model": "m2"},
    {"project": "/p/c", "run": 3, "arm": None, "success": False, "tokens": 500, "best_ratio": None, "model": "m1"},
]


def test_where_matches_text_booleans_numbers_and_comparisons() -> None:
    assert [r["run"] for r in filter_rows(ROWS, ["arm=test"])] == [1]
    assert [r["run"] for r in filter_rows(ROWS, ["success=false"])] == [2, 3]
    assert [r["run"] for r in filter_rows(ROWS, ["tokens>=1000", "model!=m2"])] == [1]
    assert [r["run"] for r in filter_rows(ROWS, ["best_ratio>1.5"])] == [1]
    assert [r["run"] for r in filter_rows(ROWS, ["run=3"])] == [3]
    with pytest.raises(LooptreeError, match="no column 'colour'"):
        filter_rows(ROWS, ["colour=red"])
    with pytest.raises(LooptreeError, match="is not KEY=VALUE"):
        filter_rows(ROWS, ["arm"])


def test_front_keeps_exactly_the_points_nothing_beats_on_both_axes() -> None:
    pts = [{"label": name, "cost": cost, "quality": quality} for name, cost, quality in
           [("cheap", 1, 1.0), ("mid", 2, 1.5), ("dominated", 3, 1.4), ("best", 4, 2.0), ("tie-dearer", 5, 2.0),
            ("unmeasured", 0, None)]]
    mark_front(pts)
    assert {p["label"] for p in pts if p.get("on_front")} == {"cheap", "mid", "best"}
