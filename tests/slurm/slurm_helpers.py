"""Helpers for the tests on the local Slurm cluster: job ids from launch.py output, sacct, polling."""
from __future__ import annotations

import re
import subprocess
import time

# Small and fast: 1 task per node, short sequences; every job shares these.
TINY = ["cluster=slurm", "hw=cpu", "hw.gpus_per_node=1", "method.seq_len=64"]


def job_ids(stdout: str) -> list[str]:
    return re.findall(r"job (\S+): run dir", stdout)


def sacct(job_id: str, fields: str = "State") -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", fields], capture_output=True, text=True)
    return [value.split(" by ")[0] for value in out.stdout.strip().split("|")]  # "CANCELLED by 0"


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def scontrol_job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)
