"""CI must not go green without its Slurm cluster: under CI=true a missing cluster fails the Slurm tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SLURM_TEST = "tests/slurm/test_slurm.py::test_two_node_job_trains_and_exports"


def _pytest_without_sinfo(tmp_path, *args, ci: str):
    # An empty PATH hides sinfo/sbatch, as on a machine whose cluster failed to start.
    env = dict(os.environ, PATH=str(tmp_path), CI=ci)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SLURM_TEST, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_missing_cluster_fails_under_ci(tmp_path):
    proc = _pytest_without_sinfo(tmp_path, ci="true")
    assert proc.returncode != 0, proc.stdout
    assert "no local Slurm cluster" in proc.stdout and "passed" not in proc.stdout.splitlines()[-1]


def test_missing_cluster_fails_with_require_flag(tmp_path):
    proc = _pytest_without_sinfo(tmp_path, "--require-slurm", ci="")
    assert proc.returncode != 0, proc.stdout


def test_missing_cluster_skips_locally_with_the_reason(tmp_path):
    proc = _pytest_without_sinfo(tmp_path, "-rs", ci="")
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout and "tools/slurm_local.sh start" in proc.stdout
