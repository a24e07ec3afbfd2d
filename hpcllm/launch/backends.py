"""Run a prepared job with the backend its cluster config names."""
from __future__ import annotations

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from hpcllm.config.profiles import describe_extra_models
from hpcllm.launch.datasets import memmap_paths
from hpcllm.launch.job import PreparedJob


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


def show(job: PreparedJob) -> None:
    d = job.derived
    print(f"[dry run] {job.cfg.model.name} / {job.cfg.method.name} / {job.cfg.hw.name} x{job.cfg.hw.nodes} / "
          f"{job.cfg.zero.name}: world {d.world_size}, global batch {d.global_batch_size} = micro "
          f"{job.cfg.method.micro_batch_size} x dp {d.data_parallel_size} x accum {d.grad_accum_steps}, {d.precision}")
    for line in describe_extra_models(job.cfg):
        print(f"  {line}")
    for path in [job.run_dir / "config.yaml", *sorted(job.run_dir.glob("ds_config*.json")),
                 job.run_dir / "job.sbatch", job.run_dir / "estimate.json"]:
        if path.exists():
            print(f"  {path}")


def run(job: PreparedJob) -> int:
    if job.cfg.cluster.name == "local":
        from hpcllm.launch.datasets import ensure_memmaps
        from hpcllm.launch.local import run_local

        ensure_memmaps(job.cfg, job.run_dir)
        return run_local(job.run_dir, job.derived.world_size, job.cfg.hw.accelerator)
    from hpcllm.launch.slurm import submit

    return submit(job)
