"""The one callable every task runs - local process, srun task or submitit job alike:
read the run directory's config, join the process group, run the stage's job."""
from __future__ import annotations

import sys
from pathlib import Path

from hpcllm import distributed
from hpcllm.launch.health import join_checked
from hpcllm.launch.job import load_config


def run_task(run_dir: str) -> str:
    """Run this task's share of the job; returns the stage's status ("completed" or "stopped")."""
    import torch.multiprocessing

    # file_system sharing avoids "too many open files" from data loader workers on big nodes.
    torch.multiprocessing.set_sharing_strategy("file_system")
    cfg = load_config(run_dir)
    dist = distributed.from_environment(cfg.cluster.port_base)
    join_checked(cfg, run_dir, dist)
    from hpcllm.stages import run_stage

    status = run_stage(cfg, Path(run_dir), dist)
    distributed.shutdown()  # not on an error: the other ranks may never reach it
    return status


if __name__ == "__main__":
    status = run_task(sys.argv[1])
    sys.exit(0 if status == "completed" else 3)
