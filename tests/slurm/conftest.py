"""Fixtures for tests on the local Slurm cluster (tools/slurm_local.sh start)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True)
    return out.returncode == 0 and sum(" idle" in line or " mix" in line or " alloc" in line
                                       for line in out.stdout.splitlines()) >= 2


MISSING_CLUSTER = pytest.StashKey[str]()
NO_CLUSTER = "no local Slurm cluster with 2 nodes up (sinfo): run tools/slurm_local.sh start"


def slurm_required(config) -> bool:
    """CI must not go green without having tested a Slurm path: there a missing cluster fails."""
    return config.getoption("--require-slurm") or os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    slurm_items = [item for item in items if "slurm" in item.keywords]
    if not slurm_items or _cluster_up():
        return
    for item in slurm_items:
        if slurm_required(config):
            item.stash[MISSING_CLUSTER] = f"{NO_CLUSTER} (required: CI=true or --require-slurm)"
        else:
            item.add_marker(pytest.mark.skip(reason=NO_CLUSTER))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before any fixture runs, so no job is submitted to a cluster that is not there.
    if MISSING_CLUSTER in item.stash:
        pytest.fail(item.stash[MISSING_CLUSTER], pytrace=False)


@pytest.fixture(scope="session")
def jobs_db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobsdb") / "jobs.jsonl"


@pytest.fixture(scope="session")
def prebuilt_extensions() -> Path:
    """DeepSpeed's CPU shared-memory all-reduce op, built once for this checkout's environment, as the
    README says to prebuild ops: every job seeds its node-local TORCH_EXTENSIONS_DIR from here instead
    of compiling it again (90 s on this loaded machine, which would eat a 3-minute time limit)."""
    cache = ROOT / ".venv" / "torch_extensions"
    build = "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
    subprocess.run([sys.executable, "-c", build], check=True, capture_output=True, timeout=900,
                   env=dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), DS_ACCELERATOR="cpu"))
    return cache


@pytest.fixture(scope="session")
def launch(jobs_db, prebuilt_extensions):
    """launch(*overrides, multirun=False) -> CompletedProcess of `python launch.py ...`."""

    def run(*overrides: str, multirun: bool = False, check: bool = False, tool: str = "launch.py"):
        env = dict(os.environ, HPCLLM_JOBS_DB=str(jobs_db), HYDRA_FULL_ERROR="1",
                   TORCH_EXTENSIONS_DIR=str(prebuilt_extensions))
        cmd = [sys.executable, str(ROOT / tool), *(["-m"] if multirun else []), *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    return run
