"""Real jobs on the local Slurm cluster, submitted through launch.py (tools/slurm_local.sh start).

Runs are shared between assertions (module fixtures) and kept tiny so the module stays short.
"""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from slurm_helpers import TINY, job_ids, sacct, scontrol_job, wait_for

pytestmark = pytest.mark.slurm

STEPS = 16
TWO_NODES = [*TINY, "hw.nodes=2", f"train.max_steps={STEPS}"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def _last_step(run_dir) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(line)["step"] for line in lines if '"loss"' in line)


@pytest.fixture(scope="module")
def two_node(launch, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_node")
    proc = launch(*TWO_NODES, f"hydra.run.dir={run_dir}", "wait=true", check=True)
    return run_dir, job_ids(proc.stdout)[0], proc


def test_two_node_job_trains_and_exports(two_node):
    run_dir, job_id, proc = two_node
    assert f"job {job_id} completed" in proc.stdout
    assert sacct(job_id) == ["COMPLETED"]
    assert _last_step(run_dir) == STEPS
    assert (run_dir / "final" / "model.safetensors").exists()
    nodes = {}
    for rank in (0, 1):
        log = (run_dir / "slurm" / f"{job_id}_{rank}_log.out").read_text()
        nodes[rank] = re.search(rf"rank {rank}/2 .* on node (\S+)", log).group(1)
    assert nodes[0] != nodes[1], nodes
    # Rendezvous on the first host of the allocation, port from the job id.
    assert f"master {nodes[0]}:{20000 + int(job_id) % 20000}" in (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()


def test_submitted_sbatch_is_the_rendered_job(two_node):
    run_dir, job_id, _ = two_node
    submitted = (run_dir / "slurm" / f"{job_id}_submission.sh").read_text()
    assert submitted == (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in submitted and "#SBATCH --signal=USR2@300" in submitted
    assert "#SBATCH --requeue" in submitted


def test_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(launch, two_node, tmp_path):
    """USR2 is what Slurm sends before the time limit (--signal) and what preemption tools send."""
    reference, _, _ = two_node
    proc = launch(*TWO_NODES, f"hydra.run.dir={tmp_path}", "wait=false", check=True)
    job_id = job_ids(proc.stdout)[0]
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and '"step": 3,' in metrics.read_text(), 240, "step 3")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for(lambda: scontrol_job(job_id).get("Restarts") == "1", 120, "the requeue")
    # Slurm holds a requeued job for ~2 minutes (BeginTime); the test does not wait for that. It does wait
    # past the second of the requeue: slurmd treats a credential issued in the second its predecessor was
    # revoked as revoked too ("Job credential revoked"), and the restarted job would fail to launch.
    _release_when_held(job_id)
    wait_for(lambda: sacct(job_id)[0] in FINAL, 240, "the requeued job", every=1)
    assert sacct(job_id) == ["COMPLETED"]
    log = (tmp_path / "slurm" / f"{job_id}_0_log.out").read_text()
    assert "requeued (restart 1 of at most 3)" in log
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*"))
    assert 3 <= steps[0] < STEPS and steps[-1] == STEPS, steps
    assert _last_step(tmp_path) == STEPS
    ours, theirs = _weights(tmp_path), _weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] == theirs[name]).all(), name


def _release_when_held(job_id):
    """Start a requeued job now instead of after Slurm's ~2 minute hold (see the test above for the 2 s)."""
    time.sleep(2)

    def released():
        if scontrol_job(job_id).get("JobState") == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        return scontrol_job(job_id).get("JobState") not in ("PENDING", "COMPLETING", "REQUEUED")

    wait_for(released, 150, "the requeued job to start", every=2)


