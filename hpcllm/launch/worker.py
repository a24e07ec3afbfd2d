"""The one callable every task runs - local process, srun task or submitit job alike:
read the run directory's config, join the process group, run the stage's job."""
from __future__ import annotations

import sys
from pathlib import Path

from hpcllm import distributed
from hpcllm.launch.health import join_checked
from hpcllm.launch.job import load_config
from hpcllm.launch.lock import RunDirLocked, RunLock, acquire
from hpcllm.train.watchdog import failure_recorded


def run_task(run_dir: str) -> str:
    """Run this task's share of the job; returns the stage's status ("completed" or "stopped")."""
    import torch.multiprocessing

    # file_system sharing avoids "too many open files" from data loader workers on big nodes.
    torch.multiprocessing.set_sharing_strategy("file_system")
    cfg = load_config(run_dir)
    dist = distributed.from_environment(cfg.cluster.port_base)
    join_checked(cfg, run_dir, dist)
    lock = _run_lock(Path(run_dir), dist)
    from hpcllm.stages import run_stage

    status = run_stage(cfg, Path(run_dir), dist)
    if lock is not None and status != "stopped":  # a stopped job may be requeued: its id keeps the lock
        lock.release()
    distributed.shutdown()  # not on an error: the other ranks may never reach it
    return status


def _run_lock(run_dir: Path, dist: distributed.DistEnv) -> RunLock | None:
    """Rank 0 takes the run directory's lock (or joins its launcher's, or takes over its Slurm job's);
    every rank stops if another launch holds it."""
    lock, refusal = None, ""
    if dist.is_main:
        try:
            lock = acquire(run_dir, release_at_exit=False)
        except RunDirLocked as err:
            refusal = str(err)
    if distributed.all_reduce([1.0 if refusal else 0.0], op="max")[0]:
        raise RunDirLocked(refusal or f"rank 0 found {run_dir} in use by another launch (see its log)")
    return lock


if __name__ == "__main__":
    with failure_recorded(sys.argv[1]):  # when and why, so the launcher can name the rank that failed first
        status = run_task(sys.argv[1])
    sys.exit(0 if status == "completed" else 3)
