"""Run the cleaning stages here (datatrove's LocalPipelineExecutor, a process pool) or as Slurm arrays
(datatrove's SlurmPipelineExecutor, one array per stage chained by afterok). A rerun on the same
OUTPUT resumes: completed tasks are skipped by their completion markers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from omegaconf import OmegaConf

from hpcllm.clean.config import CleanConfigError, validate
from hpcllm.clean.pipeline import Layout, Stage, build_stages
from hpcllm.clean.records import input_root, list_inputs
from hpcllm.clean.report import WriteReport

# Settings that may change between a run and its resumption; anything else changes the result.
RUN_ONLY_KEYS = ("workers", "cluster", "wait", "overwrite", "slurm")


class ArraySlurmExecutor(SlurmPipelineExecutor):
    """datatrove's Slurm executor with optional partition/account and no separate stats-merging job
    (each task's stats stay in logs/<stage>/stats/; an extra job per stage only clutters the queue)."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        if not self.partition:
            args.pop("partition")
        return args

    def launch_merge_stats(self):
        pass


def prepare_output(cfg, layout: Layout) -> int:
    """Create OUTPUT (or check that it holds a run of the same config) and fix the input list; returns its length."""
    if cfg.overwrite and os.path.exists(layout.root):
        shutil.rmtree(layout.root)
    saved = os.path.join(layout.root, "clean_config.yaml")
    identity = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in RUN_ONLY_KEYS}
    if os.path.exists(saved):
        previous = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(saved)).items() if k not in RUN_ONLY_KEYS}
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise CleanConfigError(f"output={cfg.output!r} holds a run with a different config (changed: "
                                   f"{', '.join(changed)}): resume it with the same settings, pick another output, "
                                   "or pass overwrite=true")
        with open(layout.inputs, encoding="utf-8") as f:
            return sum(1 for _ in f)
    elif os.path.exists(layout.root) and os.listdir(layout.root):
        raise CleanConfigError(f"output={cfg.output!r} exists and is not a cleaning run: pick another output "
                               "or pass overwrite=true")
    files = list_inputs(cfg.input)
    os.makedirs(layout.work, exist_ok=True)
    root = input_root(cfg.input)
    with open(layout.inputs, "w", encoding="utf-8") as f:
        f.writelines(os.path.relpath(p, root) + "\n" for p in files)
    OmegaConf.save(cfg, saved)
    return len(files)


def _local(stage: Stage, layout: Layout, workers: int, depends) -> LocalPipelineExecutor:
    return LocalPipelineExecutor(stage.steps, tasks=stage.tasks, workers=min(workers, stage.tasks),
                                 logging_dir=os.path.join(layout.logs, stage.name), depends=depends)


def _slurm(stage: Stage, layout: Layout, cfg, depends) -> ArraySlurmExecutor:
    s = cfg.slurm
    # As hpcllm's own pipelines: a stage whose predecessor failed or was cancelled leaves the queue
    # instead of pending forever; rerunning the command resubmits what is unfinished.
    sbatch = {"kill-on-invalid-dep": "yes", **s.sbatch_args}
    if s.account:
        sbatch["account"] = s.account
    return ArraySlurmExecutor(
        stage.steps, tasks=stage.tasks, time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
        mem_per_cpu_gb=s.mem_per_cpu_gb, workers=s.array_parallelism, job_name=f"{s.job_name}-{stage.name}",
        qos=s.qos, env_command=f"export PATH={os.path.dirname(sys.executable)}:$PATH", sbatch_args=sbatch,
        logging_dir=os.path.join(layout.logs, stage.name), depends=depends, mail_type="NONE")