def test_a_job_reaching_its_time_limit_checkpoints_requeues_and_resumes(launch, tmp_path):
    """Slurm itself, not the test, signals the job: --time=3 with --signal=USR2@60. The loop checkpoints
    before the limit, the job requeues itself, and the restart resumes from that checkpoint (about 2 min).
    Slurm may signal up to a minute early (its event resolution), so 60-120 s after the start here, when
    training is under way (a 2-minute limit could signal while the model is still loading)."""
    proc = launch(*TINY, "train.max_steps=1000000", "cluster.time_limit_min=3", "cluster.signal_before_min=1",
                  f"hydra.run.dir={tmp_path}", "wait=false", check=True)
    job_id = job_ids(proc.stdout)[0]
    started = time.time()
    wait_for(lambda: scontrol_job(job_id).get("Restarts") == "1", 300, "the requeue at the time limit", every=1)
    assert time.time() - started < 180, "the job was not signalled before its 3-minute limit"
    log_file = tmp_path / "slurm" / f"{job_id}_0_log.out"
    assert f"checkpoint saved, job {job_id} requeued (restart 1 of at most 3)" in log_file.read_text()
    stopped_at = _last_step(tmp_path)
    assert (tmp_path / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()

    _release_when_held(job_id)
    wait_for(lambda: f"resumed from {tmp_path / 'checkpoints' / f'step_{stopped_at:08d}'}" in log_file.read_text(),
             120, "the resumed run", every=1)
    wait_for(lambda: _last_step(tmp_path) > stopped_at, 60, "a step after the resume", every=1)
    subprocess.run(["scancel", job_id], check=True)
    wait_for(lambda: sacct(job_id)[0] in FINAL, 60, "the cancelled job", every=1)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    steps = [row["step"] for row in rows]
    assert steps == sorted(steps) and steps[0] == 1, "the resumed run continued the step count"


def test_sweep_runs_as_one_job_array(launch, tmp_path):
    proc = launch(*TINY, "train.max_steps=4", "method.lr=1e-3,2e-3,3e-3", "cluster.array_parallelism=2",
                  f"hydra.sweep.dir={tmp_path}", "wait=true", multirun=True, check=True)
    ids = job_ids(proc.stdout)
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{i}" for i in range(3)]
    assert "#SBATCH --array=0-2%2" in (tmp_path / "job.sbatch").read_text()
    assert (tmp_path / "job.sbatch").read_text() == (tmp_path / "slurm" / f"{array}_submission.sh").read_text()
    for i, lr in enumerate(["0.001", "0.002", "0.003"]):
        assert sacct(ids[i]) == ["COMPLETED"]
        assert f"lr: {lr}" in (tmp_path / str(i) / "config.yaml").read_text()
        assert (tmp_path / str(i) / "final" / "model.safetensors").exists()


def test_rlhf_pipeline_stages_wait_for_and_read_the_previous_stage(launch, tmp_path):
    """SFT -> reward -> PPO: each job starts after the one before completed (afterok) and reads its export."""
    proc = launch(*TINY, "pipeline=rlhf", "train.max_steps=4", f"hydra.run.dir={tmp_path}", "wait=true",
                  check=True)
    sft, reward, ppo = job_ids(proc.stdout)
    assert f"--dependency=afterok:{sft}" in (tmp_path / "reward" / "job.sbatch").read_text()
    assert f"--dependency=afterok:{reward}" in (tmp_path / "ppo" / "job.sbatch").read_text()
    assert f"path: {tmp_path}/sft/final" in (tmp_path / "reward" / "config.yaml").read_text()
    assert f"reward_model: {tmp_path}/reward/final" in (tmp_path / "ppo" / "config.yaml").read_text()
    for earlier, later in ((sft, reward), (reward, ppo)):
        (_, end), (start, _) = sacct(earlier, "Start,End"), sacct(later, "Start,End")
        assert sacct(later) == ["COMPLETED"] and start >= end
    assert (tmp_path / "reward" / "final" / "value_head.safetensors").exists()
    assert '"mean_reward"' in (tmp_path / "ppo" / "metrics.jsonl").read_text()
    assert (tmp_path / "ppo" / "final" / "model.safetensors").exists()


def test_failing_job_is_not_requeued(launch, tmp_path):
    broken = tmp_path / "broken_model"  # passes the check at composition (it has a config.json), fails to load
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_model_type"}')
    proc = launch(*TINY, "train.max_steps=4", f"model.path={broken}", f"hydra.run.dir={tmp_path}",
                  "wait=true")
    job_id = job_ids(proc.stdout)[0]
    assert proc.returncode != 0
    assert f"job {job_id} ended FAILED" in proc.stderr
    assert sacct(job_id) == ["FAILED"]
    assert scontrol_job(job_id).get("Restarts") == "0"


def test_status_and_cancel(launch, tmp_path):
    proc = launch(*TINY, "train.max_steps=100000", f"hydra.run.dir={tmp_path}", "wait=false", check=True)
    job_id = job_ids(proc.stdout)[0]
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and '"step": 2,' in metrics.read_text(), 240, "step 2")
    status = launch("status", tool="tools/jobs.py", check=True).stdout
    row = next(line for line in status.splitlines() if line.startswith(job_id + " "))
    assert "RUNNING" in row and str(tmp_path) in row
    assert f"cancelled {job_id}" in launch("cancel", job_id, tool="tools/jobs.py", check=True).stdout
    wait_for(lambda: sacct(job_id)[0] in FINAL, 60, "the cancellation", every=1)
    assert sacct(job_id)[0] == "CANCELLED"
    assert scontrol_job(job_id).get("Restarts") == "0"
