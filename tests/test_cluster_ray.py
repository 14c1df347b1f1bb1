"""The Ray executor against a real multi-node Ray cluster bound to 127.0.0.1.

One cluster (a head with no CPUs and two worker nodes) is shared by every test here to keep CI
short; it is started with ``ray.cluster_utils.Cluster`` and every node is told its address is
127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and ``node_ip_address``), so Ray never binds
the machine's other addresses. All the workers run on this host, which lets the tests look for
leftover processes with the same ``procs.find_job_pids`` scan the workers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

# Read by Ray when it is imported: with it, "127.0.0.1" stays loopback instead of being resolved
# to the machine's other address (which these tests must never use).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray  # the ray extra: the README's test command installs ".[test,ray]"

from looptree.engine.cluster.ray_executor import (
    RayExecutor,
    local_versions,
    version_difference,
)
from looptree.engine.core.config import ClusterSection
from looptree.engine.errors import LooptreeError
from looptree.engine.evaluation.procs import JOB_ENV, find_job_pids


def git_cmd(cwd: Path, *args: str) -> str:
    """Plain synchronous git for test set-up (the same flags as tests/conftest.py's)."""
    return subprocess.run(["git", "-c", "user.name=tester", "-c", "user.email=t@example.com", "-c",
                           "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout

BENCH = """#!/bin/sh
# Writes one metrics row every 0.3 s, like a bench that reports while it runs.
echo "time_s" > "$LOOPTREE_METRICS"
for i in 1 2 3 4 5 6; do echo "0.$i" >> "$LOOPTREE_METRICS"; sleep 0.3; done
echo "bench done in $(pwd)"
"""


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A head (no CPUs: nothing runs there) and two worker nodes of two CPUs, all on 127.0.0.1."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"

    store = 80 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": store})
    for _ in range(2):
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=store)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with two commits: the parent's bench and a candidate that differs by one file."""
    root = tmp_path_factory.mktemp("cluster-repo") / "project"
    root.mkdir()
    git_cmd(root, "init", "-q")
    (root / "bench.sh").write_text(BENCH)
    (root / "bench.sh").chmod(0o755)
    (root / "version.txt").write_text("parent\n")
    (root / "hidden.txt").write_text("the held-out answers\n")
    git_cmd(root, "add", ".")
    git_cmd(root, "commit", "-q", "-m", "parent")
    return root


def _prefix() -> str:
    return f"lt-clustertest-{uuid.uuid4().hex[:8]}:"


def _env(cwd: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "LOOPTREE_METRICS": str(cwd / "metrics.csv")}


async def _executor(workers: int, prefix: str, **kwargs: Any) -> RayExecutor:
    ex = RayExecutor(ClusterSection(backend="ray", cpus_per_bench=1, workers=workers), **kwargs)
    await asyncio.wait_for(ex.start(prefix), 120)
    return ex


@pytest.fixture
async def executor(ray_cluster: Any) -> AsyncIterator[RayExecutor]:
    ex = await _executor(2, _prefix())
    try:
        yield ex
    finally:
        await ex.close()


async def _gone(tag: str, within: float = 10.0) -> list[int]:
    """Processes still tagged ``tag`` after up to ``within`` seconds (the workers are on this host)."""
    deadline = time.monotonic() + within
    while True:
        left = await asyncio.to_thread(find_job_pids, tag, True)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.2)


async def test_rows_stream_back_while_the_bench_runs(executor: RayExecutor, repo: Path, tmp_path: Path) -> None:
    assert len(executor.workers()) == 2
    assert {w["node"] for w in executor.workers()} != {"local"}
    seen: list[int] = []

    async def tick() -> None:
        metrics = repo / "metrics.csv"
        seen.append(len(metrics.read_text().splitlines()) if metrics.exists() else 0)

    (repo / "metrics.csv").unlink(missing_ok=True)
    async with executor.lease("n1") as lease:
        result = await lease.run("./bench.sh", cwd=repo, env=_env(repo), timeout=60, log_path=tmp_path / "bench.log",
                                 job_tag=f"{executor._prefix}n1:c0", on_tick=tick)
        assert lease.worker["node"] in {w["node"] for w in executor.workers()}
        assert lease.worker["host"] and lease.worker["device"] == "cpu" and lease.worker["uuid"] is None
    assert result.ok, result.tail
    # Rows reached the engine's copy before the bench ended: some tick saw a partial file.
    assert any(1 < n < 7 for n in seen), seen
    assert (repo / "metrics.csv").read_text().splitlines() == ["time_s", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6"]
    log = (tmp_path / "bench.log").read_text()
    assert "bench done in /" in log and "rc=0" in log
    assert "looptree-worker-" in log  # it ran in the worker's own checkout, not in the engine's


async def test_a_pair_runs_on_one_worker_and_ships_only_new_objects(executor: RayExecutor, repo: Path,
                                                                    tmp_path: Path) -> None:
    parent = git_cmd(repo, "rev-parse", "HEAD").strip()
    cand = tmp_path / "cand"
    git_cmd(repo, "worktree", "add", "-q", "--detach", str(cand), parent)
    (cand / "version.txt").write_text("candidate\n")
    git_cmd(cand, "commit", "-q", "-am", "candidate")
    outputs = []
    async with executor.lease("n2") as lease:
        for side, cwd in (("p", repo), ("c", cand), ("c", cand), ("p", repo)):
            result = await lease.run("cat version.txt; pwd", cwd=cwd, env=_env(cwd), timeout=30,
                                     log_path=tmp_path / f"{side}.log", job_tag=f"{executor._prefix}n2:{side}")
            assert result.ok, result.tail
            outputs.append(result.tail.split())
    assert [o[0] for o in outputs] == ["parent", "candidate", "candidate", "parent"]
    worker_base = {o[1].split("/leases/")[0] for o in outputs}
    assert len(worker_base) == 1  # all four on the same worker actor
    assert outputs[0][1] == outputs[3][1] and outputs[1][1] == outputs[2][1] != outputs[0][1]


async def test_files_the_engine_removed_are_absent_on_the_worker(executor: RayExecutor, repo: Path,
                                                                tmp_path: Path) -> None:
    wt = tmp_path / "wt"
    git_cmd(repo, "worktree", "add", "-q", "--detach", str(wt), "HEAD")
    (wt / "hidden.txt").unlink()  # what AccessPolicy.drop_hidden does to a candidate's worktree
    async with executor.lease("n8") as lease:
        result = await lease.run("ls; cat hidden.txt", cwd=wt, env=_env(wt), timeout=30,
                                 log_path=tmp_path / "ls.log", job_tag=f"{executor._prefix}n8:b")
    assert not result.ok and "version.txt" in result.tail and "the held-out answers" not in result.tail


async def test_a_cancelled_bench_dies_on_the_worker(executor: RayExecutor, repo: Path, tmp_path: Path) -> None:
    tag = f"{executor._prefix}n3:c0"
    async with executor.lease("n3") as lease:
        task = asyncio.create_task(lease.run("sleep 300 & sleep 300 & wait", cwd=repo, env=_env(repo), timeout=600,
                                             log_path=tmp_path / "bench.log", job_tag=tag))
        deadline = time.monotonic() + 20
        while not await asyncio.to_thread(find_job_pids, tag) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await asyncio.to_thread(find_job_pids, tag), "the bench never started on the worker"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _gone(tag) == []
        # The worker is still good for the next stage of the node.
        again = await lease.run("true", cwd=repo, env=_env(repo), timeout=30, log_path=tmp_path / "b.log",
                                job_tag=f"{executor._prefix}n3:c1")
        assert again.ok


async def test_a_timeout_kills_the_tree_on_the_worker(executor: RayExecutor, repo: Path, tmp_path: Path) -> None:
    tag = f"{executor._prefix}n4:c0"
    async with executor.lease("n4") as lease:
        result = await lease.run("sleep 300 & sleep 300; wait", cwd=repo, env=_env(repo), timeout=1.5,
                                 log_path=tmp_path / "bench.log", job_tag=tag)
    assert result.timed_out and not result.ok
    assert await _gone(tag) == []


async def test_close_leaves_no_bench_running(ray_cluster: Any, repo: Path, tmp_path: Path) -> None:
    prefix = _prefix()
    ex = await _executor(2, prefix)
    started: list[str] = []

    async def hold(node: str) -> None:
        async with ex.lease(node) as lease:
            started.append(node)
            await lease.run("sleep 300", cwd=repo, env=_env(repo), timeout=600, log_path=tmp_path / f"{node}.log",
                            job_tag=f"{prefix}{node}:c0")

    tasks = [asyncio.create_task(hold(n)) for n in ("a", "b")]
    deadline = time.monotonic() + 30
    while len(await asyncio.to_thread(find_job_pids, prefix, True)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert len(await asyncio.to_thread(find_job_pids, prefix, True)) >= 2
    for task in tasks:  # what a stop does: the node tasks are cancelled, then the executor closes
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ex.close()
    assert await _gone(prefix) == []


async def test_a_worker_killed_mid_bench_fails_that_stage_and_is_replaced(ray_cluster: Any, repo: Path,
                                                                         tmp_path: Path) -> None:
    prefix = _prefix()
    said: list[str] = []
    ex = await _executor(1, prefix, say=said.append)
    try:
        tag = f"{prefix}n5:c0"
        async with ex.lease("n5") as lease:
            victim = ex.slots[0].pid
            task = asyncio.create_task(lease.run("sleep 300", cwd=repo, env=_env(repo), timeout=600,
                                                 log_path=tmp_path / "bench.log", job_tag=tag))
            deadline = time.monotonic() + 20
            while not await asyncio.to_thread(find_job_pids, tag) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            os.kill(victim, signal.SIGKILL)  # the worker process dies as a node would
            result = await asyncio.wait_for(task, 60)
        assert not result.ok and result.rc is None
        assert "Ray worker" in result.tail and "was lost" in result.tail
        assert "was lost" in (tmp_path / "bench.log").read_text()
        assert any("was lost" in line for line in said)
        assert await _gone(tag) == []  # the bench died with its worker (PDEATHSIG / the sandbox's init)
        # The run goes on: a replacement worker takes the next node.
        async with ex.lease("n6") as lease:
            assert lease.worker is not None
            again = await lease.run("./bench.sh", cwd=repo, env=_env(repo), timeout=60,
                                    log_path=tmp_path / "b2.log", job_tag=f"{prefix}n6:c0")
        assert again.ok, again.tail
        assert ex.slots[0].pid != victim
    finally:
        await ex.close()


async def test_resume_kills_orphans_on_the_workers_first(ray_cluster: Any, tmp_path: Path) -> None:
    prefix = _prefix()
    # An orphan of a crashed engine: a tagged process in its own session, parent gone.
    orphan = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-c", "import time; time.sleep(300)"],
                                     env={**os.environ, JOB_ENV: f"{prefix}n7:c0"}, start_new_session=True)
    try:
        ex = await _executor(1, prefix)
        try:
            assert ex.orphans_killed >= 1
            assert orphan.wait(timeout=10) == -signal.SIGKILL
        finally:
            await ex.close()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


async def test_a_worker_with_other_versions_is_refused_with_one_line(ray_cluster: Any) -> None:
    theirs = local_versions()
    ours = {**theirs, "torch": "9.9.9"}
    assert version_difference(ours, theirs) == f"torch {theirs['torch'] or 'missing'} there, 9.9.9 here"
    assert version_difference(theirs, theirs) is None
    said: list[str] = []
    ex = RayExecutor(ClusterSection(backend="ray", cpus_per_bench=1, workers=1), versions=ours, say=said.append)
    try:
        with pytest.raises(LooptreeError) as err:
            await asyncio.wait_for(ex.start(_prefix()), 120)
    finally:
        await ex.close()
    line = str(err.value)
    assert "\n" not in line and "refused" in line and "torch" in line and "9.9.9 here" in line
    assert said == [line]


async def test_a_cluster_without_room_says_so(ray_cluster: Any) -> None:
    ex = RayExecutor(ClusterSection(backend="ray", gpus_per_bench=1))
    try:
        with pytest.raises(LooptreeError, match="no room for one bench"):
            await asyncio.wait_for(ex.start(_prefix()), 60)
    finally:
        await ex.close()


# --------------------------------------------------------------------------------------------
# The sample project, run by the real CLI with cluster.backend = "ray" on the shared cluster

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_projects" / "hotloop"


def _looptree(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "looptree.engine.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, f"looptree {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _events(run_dir: Path) -> list[dict[str, Any]]:
    import json

    out = []
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _cluster_args(ray_cluster: Any, workers: int = 2) -> list[str]:
    return ["cluster.backend=ray", f"cluster.address={ray_cluster.address}", f"cluster.workers={workers}",
            "cluster.cpus_per_bench=1"]


def _node_ids() -> set[str]:

    return {n["NodeID"] for n in ray.nodes()}


def _project(tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "hotloop"
    shutil.copytree(SAMPLE, dest, ignore=shutil.ignore_patterns(".looptree", "__pycache__", "metrics.csv"))
    return dest


def _leftovers(run_dir: Path) -> list[int]:
    from looptree.engine.run.engine import job_prefix

    return find_job_pids(job_prefix(run_dir), prefix=True)


@pytest.mark.slow
def test_sample_project_on_the_cluster(ray_cluster: Any, tmp_path: Path) -> None:
    project = _project(tmp_path)
    assert ray_cluster.address.startswith("127.0.0.1:")
    _looptree("run", str(project), "--no-tui", "bench.repeats=2", "bench.max_repeats=5", "search.num_phases=2",
              *_cluster_args(ray_cluster))
    run_dir = project / ".looptree" / "runs" / "1"
    events = _events(run_dir)
    assert events[-1]["type"] == "run_finished" and events[-1]["reason"] in ("phases done", "early stop")
    stages = [e for e in events if e["type"] in ("stage_started", "stage_finished")]
    benches = [e for e in stages if e.get("stage") == "bench"]
    assert benches and len({e["id"] for e in benches}) > 3
    nodes = _node_ids()
    for event in stages:  # every build/check/bench event names its Ray worker
        worker = event.get("worker")
        assert worker and worker["node"] in nodes and worker["host"] and worker["device"] == "cpu", event
    # Both sides of every pair ran on one worker; more than one worker took part.
    for node in {e["id"] for e in benches}:
        assert len({e["worker"]["node"] for e in benches if e["id"] == node}) == 1, node
    assert len({e["worker"]["node"] for e in benches}) == 2
    assert any(e["type"] == "message" and "Ray bench worker" in e.get("text", "") for e in events)
    import json

    tree = json.loads(_looptree("tree", str(run_dir), "--json").stdout)
    best = {n["id"]: n for n in tree["nodes"]}[tree["best"]]
    assert tree["best"] != "1" and best["ratio_vs_baseline"] > 1.5
    assert _leftovers(run_dir) == []


@pytest.mark.slow
def test_stop_then_resume_on_the_cluster(ray_cluster: Any, tmp_path: Path) -> None:
    project = _project(tmp_path)
    args = ["bench.repeats=1", "bench.compare=off", "search.num_phases=2", *_cluster_args(ray_cluster)]
    proc = subprocess.Popen([sys.executable, "-m", "looptree.engine.cli", "run", str(project), "--no-tui", *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    run_dir = project / ".looptree" / "runs" / "1"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # a bench of a candidate is under way on a worker
            events = _events(run_dir) if (run_dir / "events.jsonl").exists() else []
            if any(e["type"] == "stage_started" and e.get("stage") == "bench" and e["id"] != "1" for e in events):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("no candidate bench started on the cluster")
        _looptree("ctl", str(run_dir), "stop")
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = _events(run_dir)
    assert events[-1]["type"] == "run_finished" and events[-1]["reason"] == "stopped by user"
    assert _leftovers(run_dir) == []  # the stop reached the benches on the workers
    _looptree("resume", str(run_dir), "--no-tui")
    events = _events(run_dir)
    assert events[-1]["type"] == "run_finished" and events[-1]["reason"] in ("phases done", "early stop")
    after = events[[i for i, e in enumerate(events) if e["type"] == "engine_attached"][-1]:]
    assert any(e["type"] == "stage_started" and e.get("worker", {}).get("node") in _node_ids() for e in after)
    assert _leftovers(run_dir) == []


def test_gpus_of_the_cluster_are_sampled_on_its_nodes(ray_cluster: Any) -> None:
    from looptree.engine.cluster.telemetry import cluster_gpus, format_cluster_gpus

    nodes = cluster_gpus(ray_cluster.address)
    assert {n["node"] for n in nodes} == _node_ids()
    text = format_cluster_gpus(nodes)
    for n in nodes:  # this machine has no GPU: each node says so in one line, under its host
        assert n["host"] and n["devices"] == [] and n["table"].startswith("no GPU: ")
        assert f"(node {n['node'][:12]})" in text


def test_looptree_gpus_dir_lists_the_clusters_nodes(ray_cluster: Any, tmp_path: Path) -> None:
    """`looptree gpus DIR`: a project whose config names the cluster gets every node's GPUs."""
    project = _project(tmp_path)
    with open(project / "looptree.toml", "a") as fh:
        fh.write(f'\n[cluster]\nbackend = "ray"\naddress = "{ray_cluster.address}"\n')
    out = _looptree("gpus", str(project))
    for node_id in _node_ids():
        assert f"(node {node_id[:12]})" in out.stdout
    assert out.stdout.count("no GPU: ") == len(_node_ids())


@pytest.mark.slow
def test_engine_killed_mid_bench_then_resume_on_the_cluster(ray_cluster: Any, tmp_path: Path) -> None:
    project = _project(tmp_path)
    args = ["bench.repeats=1", "bench.compare=off", "search.num_phases=2", *_cluster_args(ray_cluster)]
    proc = subprocess.Popen([sys.executable, "-m", "looptree.engine.cli", "run", str(project), "--no-tui", *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    run_dir = project / ".looptree" / "runs" / "1"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            events = _events(run_dir) if (run_dir / "events.jsonl").exists() else []
            if any(e["type"] == "stage_started" and e.get("stage") == "bench" and e["id"] != "1" for e in events):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("no candidate bench started on the cluster")
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the engine dies; its benches on the workers are orphans
        proc.wait()
    assert not any(e["type"] == "run_finished" for e in _events(run_dir))
    _looptree("resume", str(run_dir), "--no-tui")
    events = _events(run_dir)
    assert events[-1]["type"] == "run_finished" and events[-1]["reason"] in ("phases done", "early stop")
    assert _leftovers(run_dir) == []


async def test_an_unreachable_cluster_is_one_line() -> None:
    with socket_closed_port() as port:
        ex = RayExecutor(ClusterSection(backend="ray", address=f"127.0.0.1:{port}"))
        with pytest.raises(LooptreeError, match=r"^cannot reach the Ray cluster at 127\.0\.0\.1:\d+ \(cluster\.address\)"):
            await asyncio.wait_for(ex.start(_prefix()), 30)


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port
