"""Submit prepared jobs to Slurm with submitit: one job, a sweep as a job array, a pipeline as
jobs chained with ``afterok``; jobs requeue themselves on their time limit or preemption.

Every task of every job runs :class:`TrainTask` (which runs ``worker.run_task``). The text
submitted is the one ``hpcllm.render.slurm.render_sbatch`` gives for the same parameters, and is
written as the run directory's ``job.sbatch`` before submitting.

Requeue: Slurm sends USR2 ``cluster.signal_before_min`` before the time limit (or a preemption
tool sends it, ``scancel --signal=USR2 JOBID``). The training loop's own handler turns it into a
checkpoint at the next step boundary on all ranks and ``run_task`` returns "stopped"; only then
does rank 0 ``scontrol requeue`` the job, which restarts from that checkpoint (resume=auto). A
stop that Slurm itself is carrying out (scancel's SIGTERM, the hard time limit) is not requeued,
nor a job already restarted ``cluster.max_requeue`` times, nor one that failed with an error.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hpcllm.launch.job import PreparedJob, write_text_atomic
from hpcllm.launch.lock import hand_to_slurm_job
from hpcllm.render.slurm import python_command, render_sbatch, slurm_parameters, submitit_folder

JOBS_DB = Path(os.environ.get("HPCLLM_JOBS_DB", Path.home() / ".cache" / "hpcllm" / "jobs.jsonl"))


class TrainTask(submitit.helpers.Checkpointable):
    """What every Slurm task runs. Checkpointable, so that a USR2 arriving before the training
    loop has installed its handlers (model still loading) also requeues the job."""

    def __init__(self, run_dir: str, max_requeue: int) -> None:
        self.run_dir = str(run_dir)
        self.max_requeue = max_requeue

    def __call__(self) -> str:
        from hpcllm.launch.worker import run_task

        env = submitit.JobEnvironment()
        node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        print(f"hpcllm: job {env.job_id} rank {env.global_rank}/{env.num_tasks} (local {env.local_rank}) "
              f"on node {node} (restart {_restarts()})", flush=True)
        status = run_task(self.run_dir)
        if status == "completed":
            return status
        if env.global_rank != 0:
            # Rank 0 decides; leave without a result so the requeued job's tasks write theirs.
            raise SystemExit(0)
        reason = self._no_requeue_reason(env.job_id)
        if reason:
            raise RuntimeError(f"stopped after saving a checkpoint in {self.run_dir}/checkpoints, not requeued: "
                               f"{reason}; submit the same run directory again to continue")
        subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60)
        print(f"hpcllm: checkpoint saved, job {env.job_id} requeued (restart {_restarts() + 1} "
              f"of at most {self.max_requeue})", flush=True)
        raise SystemExit(0)

    def _no_requeue_reason(self, job_id: str) -> str:
        if _restarts() >= self.max_requeue:
            return f"already restarted {_restarts()} times (cluster.max_requeue={self.max_requeue})"
        state = job_state(job_id)
        if state != "RUNNING":
            return f"Slurm is ending the job itself (state {state})"
        return ""


def _restarts() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip() or "UNKNOWN"


# -- what the site accepts, asked before anything queues -----------------------------------------


def test_only(sbatch_file: Path) -> tuple[bool, str]:
    """`sbatch --test-only`: Slurm checks the request (partition, account, QOS, limits, node shapes)
    and says when the job would start, without queueing it. (accepted, Slurm's words)."""
    out = subprocess.run(["sbatch", "--test-only", str(sbatch_file)], capture_output=True, text=True, timeout=120)
    said = " ".join((out.stderr + out.stdout).split())
    return out.returncode == 0, said.replace("sbatch: error: ", "").replace("sbatch: ", "")


def partition_facts(partition: str | None) -> dict | None:
    """CPUs, memory (GB) and GPUs per node of a partition (the default one when None), from sinfo."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G"], capture_output=True, text=True, timeout=60)
    for line in out.stdout.splitlines():
        name, cpus, mem_mb, gres = line.split("|")
        if (partition is None and name.endswith("*")) or name.rstrip("*") == partition:
            gpus = re.search(r"gpu(?::[^:,(]+)?:(\d+)", gres)
            return {"partition": name.rstrip("*"), "cpus_per_node": int(cpus.rstrip("+")),
                    "ram_gb_per_node": int(mem_mb.rstrip("+")) / 1024, "gpus_per_node": int(gpus.group(1)) if gpus else 0}
    return None


def disagreements(hw: DictConfig, facts: dict) -> list[str]:
    """Where the hw preset's guesses differ from the partition Slurm describes."""
    out = []
    checks = [("cpus_per_node", hw.cpus_per_node, facts["cpus_per_node"]),
              ("ram_gb_per_node", hw.ram_gb_per_node, facts["ram_gb_per_node"])]
    if hw.accelerator == "cuda":
        checks.append(("gpus_per_node", hw.gpus_per_node, facts["gpus_per_node"]))
    for key, preset, site in checks:
        if abs(preset - site) > 0.1 * max(preset, site):
            out.append(f"partition {facts['partition']} has {site:g} {key.replace('_', ' ')} but hw.{key}={preset:g} "
                       f"(hw={hw.name}): set hw.{key}={site:g} so that the plan and the request match the nodes")
    return out


def site_check(job: PreparedJob) -> None:
    """Pre-flight against the real cluster (cluster=slurm where sbatch exists): warn where sinfo
    contradicts the hw preset; refuse, like the estimate does, what `sbatch --test-only` rejects."""
    from hpcllm.plan import PreflightRefused

    cfg = job.cfg
    if cfg.cluster.name != "slurm" or cfg.preflight == "off" or shutil.which("sbatch") is None:
        return
    facts = partition_facts(cfg.hw.partition)
    for line in disagreements(cfg.hw, facts) if facts else []:
        print(f"hpcllm: warning: {line}", flush=True)
    if not cfg.cluster.test_only:
        return
    accepted, said = test_only(job.run_dir / "job.sbatch")
    if accepted:
        print(f"hpcllm: sbatch --test-only: {said}", flush=True)
        return
    message = (f"the cluster would reject {job.run_dir / 'job.sbatch'}: {said} (sbatch --test-only). Check "
               "hw.partition, hw.nodes, hw.gpus_per_node, cluster.account/qos/time_limit_min/mem_gb against "
               "`sinfo` and your site's limits; cluster.test_only=false skips this check")
    if cfg.preflight == "warn":
        print(f"hpcllm: warning: {message}", flush=True)
        return
    refused = PreflightRefused(message)
    refused.estimate = None
    raise refused


# -- submission -------------------------------------------------------------------------------


@dataclass
class Submitted:
    name: str
    run_dirs: list[Path]
    jobs: list = field(default_factory=list)


def _executor(params: dict, run_dir: Path, cfg: DictConfig) -> submitit.SlurmExecutor:
    executor = submitit.SlurmExecutor(folder=submitit_folder(str(run_dir)), max_num_timeout=cfg.cluster.max_requeue,
                                      python=python_command(cfg))
    executor.update_parameters(**params)
    return executor


def _submit_one(job: PreparedJob, dependency: str | None = None) -> submitit.Job:
    from hpcllm.launch.datasets import ensure_memmaps

    if dependency is None:
        ensure_memmaps(job.cfg, job.run_dir)  # fail here, not in the queue; a later pipeline stage may
        # need its predecessor's export (e.g. its tokenizer), so its rank 0 prepares the data when it starts
    params = dict(job.slurm_params)
    if dependency:
        # A stage whose predecessor failed is cancelled rather than left pending forever.
        params["dependency"] = dependency
        params["additional_parameters"] = dict(params["additional_parameters"], **{"kill-on-invalid-dep": "yes"})
        write_text_atomic(job.run_dir / "job.sbatch", render_sbatch(params, str(job.run_dir), python_command(job.cfg)))
    max_requeue = job.cfg.cluster.max_requeue
    slurm_job = _executor(params, job.run_dir, job.cfg).submit(TrainTask(str(job.run_dir), max_requeue))
    _record(slurm_job.job_id, job.run_dir, job.cfg)
    return slurm_job


def _submit_array(jobs: list[PreparedJob], folder: Path) -> list[submitit.Job]:
    """One job array for sweep points that ask for the same resources; it lives in `folder`."""
    from hpcllm.launch.datasets import ensure_memmaps

    cluster = jobs[0].cfg.cluster
    params = dict(slurm_parameters(jobs[0].cfg, jobs[0].derived, str(folder)),
                  array_parallelism=cluster.array_parallelism)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "job.sbatch", render_sbatch(dict(params, map_count=len(jobs)), str(folder),
                                                          python_command(jobs[0].cfg)))
    for job in jobs:
        ensure_memmaps(job.cfg, job.run_dir)
    executor = _executor(params, folder, jobs[0].cfg)
    with executor.batch():
        slurm_jobs = [executor.submit(TrainTask(str(job.run_dir), cluster.max_requeue)) for job in jobs]
    for slurm_job, job in zip(slurm_jobs, jobs):
        _record(slurm_job.job_id, job.run_dir, job.cfg)
    return slurm_jobs


