"""What a site needs from the job, on the local Slurm cluster: CPUs per rank, the site's setup lines,
node-local caches, the health check and run_info.json, and the pre-flight's `sbatch --test-only`."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from slurm_helpers import TINY, job_ids, sacct

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def site_job(launch, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("site job")
    proc = launch(*TINY, "hw.nodes=2", "train.max_steps=2", "cluster.cpus_per_task=2", "cluster.health_check=true",
                  "cluster.setup=['export SITE_MARK=from-site-setup','echo site setup ran on $(hostname)']",
                  f"hydra.run.dir={run_dir}", "wait=true", check=True)
    return run_dir, job_ids(proc.stdout)[0], proc


def _log(run_dir, job_id, rank):
    return (run_dir / "slurm" / f"{job_id}_{rank}_log.out").read_text()


def test_each_rank_gets_the_cpus_it_asked_for(site_job):
    """srun is given --cpus-per-task again (from Slurm 22.05 on it does not take the allocation's): Slurm's
    record of the ranks' step shows it, the step holds 2 CPUs per task and each rank sees them. (This
    cluster's task/none plugin binds nothing, so a rank would see the node's CPUs even without the flag;
    the step's submit line is what proves srun was asked.)"""
    run_dir, job_id, _ = site_job
    steps = dict(line.split("|", 1) for line in subprocess.run(
        ["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,AllocCPUS,NTasks,SubmitLine"],
        capture_output=True, text=True).stdout.splitlines())
    ranks_step = steps[f"{job_id}.1"].split("|")
    assert ranks_step[:2] == ["4", "2"] and "--cpus-per-task=2 --cpu-bind=none" in ranks_step[2], ranks_step
    ranks = json.loads((run_dir / "health.json").read_text())["ranks"]
    assert len({r["host"] for r in ranks}) == 2
    for record in ranks:
        assert record["cpus_per_task"] == 2 and record["cpus"] >= 2 and record["omp_threads"] == 2, record


def test_site_setup_runs_first_and_caches_are_node_local(site_job):
    run_dir, job_id, _ = site_job
    log = _log(run_dir, job_id, 0)
    assert log.index("site setup ran on") < log.index(f"hpcllm job {job_id} on")
    ranks = json.loads((run_dir / "health.json").read_text())["ranks"]
    node_tmp = f"/tmp/hpcllm-{job_id}"
    assert {r["node_tmp"] for r in ranks} == {node_tmp}
    for record in ranks:
        assert all(path.startswith(node_tmp + "/") for path in record["caches"].values()), record["caches"]
    # Removed at the end of the job (both "nodes" of the local cluster share this machine's /tmp).
    assert not os.path.exists(node_tmp)
    for rank, record in enumerate(ranks):
        assert f"rank {rank} joined on host {record['host']}" in _log(run_dir, job_id, rank)


def test_health_check_and_run_info_of_the_attempt(site_job):
    run_dir, job_id, proc = site_job
    assert sacct(job_id) == ["COMPLETED"]
    health = json.loads((run_dir / "health.json").read_text())
    assert health["all_reduce"]["correct"] is True and health["all_reduce"]["bus_bandwidth_gbps"] > 0
    attempt = json.loads((run_dir / "run_info.json").read_text())["attempts"][0]
    assert attempt["slurm_job_id"] == job_id and attempt["restart_count"] == 0
    assert attempt["node_list"] == "node[1-2]" and sorted(attempt["hosts"]) == ["node1", "node2"]
    assert len(attempt["git"]["commit"]) == 40 and attempt["versions"]["torch"]


def test_preflight_reports_what_the_site_would_reject(launch, tmp_path):
    """Three nodes on a two-node cluster: sbatch --test-only refuses, the launch says why, nothing queues."""
    proc = launch(*TINY, "hw.nodes=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "the cluster would reject" in proc.stderr and "Requested node configuration is not available" in proc.stderr
    assert not job_ids(proc.stdout) and not (tmp_path / "slurm").exists()
    dry = launch(*TINY, "hw.nodes=3", f"hydra.run.dir={tmp_path}", "dry_run=true")
    assert dry.returncode == 0 and "[dry run] would be refused: the cluster would reject" in dry.stdout
    warned = launch(*TINY, "hw.nodes=3", f"hydra.run.dir={tmp_path}", "dry_run=true", "preflight=warn")
    assert warned.returncode == 0 and "hpcllm: warning: the cluster would reject" in warned.stdout
