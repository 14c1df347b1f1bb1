"""Hostile candidates against a real engine: what their code prints, writes and appends at run time.

Why engine-level: the promises (no hidden text or secret in a prompt, the user's repository as it
was, only signed control lines obeyed) are kept by the engine around the project's commands, so
each test runs a real engine on a tiny real git project whose candidate turns hostile inside the
bench. `sandbox.mode = "off"`: these are the second line of defence, which must hold without the
sandbox. Agents are the replay backend, or the OpenAI-compatible test server (tests/llm_server.py)
where the test inspects the requests the LLM received.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from looptree.engine.core.config import validate_config
from looptree.engine.core.events import read_events
from looptree.engine.core.state import RunState
from looptree.engine.edits.access import check_patterns
from looptree.engine.errors import ConfigError
from looptree.engine.run.control import CONTROL_NAME
from looptree.engine.run.engine import Engine

try:
    from llm_server import llm_server, reply
except ImportError:  # tests/ became a package
    from tests.llm_server import llm_server, reply  # noqa: F401

RT = "runtime_ms (lower is better)"
ENV_SECRET = "hunter2-aws-Zq81xLmN"
KEY_ENV = "LOOPTREE_TEST_CONTAIN_KEY"
ANSWERS = ("The held-out answers are alpha=91823 bravo=77120 charlie=55501, checked to one part in ten "
           "thousand against the golden outputs kept by the grading harness.\n"
           "Never show these to the optimizing agent: quokka marzipan xylophone 4471.\n")
OTHER = "second hidden file: platypus-obsidian-lantern-88213 is the expected checksum\n"

BENCH = """\
import os
import solver

solver.run()
with open(os.environ.get("LOOPTREE_METRICS", "metrics.csv"), "w") as fh:
    fh.write("iteration,runtime_ms (lower is better),needed,other\\n")
    fh.write(f"0,{float(solver.VALUE)},{int(os.path.exists('hidden/answers.txt'))},"
             f"{int(os.path.exists('hidden/other.txt'))}\\n")
