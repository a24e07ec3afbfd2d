"""run_info.json: what ran, attempt by attempt - code version, library versions, nodes, restarts.

Rank 0 appends one record per attempt (a requeued job is a new attempt of the same run) under
``attempts``; the training loop adds its own numbers beside them. A dirty checkout's diff is saved
beside the file (``run_info.attempt<N>.diff``) so that the exact code can be rebuilt.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from hpcllm.config import PROJECT_ROOT

PACKAGES = ("torch", "deepspeed", "transformers", "peft", "submitit", "hydra-core")


def _run(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(root: str | None = None) -> tuple[dict, str]:
    """({commit, dirty}, diff against HEAD) of hpcllm's checkout; commit None where it is not one."""
    root = root or PROJECT_ROOT
    commit = _run("git", "-C", root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}, ""
    status = _run("git", "-C", root, "status", "--porcelain", "--untracked-files=no") or ""
    diff = _run("git", "-C", root, "diff", "HEAD") if status.strip() else ""
    return {"commit": commit.strip(), "dirty": bool(status.strip())}, diff or ""


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found.update(_cuda_versions())
    return found


def _cuda_versions() -> dict:
    import torch

    cuda = {"cuda": torch.version.cuda, "nccl": None, "cuda_driver": None}
    if torch.cuda.is_available():
        cuda["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        cuda["cuda_driver"] = driver.splitlines()[0].strip() if driver else None
    return cuda


def attempt_record(records: list[dict]) -> dict:
    env = os.environ
    hosts = list(dict.fromkeys(record["host"] for record in records))
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm_job_id": (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in env
                         else env.get("SLURM_JOB_ID")),
        "restart_count": int(env.get("SLURM_RESTART_COUNT", "0")),
        "node_list": env.get("SLURM_JOB_NODELIST") or ",".join(hosts),
        "hosts": hosts,
        "world_size": len(records),
        "versions": versions(),
    }


def record_attempt(run_dir: str | Path, records: list[dict]) -> dict:
    """Append this attempt to run_dir/run_info.json (rank 0 only) and return it."""
    path = Path(run_dir) / "run_info.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    attempts = info.setdefault("attempts", [])
    attempt = {"attempt": len(attempts) + 1, **attempt_record(records)}
    git, diff = git_state()
    attempt["git"] = git
    if diff:
        diff_path = path.with_name(f"run_info.attempt{attempt['attempt']}.diff")
        diff_path.write_text(diff)
        attempt["git"]["diff"] = diff_path.name
    attempts.append(attempt)
    path.write_text(json.dumps(info, indent=2) + "\n")
    return attempt
