"""The event schema: one definition per event type, checked on write, described once, documented.

The suite runs with LOOPTREE_STRICT_EVENTS=1 (conftest), so every event any test makes the engine
write is validated against its class; these tests cover the schema's own rules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from looptree.engine.core.schema import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    EventSchemaError,
    check,
    describe,
    markdown_table,
)
from looptree.engine.core.state import RunState

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "eng_run2_events.jsonl"


def test_every_type_has_a_description_and_a_doc_line() -> None:
    for name, cls in EVENT_TYPES.items():
        assert cls.DOC, name
        example = {"type": name, **{f: None for f in cls.model_fields}}
        assert describe(example) is None or describe(example).text  # never raises on sparse events


def test_check_refuses_unknown_types_fields_and_wrong_types(monkeypatch) -> None:
    monkeypatch.delenv("LOOPTREE_STRICT_EVENTS", raising=False)
    assert check("node_failed", {"id": "1.1", "stage": "build", "reason": "boom"}) is None
    assert "unknown event type" in check("node_exploded", {})
    assert "surprise" in check("node_failed", {"id": "1.1", "stage": "build", "reason": "x", "surprise": 1})
    assert "reason" in check("node_failed", {"id": "1.1", "stage": "build"})
    assert "ok" in check("stage_finished", {"id": "1", "stage": "bench", "ok": "maybe"})
    monkeypatch.setenv("LOOPTREE_STRICT_EVENTS", "1")
    with pytest.raises(EventSchemaError, match="unknown event type"):
        check("node_exploded", {})


def test_every_emitted_type_in_the_code_is_defined() -> None:
    """A literal `emit("x", …)` anywhere in the engine names a type the schema defines."""
    missing = []
    for path in sorted((ROOT / "engine").rglob("*.py")) + sorted((ROOT / "gpu").rglob("*.py")):
        if "experiments" in path.parts:  # an experiment's own log has its own vocabulary
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
                    and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "emit"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value not in EVENT_TYPES):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.args[0].value}")
    assert not missing, missing


def test_the_architecture_table_is_the_schema() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    match = re.search(r"<!-- events-table -->\n(.*?)\n<!-- /events-table -->", text, re.S)
    assert match, "docs/ARCHITECTURE.md lost its generated events table markers"
    assert match.group(1).strip() == markdown_table().strip(), (
        "regenerate the table: python -m looptree.engine.core.schema")


def test_the_fold_counts_types_it_does_not_know_and_describe_names_them() -> None:
    state = RunState.from_events([
        {"seq": 0, "ts": 1.0, "type": "run_started", "run": 1, "config": {}, "schema_version": SCHEMA_VERSION},
        {"seq": 1, "ts": 2.0, "type": "quantum_leap", "id": "1"},
        {"seq": 2, "ts": 3.0, "type": "quantum_leap", "id": "1"},
    ])
    assert state.unknown_types == {"quantum_leap": 2}
    assert state.schema_version == SCHEMA_VERSION
    line = describe({"type": "quantum_leap"})
    assert line is not None and "unknown event 'quantum_leap'" in line.text


def test_a_version_1_run_directory_still_folds_and_describes() -> None:
    """The fixture was written before the schema had a version (and with GPU samples inline)."""
    events = [line for line in FIXTURE.read_text().splitlines() if line.strip()]
    import json

    state = RunState()
    for raw in events:
        event = json.loads(raw)
        state.apply(event)
        describe(event, state)
    assert state.schema_version == 1 and state.run == 2 and state.unknown_types == {}
    assert state.nodes and state.finished