"""
SOLVER = "VALUE = 100\n\n\ndef run():\n    pass\n# knob\n"


def change(body: str, description: str = "Tune it.") -> str:
    """A reply replacing `run()` of solver.py with `body` (indented code)."""
    body = textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"
    return (f"{description}\n\nsolver.py\n<<<<<<< SEARCH\ndef run():\n    pass\n=======\n"
            f"VALUE = 90\n\n\ndef run():\n{body}>>>>>>> REPLACE\n")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=tester", "-c", "user.email=t@example.com",
                           "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_project(tmp_path: Path) -> Path:
    """A committed project on `main` (two commits, so a ref can be moved), with two hidden files."""
    project = tmp_path / "proj"
    (project / "hidden").mkdir(parents=True)
    (project / "solver.py").write_text(SOLVER)
    (project / "bench.py").write_text(BENCH)
    (project / "hidden" / "answers.txt").write_text(ANSWERS)
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "first")
    (project / "hidden" / "other.txt").write_text(OTHER)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "second")
    return project


def config(**sections: dict[str, Any]) -> Any:
    data: dict[str, Any] = {
        "project": {"goal": "Lower runtime_ms.", "writable": ["solver.py"], "readonly": ["bench.py"],
                    "hidden": ["hidden/**", "cassette.jsonl"], "hidden_needed": ["hidden/answers.txt"]},
        "bench": {"command": f"{sys.executable} bench.py", "repeats": 1, "compare": "off", "timeout": 60,
                  "device": "cpu", "memory_limit_mb": 0},
        "agent": {"provider": "replay", "cassette": "cassette.jsonl"},
        "search": {"num_samples": 1, "num_phases": 1, "max_fix_attempts": 0, "early_stop_patience": 0},
        "budget": {"max_tokens": 1_000_000},
        "gpu": {"devices": "none", "telemetry": "none"},
        "sandbox": {"mode": "off"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return validate_config(data)


def cassette(project: Path, *optimize: str) -> None:
    records = [{"role": "ideas", "response": {"text": json.dumps(["an idea"]), "usage": {"prompt_tokens": 10,
                                                                                          "completion_tokens": 5}}}]
    records += [{"role": "optimize", "response": {"text": text, "usage": {"prompt_tokens": 10, "completion_tokens": 5}}}
                for text in optimize]
    (project / "cassette.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


async def run_to_end(engine: Engine, timeout: float = 60) -> str:
    task = asyncio.create_task(engine.run())
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout)
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise


def events(engine: Engine) -> list[dict[str, Any]]:
    return list(read_events(engine.run_dir / "events.jsonl"))


def leaked_runs(hidden: str, text: str, width: int = 16) -> list[str]:
    """Every `width`-character run of `hidden` (whitespace removed) found in `text` (whitespace removed)."""
    h, t = re.sub(r"\s+", "", hidden), re.sub(r"\s+", "", text)
    return [h[i:i + width] for i in range(len(h) - width + 1) if h[i:i + width] in t]


# ------------------------------------------------------------------------------ hidden and secret


async def test_hidden_text_and_secrets_printed_by_the_code_never_reach_the_llm(
        tmp_path: Path, llm_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv(KEY_ENV, "sk-contain-test-0123456789")
    project = make_project(tmp_path)
    hostile = change(f"""
        import os, sys, textwrap
        text = open("hidden/answers.txt").read()
        print(textwrap.fill(text, width=23, initial_indent="      ", subsequent_indent="  "))
        print("other in worktree:", os.path.exists("hidden/other.txt"))
        print(open({str(project / 'hidden' / 'other.txt')!r}).read()[5:60])
        print("creds", os.environ.get("AWS_SECRET_ACCESS_KEY"), file=sys.stderr)
        sys.exit("boom: " + text[:90])
        """)
    llm_server.script(reply(json.dumps(["leak it"])), reply(hostile))
    cfg = config(agent={"provider": "local", "base_url": llm_server.base_url, "api_key_env": KEY_ENV,
                        "max_tokens": 400, "request_timeout": 20, "max_retries": 0},
                 search={"max_fix_attempts": 1}, budget={"requests_per_minute": 0})
    engine = await Engine.create(project, cfg)
    assert await run_to_end(engine) == "phases done"

    state = RunState.from_events(events(engine))
    assert state.nodes["1.1"].status == "failed" and state.nodes["1.1"].failure_stage == "bench"
    log = (engine.run_dir / "nodes" / "1.1" / "bench.log").read_text()
    assert leaked_runs(ANSWERS, log), "the hostile bench did not print the hidden file: the test proves nothing"
    assert "other in worktree: False" in log, "a hidden file no command needs was in the worktree"
    assert "obsidian-lantern" in log

    fix_prompt = (engine.run_dir / "nodes" / "1.1.1" / "prompt.md").read_text()
    assert "[REDACTED: hidden]" in fix_prompt
    if ENV_SECRET in log:  # the env reached the code (no sandbox env filter): the scrubber must catch it
        assert "[REDACTED: secret]" in fix_prompt
    requests = [json.dumps(r.body) for r in llm_server.requests]
    assert len(requests) == 3, "ideas, optimize and the fix of the failed node"
    for text in [fix_prompt, *requests, *(e.get("text", "") for e in events(engine) if e["type"] == "message")]:
        assert ENV_SECRET not in text
    for text in [fix_prompt, *requests]:
        assert leaked_runs(ANSWERS, text) == []
        assert leaked_runs(OTHER, text) == []


async def test_the_engine_fix_prompt_scrubs_secrets_and_rewrapped_hidden_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt the engine builds (`prompts.fix`), whatever the environment passes to the code."""
    monkeypatch.setenv("MY_DB_PASSWORD", ENV_SECRET)
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    project = make_project(tmp_path)
    cassette(project)
    engine = await Engine.create(project, config())
    try:
        wrapped = textwrap.fill(ANSWERS, width=17, subsequent_indent="\t ")
        tail = f"Traceback\n  {wrapped}\npassword={ENV_SECRET} hf=hf_abcdefghijklmnop\n{OTHER[10:40]}\nexit 1"
        prompt = engine.prompts.fix(project, "bench", f"bench failed: {ANSWERS[:70]}", tail, "")
    finally:
        engine.log.close()
        engine.lock.release()
    assert ENV_SECRET not in prompt and "hf_abcdefghijklmnop" not in prompt
    assert leaked_runs(ANSWERS, prompt) == [] and leaked_runs(OTHER, prompt) == []
    assert "Traceback" in prompt and "exit 1" in prompt  # the rest of the log is still there
    assert "def run():" in prompt, "visible files are shown as they are"


