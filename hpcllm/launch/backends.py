"""Run a prepared job with the backend its cluster config names."""
from __future__ import annotations

from hpcllm.launch.job import PreparedJob


def plan(job: PreparedJob) -> None:
    """Pre-flight estimate (prints a table, writes estimate.json; refuses a job that will not fit)."""
    from hpcllm import plan as planner

    planner.preflight(job.cfg, job.derived, job.run_dir)


def show(job: PreparedJob) -> None:
    d = job.derived
    print(f"[dry run] {job.cfg.model.name} / {job.cfg.method.name} / {job.cfg.hw.name} x{job.cfg.hw.nodes} / "
          f"{job.cfg.zero.name}: world {d.world_size}, global batch {d.global_batch_size} = micro "
          f"{job.cfg.method.micro_batch_size} x dp {d.data_parallel_size} x accum {d.grad_accum_steps}, {d.precision}")
    for name in ("config.yaml", "ds_config.json", "job.sbatch", "estimate.json"):
        path = job.run_dir / name
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
