"""A Ray bench worker reads the files it ships back to the engine without following a link.

The worker mirrors the metrics CSV the bench writes in the candidate's worktree. Before this, it
opened it with a plain ``open``: a candidate that made ``metrics.csv`` a symlink had the worker
read the file it points to (a key on the worker's host, another run's files) and ship it to the
engine as metrics, and a FIFO there blocked the worker's actor. The pure tests drive the
worker's own code (``BenchWorker._mirrors`` / ``_drain``) on real files; one test runs a real
loopback Ray cluster end to end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: 127.0.0.1 stays loopback

from looptree.engine.cluster.ray_executor import BenchWorker, _Job, _Mirror  # noqa: E402

SECRET = "worker host secret: ssh-ed25519 AAAAC3Nza\n"


def _job(worktree: Path, rel: str = "metrics.csv") -> _Job:
    log = worktree.parent / "worker.log"
    log.write_text("")
    return _Job({"log": _Mirror(log), **BenchWorker._mirrors(worktree, {"metrics": rel})})


def _drain_within(job: _Job, seconds: float = 5.0) -> list[tuple[str, bool, bytes]]:
    """``_drain`` in a thread: a FIFO that blocks it fails the test instead of hanging it."""
    box: list[list[tuple[str, bool, bytes]]] = []
    thread = threading.Thread(target=lambda: box.append(BenchWorker._drain(job)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, f"_drain blocked for {seconds} s"
    return box[0]


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    wt = tmp_path / "wt"
    wt.mkdir()
    (tmp_path / "secret.txt").write_text(SECRET)
    return wt


def test_a_regular_metrics_file_is_shipped_as_it_grows(worktree: Path) -> None:
    job = _job(worktree)
    (worktree / "metrics.csv").write_text("time_s\n0.1\n")
    assert _drain_within(job) == [("metrics", False, b"time_s\n0.1\n")]
    with (worktree / "metrics.csv").open("a") as fh:
        fh.write("0.2\n")
    assert _drain_within(job) == [("metrics", False, b"0.2\n")]
    assert job.mirrors["metrics"].refused == ""


def test_a_metrics_symlink_is_never_read(worktree: Path) -> None:
    job = _job(worktree)
    (worktree / "metrics.csv").symlink_to(worktree.parent / "secret.txt")
    chunks = _drain_within(job)
    assert not any(SECRET.encode() in data for _, _, data in chunks), chunks
    assert "symlink" in job.mirrors["metrics"].refused


def test_a_metrics_fifo_does_not_block_the_worker(worktree: Path) -> None:
    job = _job(worktree)
    os.mkfifo(worktree / "metrics.csv")
    assert _drain_within(job) == []
    assert "FIFO" in job.mirrors["metrics"].refused


def test_a_folder_on_the_way_swapped_for_a_link_is_refused(worktree: Path) -> None:
    outside = worktree.parent / "outside"
    outside.mkdir()
    (outside / "metrics.csv").write_text(SECRET)
    (worktree / "out").symlink_to(outside)
    job = _job(worktree, "out/metrics.csv")
    assert (outside / "metrics.csv").read_text() == SECRET, "the set-up removal went through the link"
    chunks = _drain_within(job)
    assert not any(SECRET.encode() in data for _, _, data in chunks), chunks
    assert "symlink" in job.mirrors["metrics"].refused


# --------------------------------------------------------------------------- one real cluster


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=tester", "-c", "user.email=t@example.com", "-c",
                           "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def ray_node() -> Iterator[Any]:
    """One Ray node with one CPU, bound to 127.0.0.1."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "object_store_memory": 80 * 1024 * 1024})
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_a_bench_that_links_its_metrics_to_a_host_file_ships_nothing_of_it(ray_node: Any, tmp_path: Path) -> None:
    from looptree.engine.cluster.ray_executor import RayExecutor
    from looptree.engine.core.config import ClusterSection

    assert ray_node.address.startswith("127.0.0.1:")
    secret = tmp_path / "worker-secret.txt"  # on the worker's host (this one), outside any worktree
    secret.write_text(SECRET)
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "bench.sh").write_text(f'#!/bin/sh\nln -sf {secret} "$LOOPTREE_METRICS"\nsleep 0.6\necho done\n')
    (repo / "bench.sh").chmod(0o755)
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "bench")
    prefix = f"lt-safefiles-{uuid.uuid4().hex[:8]}:"

    async def go() -> Any:
        ex = RayExecutor(ClusterSection(backend="ray", cpus_per_bench=1, workers=1))
        await asyncio.wait_for(ex.start(prefix), 120)
        try:
            async with ex.lease("n1") as lease:
                env = {"PATH": os.environ["PATH"], "LOOPTREE_METRICS": str(repo / "metrics.csv")}
                return await lease.run("./bench.sh", cwd=repo, env=env, timeout=60, log_path=tmp_path / "bench.log",
                                       job_tag=f"{prefix}n1:b")
        finally:
            await ex.close()

    result = asyncio.run(go())
    copy = repo / "metrics.csv"
    assert not copy.exists() or SECRET not in copy.read_text(errors="replace")
    assert "symlink" in result.note, result.note