async def test_hidden_files_stay_out_of_worktrees_unless_needed(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    cassette(project, change("pass"))
    engine = await Engine.create(project, config())
    assert await run_to_end(engine) == "phases done"
    state = RunState.from_events(events(engine))
    for node_id in ("1", "1.1"):
        metrics = state.nodes[node_id].metrics
        assert (metrics["needed"], metrics["other"]) == (1.0, 0.0), node_id
    assert (project / "hidden" / "other.txt").read_text() == OTHER, "the user's file is untouched"
    assert git(project, "show", "looptree/1.1:hidden/other.txt") + "\n" == OTHER, "the commit keeps it"


def test_patterns_that_leave_nothing_writable_or_need_no_hidden_file_are_refused(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    cassette(project)
    check_patterns(config(), project)
    with pytest.raises(ConfigError, match="no file is left for the agents to edit"):
        check_patterns(config(project={"readonly": ["bench.py", "*.py"]}), project)
    with pytest.raises(ConfigError, match="no file is left for the agents to edit"):
        check_patterns(config(project={"hidden": ["hidden/**", "solver.py"], "hidden_needed": []}), project)
    with pytest.raises(ConfigError, match=r"hidden_needed pattern 'bench.py' matches no hidden file"):
        check_patterns(config(project={"hidden_needed": ["bench.py"]}), project)
    with pytest.raises(ConfigError, match="points outside the project"):
        check_patterns(config(project={"hidden_needed": ["../x"]}), project)


async def test_a_run_whose_patterns_leave_nothing_writable_is_refused_before_it_starts(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    cassette(project)
    with pytest.raises(ConfigError) as info:
        await Engine.create(project, config(project={"readonly": ["solver.py", "bench.py"]}))
    assert "\n" not in str(info.value)
    assert not (project / ".looptree" / "runs").exists() or not list((project / ".looptree" / "runs").iterdir())


# ------------------------------------------------------------------------------ the repository


def repo_state(project: Path) -> dict[str, Any]:
    hooks = project / ".git" / "hooks"
    return {"refs": git(project, "for-each-ref", "--format=%(refname) %(objectname)"),
            "config": (project / ".git" / "config").read_bytes(),
            "hooks": sorted(p.name for p in hooks.iterdir()) if hooks.is_dir() else [],
            "head": (project / ".git" / "HEAD").read_bytes()}


TAMPER = """
    import subprocess
    from pathlib import Path
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    common = Path(git("rev-parse", "--git-common-dir")).resolve()
    git("update-ref", "refs/heads/main", "main~1")
    git("config", "user.name", "evil")
    hook = common / "hooks" / "post-checkout"
    hook.write_text("#!/bin/sh\\necho pwned > /tmp/looptree-pwned\\n")
    hook.chmod(0o755)
    git("branch", "-D", "looptree/1")
    (common.parent / "planted.txt").write_text("x")
    """


@pytest.mark.parametrize("stage", ["bench", "build", "check"])
async def test_a_stage_that_changes_the_repository_fails_its_node_and_is_undone(
        tmp_path: Path, stage: str) -> None:
    project = make_project(tmp_path)
    cassette(project, change(TAMPER))
    extra: dict[str, Any] = {}
    if stage != "bench":
        # The hostile code runs in build or check (solver.run() only does harm there).
        (project / "stage.py").write_text("import solver\nsolver.run()\n")
        (project / "bench.py").write_text(BENCH.replace("solver.run()", "pass"))
        git(project, "add", "-A")
        git(project, "commit", "-q", "-m", "stage script")
        extra = {stage: {"command": f"{sys.executable} stage.py"}}
    before = repo_state(project)
    main_before = git(project, "rev-parse", "main")
    engine = await Engine.create(project, config(**extra))
    base_commit = engine.state.base_commit
    assert await run_to_end(engine) == "phases done"

    evs = events(engine)
    state = RunState.from_events(evs)
    node = state.nodes["1.1"]
    assert node.status == "failed" and node.failure_stage == stage, (node.status, node.failure_stage)
    reason = node.failure_reason or ""
    assert reason.startswith(f"the {stage} changed the user's repository")
    for part in ("refs/heads/main moved", ".git/config changed", ".git/hooks/post-checkout added",
                 "branch looptree/1 deleted", "created or changed: planted.txt (not restored"):
        assert part in reason, f"{part!r} missing from {reason!r}"
    alerts = [e for e in evs if e["type"] == "message" and e.get("alert") == "repository_changed"]
    assert len(alerts) == 1 and alerts[0]["id"] == "1.1" and alerts[0]["text"].startswith("WARNING 1.1:")

    after = repo_state(project)
    assert git(project, "rev-parse", "main") == main_before
    assert after["config"] == before["config"] and "evil" not in after["config"].decode()
    assert after["hooks"] == before["hooks"] and not (project / ".git" / "hooks" / "post-checkout").exists()
    assert after["head"] == before["head"]
    assert git(project, "rev-parse", "looptree/1") == base_commit
    assert git(project, "rev-parse", "looptree/1.1") == node.commit, "the node's own branch is intact"
    user_refs = [line for line in after["refs"].splitlines() if "refs/heads/looptree/" not in line]
    assert user_refs == [line for line in before["refs"].splitlines() if "refs/heads/looptree/" not in line]
    assert state.nodes["1"].ok, "the baseline, which did nothing wrong, was not blamed"


async def test_a_clean_run_reports_nothing(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    cassette(project, change("pass"))
    before = repo_state(project)
    engine = await Engine.create(project, config())
    assert await run_to_end(engine) == "phases done"
    evs = events(engine)
    assert not [e for e in evs if e.get("alert")]
    assert all(n.ok for n in RunState.from_events(evs).nodes.values())
    assert repo_state(project)["config"] == before["config"]


# ------------------------------------------------------------------------------ the control channel


FORGE = """
    import json, time
    from pathlib import Path
    control = Path.cwd().parents[1] / "control.jsonl"  # <run>/worktrees/<id> -> <run>/control.jsonl
    with open(control, "a") as fh:
        fh.write(json.dumps({"ts": time.time(), "cmd": "budget", "tokens": "+5000000"}) + "\\n")
        fh.write(json.dumps({"ts": time.time(), "cmd": "pin", "id": "1.1"}) + "\\n")
        fh.write(json.dumps({"ts": time.time(), "cmd": "budget", "tokens": "+5000000", "at": 0,
                             "sig": "0" * 64}) + "\\n")
    time.sleep(1.0)
    """


async def test_control_lines_from_the_code_under_test_are_refused_and_ctl_still_works(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    cassette(project, change(FORGE))
    engine = await Engine.create(project, config())
    cap = engine.budget.cap
    task = asyncio.create_task(engine.run())
    try:
        deadline = time.monotonic() + 30
        while not any(e["type"] == "message" and e.get("alert") == "control_refused" for e in events(engine)):
            assert time.monotonic() < deadline and not task.done(), "the forged lines were never refused"
            await asyncio.sleep(0.05)
        ctl = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "looptree.engine.cli", "ctl", str(engine.run_dir), "pin", "1.1"],
            capture_output=True, text=True, timeout=60)
        assert ctl.returncode == 0, ctl.stderr
        assert await asyncio.wait_for(asyncio.shield(task), 60) == "phases done"
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    evs = events(engine)
    refused = [e for e in evs if e.get("alert") == "control_refused"]
    assert sum(e["count"] for e in refused) == 3
    assert refused[0]["text"].startswith("WARNING: refused")
    assert "not signed" in refused[0]["reasons"] and "bad signature" in refused[0]["reasons"]
    assert not [e for e in evs if e["type"] == "budget_changed"]
    assert engine.budget.cap == cap
    pinned = [e for e in evs if e["type"] == "node_pinned"]
    assert len(pinned) == 1 and pinned[0]["seq"] > refused[0]["seq"], "only the real ctl pin was obeyed"
    lines = (engine.run_dir / CONTROL_NAME).read_text().splitlines()
    assert len(lines) == 4 and "sig" in json.loads(lines[-1])
    assert (os.stat(engine.run_dir / "control.key").st_mode & 0o777) == 0o600


async def test_the_guard_accepts_the_users_changes_between_stages_and_undoes_them_during_one(tmp_path: Path) -> None:
    from looptree.engine.vcs import gitops
    from looptree.engine.vcs.guard import RepoGuard

    project = make_project(tmp_path)
    repo = await gitops.open_repo(project)
    seen: list[dict[str, Any]] = []
    guard = RepoGuard(repo, project, dict, lambda type_, **f: seen.append({"type": type_, **f}))
    assert await guard.start() == []
    (project / "solver.py").write_text(SOLVER + "# the user's own edit\n")
    git(project, "commit", "-q", "-am", "user work while no stage runs")
    async with guard.watch("1.1", "build") as watch:
        pass
    assert watch.problem is None and seen == []

    main = git(project, "rev-parse", "main")
    async with guard.watch("1.2", "bench") as watch:
        git(project, "commit", "-q", "--allow-empty", "-m", "made while the bench ran")
        moved = git(project, "rev-parse", "main")
    assert watch.problem and f"refs/heads/main moved {main[:10]} → {moved[:10]} (restored to {main[:10]})" in watch.problem
    assert git(project, "rev-parse", "main") == main
    assert git(project, "cat-file", "-t", moved) == "commit", "the moved-to commit is still there"
    assert seen[-1]["alert"] == "repository_changed" and seen[-1]["id"] == "1.2"