def _record(job_id: str, run_dir: Path, cfg: DictConfig) -> None:
    """Remember which run directory a job id trains into (for tools/jobs.py); the job now holds its lock."""
    hand_to_slurm_job(run_dir, job_id)
    JOBS_DB.parent.mkdir(parents=True, exist_ok=True)
    entry = {"job_id": job_id, "run_dir": str(run_dir), "name": cfg.cluster.job_name,
             "stage": f"{cfg.method.name}/{cfg.model.name}", "submitted": time.time()}
    with JOBS_DB.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _announce(slurm_job: submitit.Job, run_dir: Path, what: str = "") -> None:
    log = slurm_job.paths.stdout
    print(f"hpcllm: submitted {what}job {slurm_job.job_id}: run dir {run_dir}\n"
          f"  logs  {log.parent}/{log.name.replace('_0_', '_<rank>_')} (rank 0: {log})\n"
          f"  follow: tail -F {log}    state: python tools/jobs.py status")


def _wait(slurm_jobs: list[submitit.Job]) -> int:
    """Block until every job has ended; 0 if all completed, else 1 (naming the failed ones)."""
    failed = []
    for slurm_job in slurm_jobs:
        slurm_job.wait()
        state = _final_state(slurm_job)
        try:
            slurm_job.results()
        except Exception as err:  # submitit re-raises the task's error text, or "no output" when killed
            failed.append(slurm_job.job_id)
            print(f"hpcllm: job {slurm_job.job_id} ended {state}: {str(err).strip().splitlines()[-1]}\n"
                  f"  log: {slurm_job.paths.stdout}", file=sys.stderr)
    for slurm_job in slurm_jobs:
        if slurm_job.job_id not in failed:
            print(f"hpcllm: job {slurm_job.job_id} completed")
    return 1 if failed else 0