def run_clean(cfg) -> Optional[dict]:
    """Clean ``cfg.input`` into ``cfg.output``; returns the report (local, or Slurm with wait=true)."""
    validate(cfg)
    layout = Layout(cfg.output)
    num_files = prepare_output(cfg, layout)
    config = OmegaConf.to_container(cfg, resolve=True)
    stages = build_stages(cfg, num_files) + [Stage("report", [WriteReport(layout.root, config,
                                                                          cfg.examples_per_rule)], 1)]
    if cfg.cluster == "local":
        # The report is rewritten on every run, so it reflects the parts of all runs together.
        shutil.rmtree(os.path.join(layout.logs, "report", "completions"), ignore_errors=True)
        executor = None
        for stage in stages:
            executor = _local(stage, layout, cfg.workers or os.cpu_count() or 1, executor)
        executor.run()
        return load_report(layout)
    return submit_slurm(cfg, stages, layout)


def load_report(layout: Layout) -> dict:
    with open(os.path.join(layout.root, "clean_report.json"), encoding="utf-8") as f:
        return json.load(f)


def _queued(job_ids) -> dict:
    """job id -> (state, reason) of those still in the queue (array tasks folded into their job)."""
    if not job_ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-o", "%F %T %r", "-j", ",".join(job_ids)], capture_output=True, text=True)
    found = {}
    for line in out.stdout.splitlines():
        job, state, reason = line.split(maxsplit=2)
        found.setdefault(job, (state, reason))
    return found


def _doomed(order, queued: dict) -> list:
    """Queued jobs that can never run: the first stage (in chain order) whose dependency failed or was
    cancelled, and every stage after it, as each waits on the one before."""
    first = next((i for i, j in enumerate(order) if "DependencyNeverSatisfied" in queued.get(j, ("", ""))[1]), None)
    return [] if first is None else [j for j in order[first:] if j in queued]


def _clear_stale_jobs(jobs_file: str) -> None:
    """Jobs of a previous submission: cancel those that can never start; refuse while any other is
    queued or running, as both submissions would write the same files."""
    if not os.path.exists(jobs_file):
        return
    with open(jobs_file, encoding="utf-8") as f:
        order = [j for j in json.load(f).values() if j]
    queued = _queued(order)
    doomed = _doomed(order, queued)
    active = {j: s for j, s in queued.items() if j not in doomed}
    if active:
        jobs = ", ".join(f"job {j} {state}" for j, (state, _) in active.items())
        raise CleanConfigError(f"a previous submission for this output is still queued or running ({jobs}): "
                               "wait for it or scancel it")
    if doomed:
        subprocess.run(["scancel", *doomed], check=False)


def submit_slurm(cfg, stages, layout: Layout) -> Optional[dict]:
    jobs_file = os.path.join(layout.logs, "slurm_jobs.json")
    _clear_stale_jobs(jobs_file)
    executors, executor = [], None
    for stage in stages:
        executor = _slurm(stage, layout, cfg, executor)
        executors.append((stage.name, executor))
    executor.run()  # launches the whole chain, dependencies first
    jobs = {name: (str(ex.job_id) if ex.job_id not in (None, -1) else None) for name, ex in executors}
    os.makedirs(layout.logs, exist_ok=True)
    with open(jobs_file, "w", encoding="utf-8") as f:
        json.dump(jobs, f, indent=1)
    print("clean: submitted " + ", ".join(f"{name} job {j}" for name, j in jobs.items() if j) +
          f"; the report will be {os.path.join(layout.root, 'clean_report.md')}")
    if not cfg.wait:
        return None
    return wait_for_jobs(layout, [j for j in jobs.values() if j])


def wait_for_jobs(layout: Layout, job_ids, poll_s: float = 2.0) -> dict:
    """Block until the submitted jobs left the queue; the report, or an error naming the unfinished stages."""
    while True:
        queued = _queued(job_ids)
        if not queued or len(_doomed(job_ids, queued)) == len(queued):
            break
        time.sleep(poll_s)
    done = os.path.exists(os.path.join(layout.logs, "report", "completions", "00000"))
    if not done:
        raise RuntimeError(f"the cleaning jobs stopped before the report: see {layout.logs}/*/slurm_logs; "
                           "rerun the same command to resume (finished tasks are skipped)")
    return load_report(layout)
