"""Joining the process group (a rank that never joins is named), what each rank records about its
node, which transport NCCL chose, and run_info.json's record of each attempt."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from hpcllm import distributed
from hpcllm.distributed import DistEnv, JoinTimeout, free_port
from hpcllm.launch import health, run_info


def _env(rank: int, world: int, port: int) -> DistEnv:
    return DistEnv(rank, rank, world, "127.0.0.1", port)


def test_every_rank_gets_every_ranks_record():
    port, results = free_port(), {}

    def rank(r):
        # Keep each store: rank 0's serves rank 1's reads (in a job the process group keeps it up).
        results[r] = distributed.join(_env(r, 2, port), 0.5, {"rank": r, "host": f"node{r + 1}"})

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results[0][0] == results[1][0] == [{"rank": 0, "host": "node1"}, {"rank": 1, "host": "node2"}]


def test_a_rank_that_never_joins_fails_the_job_fast_naming_who_joined_and_who_did_not():
    """World of 3, rank 2 never starts: rank 0 and rank 1 both fail after cluster.dist_timeout_min
    (here 3 s) with the same account, instead of waiting for the job's time limit."""
    port, errors = free_port(), {}

    def rank(r):
        try:
            distributed.join(_env(r, 3, port), 0.05, {"rank": r, "host": f"node{r + 1}"})
        except JoinTimeout as err:
            errors[r] = str(err)

    start = time.monotonic()
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert time.monotonic() - start < 30
    for r in (0, 1):
        assert "2 of 3 ranks joined within 0.05 min (cluster.dist_timeout_min)" in errors[r]
        assert "joined rank 0 on node1, rank 1 on node2; never joined rank 2" in errors[r]


def test_ranks_that_never_joined_are_named_with_the_node_slurm_gave_them():
    message = distributed.missing_ranks({0: "node1", 1: "node1"}, 4, 10, ["node1", "node1", "node2", "node2"])
    assert message.startswith("2 of 4 ranks joined within 10 min (cluster.dist_timeout_min): joined rank 0 on node1, "
                              "rank 1 on node1; never joined rank 2 (expected on node2), rank 3 (expected on node2).")


def test_a_worker_whose_rank_0_never_starts_names_the_master(monkeypatch):
    port = free_port()
    with pytest.raises(JoinTimeout, match=rf"rank 1 on host .* could not reach rank 0 at 127.0.0.1:{port}"):
        distributed.join(_env(1, 2, port), 0.05, {"rank": 1, "host": "node2"})


def test_join_timeout_in_a_real_worker_process(tmp_path):
    """The whole init (join, then the gloo group DeepSpeed adopts) in a process of its own, as a task runs it."""
    code = ("from hpcllm import distributed as d; "
            f"d.init(d.DistEnv(0, 0, 2, '127.0.0.1', {free_port()}), 'cpu', 0.05, {{'rank': 0, 'host': 'here'}})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert out.returncode != 0
    assert "JoinTimeout: 1 of 2 ranks joined within 0.05 min" in out.stderr
    assert "never joined rank 1" in out.stderr


def test_rank_record_describes_the_node(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    record = health.rank_record(3, 1, "cpu", tmp_path)
    assert record["rank"] == 3 and record["local_rank"] == 1 and record["host"]
    assert record["cpus"] >= 1 and record["cpus_per_task"] == 4 and record["omp_threads"] == 64
    assert record["run_dir_free_gb"] > 0 and record["shm_free_gb"] is not None
    # 64 threads on this machine's few CPUs: said before the job crawls.
    assert any("OMP_NUM_THREADS=64" in line for line in health.warnings_for(record))


def test_node_dirs_are_made_where_the_job_points(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCLLM_NODE_TMP", str(tmp_path / "node"))
    for name in health.NODE_DIRS:
        monkeypatch.setenv(name, str(tmp_path / "node" / name.lower()))
    health.make_node_dirs()
    assert all((tmp_path / "node" / name.lower()).is_dir() for name in health.NODE_DIRS)


IB_LOG = """\
node1:123:456 [0] NCCL INFO NCCL_SOCKET_IFNAME set by environment to ib0
node1:123:456 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/RoCE ; OOB ib0:10.0.0.1<0>
node1:123:456 [0] NCCL INFO Using network IB
node1:123:456 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/IPC
node1:123:456 [0] NCCL INFO Channel 00/0 : 7[7] -> 8[0] [send] via NET/IB/0
"""
SOCKET_LOG = """\
node1:1:1 [0] NCCL INFO NET/IB : No device found.
node1:1:1 [0] NCCL INFO NET/Socket : Using [0]eth0:10.1.2.3<0>
node1:1:1 [0] NCCL INFO Using network Socket
node1:1:1 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Socket/0
"""


def test_nccl_transport_from_its_info_lines(tmp_path):
    assert health.nccl_transport(IB_LOG) == "network IB (mlx5_0:1/IB, mlx5_1:1/RoCE); channels via NET/IB, P2P/IPC"
    assert health.nccl_transport(SOCKET_LOG) == "network Socket (eth0:10.1.2.3); channels via NET/Socket"
    assert health.nccl_transport("nothing about the network") is None
    path = health.nccl_log_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    path.write_text(SOCKET_LOG)
    assert health.report_transport(tmp_path, 0).startswith("network Socket")


def test_nccl_log_capture_leaves_a_users_own_debug_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("NCCL_DEBUG", "TRACE")
    monkeypatch.delenv("NCCL_DEBUG_FILE", raising=False)
    health.capture_nccl_init(tmp_path, 0)
    assert "NCCL_DEBUG_FILE" not in os.environ
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    monkeypatch.setenv("NCCL_DEBUG_SUBSYS", "INIT,NET")  # restored after the test, as NCCL_DEBUG is
    health.capture_nccl_init(tmp_path, 2)
    assert os.environ["NCCL_DEBUG"] == "INFO" and os.environ["NCCL_DEBUG_FILE"].endswith("logs/nccl/rank2.log")


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_run_info_records_each_attempt_with_code_versions_and_nodes(tmp_path, monkeypatch):
    repo = tmp_path / "code"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text("lr = 1\n")
    _git(repo, "add", "train.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setattr(run_info, "PROJECT_ROOT", str(repo))
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    records = [{"rank": 0, "host": "node1"}, {"rank": 1, "host": "node2"}]
    first = run_info.record_attempt(run_dir, records)
    assert first["git"]["dirty"] is False and len(first["git"]["commit"]) == 40 and "diff" not in first["git"]
    (repo / "train.py").write_text("lr = 2\n")  # an uncommitted change, then a requeue
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    second = run_info.record_attempt(run_dir, records)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert [a["attempt"] for a in info["attempts"]] == [1, 2]
    assert [a["restart_count"] for a in info["attempts"]] == [0, 1]
    assert second["git"]["dirty"] is True and "+lr = 2" in (run_dir / second["git"]["diff"]).read_text()
    assert second["node_list"] == "node[1-2]" and second["hosts"] == ["node1", "node2"] and second["slurm_job_id"] == "77"
    versions = second["versions"]
    assert versions["torch"] and versions["deepspeed"] and versions["transformers"] and versions["python"]
    assert "peft" in versions and "nccl" in versions and "cuda_driver" in versions


def test_dist_timeout_is_a_cluster_setting():
    from hpcllm.config import compose

    assert compose(["cluster=slurm", "cluster.dist_timeout_min=2"]).cluster.dist_timeout_min == 2
