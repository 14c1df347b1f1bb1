"""Config inheritance (`extends`), overlays and provenance: the rules `looptree ab` relies on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from looptree.engine.cli import main
from looptree.engine.core.config import load_config, resolve_config
from looptree.engine.errors import ConfigError

BASE = f"""\
[project]
goal = "base goal"
writable = ["a.py"]

[bench]
command = "{sys.executable} bench.py"
repeats = 5

[agent]
model = "base-model"
temperature = 0.3

[search]
num_samples = 3
"""


def project(tmp_path: Path, text: str, name: str = "proj") -> Path:
    root = tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.py").write_text("x = 1\n")
    (root / "looptree.toml").write_text(text)
    return root


def test_chain_merges_table_by_table_arrays_replace_and_cli_comes_last(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "base.toml").write_text(BASE)
    (shared / "mid.toml").write_text('extends = "base.toml"\n[agent]\nmodel = "mid-model"\n[project]\nreadonly = ["r1", "r2"]\n')
    root = project(tmp_path, 'extends = "../shared/mid.toml"\n[project]\nreadonly = ["r3"]\n[search]\nnum_phases = 7\n')
    resolved = resolve_config(root, None, ["search.num_phases=9", "agent.temperature=0.9"])
    cfg = resolved.config
    assert cfg.project.goal == "base goal"  # from the grandparent
    assert cfg.project.readonly == ["r3"]  # arrays replace, they do not concatenate
    assert cfg.agent.model == "mid-model" and cfg.search.num_samples == 3
    assert cfg.search.num_phases == 9 and cfg.agent.temperature == 0.9  # KEY=VALUE last
    src = resolved.sources
    assert src["project.goal"].endswith("shared/base.toml")
    assert src["agent.model"].endswith("shared/mid.toml")
    assert src["project.readonly"].endswith("proj/looptree.toml")
    assert src["search.num_phases"].startswith("command line")
    assert "agent.max_tokens" not in src  # a default


def test_extends_cycle_and_missing_parent_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "./a.toml"\n')
    root = project(tmp_path, 'extends = "../a.toml"\n')
    with pytest.raises(ConfigError, match=r"extends cycle: a.toml -> b.toml -> a.toml"):
        load_config(root)
    (tmp_path / "b.toml").write_text('extends = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match=r"no config file .*nowhere.toml \(extended by b.toml\)"):
        load_config(root)
    (tmp_path / "b.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="extends must be a path"):
        load_config(root)


def test_paths_in_a_parent_are_relative_to_the_parent(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "prompts").mkdir(parents=True)
    (shared / "prompts" / "system.md").write_text("be brief")
    (shared / "base.toml").write_text(BASE + '\n[prompts]\nsystem = "prompts/system.md"\n')
    root = project(tmp_path, 'extends = "../shared/base.toml"\n[prompts]\nfix = "mine.md"\n')
    cfg = load_config(root)
    assert cfg.prompts.system == str((shared / "prompts" / "system.md").resolve())
    assert cfg.prompts.fix == "mine.md"  # the project's own file keeps project-relative paths


def test_experiment_table_is_accepted_and_kept_out_of_the_run_config(tmp_path: Path) -> None:
    root = project(tmp_path, BASE + "\n[experiment]\nalpha = 0.1\nmax_pairs = 4\n")
    resolved = resolve_config(root, None, ["experiment.max_tokens=2e6"])
    assert "experiment" not in resolved.config.to_dict()
    assert (resolved.experiment.alpha, resolved.experiment.max_pairs, resolved.experiment.max_tokens) == (0.1, 4, 2_000_000)
    assert resolved.experiment.beta == 0.10 and resolved.experiment.min_effect == 0.15
    (root / "looptree.toml").write_text(BASE + "\n[experiment]\nalfa = 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'experiment.alfa'"):
        load_config(root)


def test_overlays_may_not_touch_project_or_bench(tmp_path: Path) -> None:
    root = project(tmp_path, BASE)
    overlay = tmp_path / "arm.toml"
    overlay.write_text('[agent]\nmodel = "arm-model"\n[search]\nnum_samples = 8\n')
    resolved = resolve_config(root, None, [], layers=[overlay], forbid_in_layers=("project", "bench"))
    assert resolved.config.agent.model == "arm-model" and resolved.config.agent.temperature == 0.3
    assert resolved.sources["agent.model"] == str(overlay.resolve())
    overlay.write_text('[prompts]\nsystem = "arm_system.md"\n')  # an overlay serves many projects
    resolved = resolve_config(root, None, [], layers=[overlay], forbid_in_layers=("project", "bench"))
    assert resolved.config.prompts.system == str(tmp_path.resolve() / "arm_system.md")
    for table in ("project", "bench"):
        overlay.write_text(f'[{table}]\ngoal = "x"\n')
        with pytest.raises(ConfigError, match=rf"arm.toml: \[{table}\] cannot be overlaid"):
            resolve_config(root, None, [], layers=[overlay], forbid_in_layers=("project", "bench"))


def test_config_command_prints_each_value_with_its_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.toml").write_text(BASE)
    root = project(tmp_path, 'extends = "../base.toml"\n[search]\nnum_phases = 5\n')
    assert main(["config", str(root), "agent.model=cli-model"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(" =")[0]: line for line in out.splitlines() if " = " in line}
    assert lines["num_phases"].endswith(f"# {root / 'looptree.toml'}")
    assert lines["num_samples"].endswith(f"# {tmp_path / 'base.toml'}")
    assert lines["model"].endswith("# command line (agent.model=cli-model)")
    assert lines["max_fix_attempts"].endswith("# default")


def test_ab_refuses_a_bench_overlay_before_running_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = tmp_path / "suite"
    project(suite, BASE, "t1")
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[agent]\nmodel = "m"\n')
    bad.write_text("[bench]\nrepeats = 9\n")
    code = main(["ab", "--control", str(good), "--test", str(bad), "--suite", str(suite), "--out", str(tmp_path / "x")])
    assert code == 2
    assert "bad.toml: [bench] cannot be overlaid" in capsys.readouterr().err
    assert not (suite / "t1" / ".looptree").exists()
    bad.write_text("[experiment]\nalpha = 0.2\n")
    good.write_text("[experiment]\nalpha = 0.1\n")
    assert main(["ab", "--control", str(good), "--test", str(bad), "--suite", str(suite), "--out", str(tmp_path / "y")]) == 2
    assert "experiment.alpha differs" in capsys.readouterr().err