def _final_state(slurm_job: submitit.Job, timeout_s: float = 120) -> str:
    """The tasks have written their results; wait (briefly) for Slurm to end the job too."""
    deadline = time.time() + timeout_s
    state = slurm_job.watcher.get_state(slurm_job.job_id, mode="force")
    while state in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED", "CONFIGURING") and time.time() < deadline:
        time.sleep(1)
        state = slurm_job.watcher.get_state(slurm_job.job_id, mode="force")
    return state


# -- sweeps: Hydra calls main once per point; the points are submitted together at the end ----

_SWEEP: list[PreparedJob] = []


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class SubmitSweep(Callback):
    """Hydra callback (hydra.callbacks in conf/config.yaml): submits the sweep's collected points
    as job arrays, one per distinct resource request, when the multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not _SWEEP:
            return
        jobs, folder = list(_SWEEP), Path(config.hydra.sweep.dir).resolve()
        _SWEEP.clear()
        groups: dict[str, list[PreparedJob]] = {}
        for job in jobs:
            key = json.dumps(slurm_parameters(job.cfg, job.derived, str(folder)), sort_keys=True, default=str)
            groups.setdefault(key, []).append(job)
        submitted = []
        for index, group in enumerate(groups.values()):
            array_folder = folder if len(groups) == 1 else folder / f"array{index}"
            slurm_jobs = _submit_array(group, array_folder)
            array_id = slurm_jobs[0].job_id.split("_")[0]
            print(f"hpcllm: submitted sweep job array {array_id}: {len(group)} points, at most "
                  f"{group[0].cfg.cluster.array_parallelism} at once, sbatch {array_folder}/job.sbatch")
            for slurm_job, job in zip(slurm_jobs, group):
                _announce(slurm_job, job.run_dir, "sweep point ")
            submitted.extend(slurm_jobs)
        if jobs[0].cfg.wait:
            code = _wait(submitted)
            if code:
                sys.exit(code)


# -- pipelines: stages composed like `launch.py` invocations, chained with afterok --------------


def _submit_pipeline(job: PreparedJob, stages: list) -> list[submitit.Job]:
    """The stages (hpcllm.launch.pipeline.prepare_stages) as jobs, each waiting for the one before (afterok)."""
    slurm_jobs: list[submitit.Job] = []
    for stage in stages:
        dependency = f"afterok:{slurm_jobs[-1].job_id}" if slurm_jobs else None
        slurm_jobs.append(_submit_one(stage.job, dependency))
        _announce(slurm_jobs[-1], stage.job.run_dir, f"pipeline {job.cfg.pipeline.name} stage {stage.name}: ")
    return slurm_jobs


def submit(job: PreparedJob, stages: list = ()) -> int:
    """Submit a prepared job, or a pipeline's prepared stages (or, inside a sweep, queue it for the
    array); wait if cfg.wait."""
    if _in_multirun():
        _SWEEP.append(job)
        return 0
    if stages:
        slurm_jobs = _submit_pipeline(job, stages)
    else:
        slurm_jobs = [_submit_one(job)]
        _announce(slurm_jobs[0], job.run_dir)
    return _wait(slurm_jobs) if job.cfg.wait else 0
