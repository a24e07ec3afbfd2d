"""This user's hpcllm jobs: state from Slurm, progress from their run directories; cancel them.

Which run directory a job trains into is recorded at submission (hpcllm.launch.slurm.JOBS_DB);
the state comes from sacct (squeue where there is no accounting).
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hpcllm.launch.slurm import JOBS_DB

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "CONFIGURING", "COMPLETING", "RESIZING", "REQUEUE_HOLD"}


@dataclass
class JobInfo:
    job_id: str
    state: str
    stage: str
    run_dir: Path
    step: int | None
    loss: float | None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _recorded() -> dict[str, dict]:
    if not JOBS_DB.exists():
        return {}
    entries = (json.loads(line) for line in JOBS_DB.read_text().splitlines() if line.strip())
    return {entry["job_id"]: entry for entry in entries}


def _states(job_ids: list[str]) -> dict[str, str]:
    if not job_ids:
        return {}
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True)
    if out.returncode != 0:  # no accounting: only what the controller still knows
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(job_ids)], capture_output=True, text=True)
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id] = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
    return states


def progress(run_dir: Path) -> tuple[int | None, float | None]:
    """(last step logged, its loss) from metrics.jsonl, else the newest checkpoint's step."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in reversed(metrics.read_text().splitlines()):
            record = json.loads(line) if line.strip() else {}
            if "step" in record and "loss" in record:
                return int(record["step"]), float(record["loss"])
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    return (int(steps[-1].split("_")[1]), None) if steps else (None, None)


def list_jobs(include_finished: bool = True) -> list[JobInfo]:
    recorded = _recorded()
    states = _states(list(recorded))
    jobs = []
    for job_id, entry in recorded.items():
        run_dir = Path(entry["run_dir"])
        step, loss = progress(run_dir)
        info = JobInfo(job_id, states.get(job_id, "UNKNOWN"), entry.get("stage", ""), run_dir, step, loss)
        if include_finished or info.active:
            jobs.append(info)
    return jobs


def cancel(job_ids: list[str] | None = None) -> list[str]:
    """scancel the given jobs (default: every active hpcllm job of this user); returns those cancelled.
    The training loop saves a checkpoint on scancel's SIGTERM if it can within Slurm's KillWait."""
    active = [job.job_id for job in list_jobs(include_finished=False)]
    targets = [j for j in job_ids if j in active] if job_ids else active
    if targets:
        subprocess.run(["scancel", *targets], check=True)
    return targets


def format_table(jobs: list[JobInfo]) -> str:
    rows = [("JOBID", "STATE", "STAGE", "STEP", "LOSS", "RUN DIR")]
    for job in jobs:
        rows.append((job.job_id, job.state, job.stage, "-" if job.step is None else str(job.step),
                     "-" if job.loss is None else f"{job.loss:.4f}", str(job.run_dir)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)
