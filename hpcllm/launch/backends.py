"""Run a prepared job with the backend its cluster config names."""
from __future__ import annotations

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from hpcllm.config import ConfigError
from hpcllm.config.profiles import describe_extra_models
from hpcllm.launch.datasets import memmap_paths
from hpcllm.launch.job import PreparedJob, launch_refusals
from hpcllm.launch.pipeline import StageJob, describe, run_in_order


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _num_samples(job: PreparedJob) -> int | None:
    """Training rows per epoch, when the job's training memmap exists already."""
    train = memmap_paths(job.cfg, job.run_dir)["train"]
    meta = Path(train) / "meta.json" if train else None
    return json.loads(meta.read_text())["num_samples"] if meta and meta.is_file() else None


def plan(job: PreparedJob) -> None:
    """Pre-flight estimate (prints a table, writes estimate.json; refuses a job that will not fit).

    A sweep prints one capacity line per point instead of a table each."""
    if job.cfg.method.stage != "eval":  # inference only: the training estimate does not apply
        _estimate(job)
    if job.cfg.cluster.name == "slurm":
        from hpcllm.launch.slurm import site_check

        site_check(job)  # what the site itself would reject, before anything queues


def _estimate(job: PreparedJob) -> None:
    from hpcllm import plan as planner

    sweep = in_multirun()
    try:
        est = planner.preflight(job.cfg, job.derived, job.run_dir, num_samples=_num_samples(job), show=not sweep)
    except planner.PreflightRefused as refused:
        if not (sweep and job.cfg.dry_run):
            raise
        est = refused.estimate  # a capacity table lists the points that do not fit too
    if sweep and est is not None:
        print(f"{HydraConfig.get().job.num:>3}  {planner.capacity_line(job.cfg, est)}", flush=True)


def plan_all(jobs: list[PreparedJob]) -> list[str]:
    """Plan every job (a pipeline's stages); the refusals, each naming its run directory."""
    from hpcllm import plan as planner

    refusals = []
    for job in jobs:
        where = "" if len(jobs) == 1 else f"{job.run_dir.name}: "
        try:
            plan(job)
        except planner.PreflightRefused as refused:
            refusals.append(f"{where}{refused}")
        refusals += [f"{where}{refusal}" for refusal in launch_refusals(job.cfg)]
    return refusals


def show(job: PreparedJob, stages: list[StageJob] = ()) -> None:
    if stages:
        print(f"[dry run] pipeline {job.cfg.pipeline.name}: {len(stages)} stages, each a job of its own")
        for line in describe(stages, job.cfg.cluster.name):
            print(f"  {line}")
        for stage in stages:
            _show_one(stage.job)
        return
    _show_one(job)


def _show_one(job: PreparedJob) -> None:
    d = job.derived
    print(f"[dry run] {job.cfg.model.name} / {job.cfg.method.name} / {job.cfg.hw.name} x{job.cfg.hw.nodes} / "
          f"{job.cfg.zero.name}: world {d.world_size}, global batch {d.global_batch_size} = micro "
          f"{job.cfg.method.micro_batch_size} x dp {d.data_parallel_size} x accum {d.grad_accum_steps}, {d.precision}")
    for line in describe_extra_models(job.cfg):
        print(f"  {line}")
    for key, source in job.cfg.method.recipe_sources.items():
        print(f"  method.{key} = {source}")
    for path in [job.run_dir / "config.yaml", *sorted(job.run_dir.glob("ds_config*.json")),
                 job.run_dir / "job.sbatch", job.run_dir / "estimate.json"]:
        if path.exists():
            print(f"  {path}")


def run(job: PreparedJob, stages: list[StageJob] = ()) -> int:
    refusals = [refusal for one in [stage.job for stage in stages] or [job] for refusal in launch_refusals(one.cfg)]
    if refusals:
        raise ConfigError("; ".join(refusals))
    if job.cfg.cluster.name == "local":
        return run_in_order(stages, run_here) if stages else run_here(job)
    from hpcllm.launch.slurm import submit

    return submit(job, stages)


def run_here(job: PreparedJob) -> int:
    """cluster=local: check this machine against hw, prepare the data, start every rank here."""
    from hpcllm.data.tokenizer import untrusted_code
    from hpcllm.launch.datasets import ensure_memmaps
    from hpcllm.launch.local import run_local
    from hpcllm.launch.machine import check_local_machine

    for warning in check_local_machine(job.cfg, job.derived):
        print(f"hpcllm: warning: {warning}", flush=True)
    try:
        ensure_memmaps(job.cfg, job.run_dir)
    except ValueError as err:
        if not untrusted_code(err):
            raise
        raise ConfigError(str(err)) from None  # one sentence saying what to set, not a traceback
    return run_local(job.run_dir, job.derived.world_size, job.cfg.hw.accelerator)
