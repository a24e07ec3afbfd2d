"""Where runs go and how much room they have: runs root, the user's quota (lfs quota / quota), and the
partition facts sinfo gives against the hw preset."""
import os
import stat
import subprocess
import sys
from pathlib import Path

from hpcllm.config import PROJECT_ROOT, compose, derive
from hpcllm.launch.slurm import disagreements
from hpcllm.plan import estimate
from hpcllm.plan.quota import mount_point, parse_lfs_quota, parse_quota, quota_warning

LFS_SHORT = "      /lustre  9437184*  10485760 11534336       -   12345       0       0       -\n"
LFS_LONG = "/very/long/lustre/mount/name\n               1048576  0  10485760  -  12  0  0  -\n"
QUOTA_W = """Disk quotas for user alice (uid 1000):
     Filesystem  blocks   quota   limit   grace   files   quota   limit   grace
      /dev/sdb1  900000  1000000  1100000            1000       0       0
"""


def test_quota_outputs_are_read():
    short = parse_lfs_quota(LFS_SHORT, "/lustre")
    assert (short.used, short.limit) == (9437184 * 1024, 10485760 * 1024)  # the soft quota counts
    long = parse_lfs_quota(LFS_LONG, "/very/long/lustre/mount/name")
    assert (long.used, long.limit) == (1048576 * 1024, 10485760 * 1024)  # no soft quota: the hard limit
    assert parse_lfs_quota("  /lustre 5 0 0 - 1 0 0 -", "/lustre") is None  # no limit set
    assert parse_quota(QUOTA_W, ("/home", "/dev/sdb1")).used == 900000 * 1024
    assert parse_quota(QUOTA_W, ("/scratch",)) is None
    assert "90%" in quota_warning(short, "/") and quota_warning(long, "/") is None


def _fake_lfs(bin_dir: Path, used_kib: int, quota_kib: int) -> None:
    """Lustre cannot run here: an `lfs` that answers like `lfs quota -q -u USER MOUNT` does."""
    bin_dir.mkdir()
    script = bin_dir / "lfs"
    script.write_text(f'#!/bin/sh\necho "  $5 {used_kib}  {quota_kib} 0 - 1 0 0 -"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_the_disk_check_counts_the_quota_not_the_filesystem(tmp_path, monkeypatch):
    """50 GiB quota with 45 GiB used: 5 GiB left whatever the filesystem has free; 90% used warns."""
    _fake_lfs(tmp_path / "bin", 45 * 2**20, 50 * 2**20)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    cfg = compose(["model=tiny_llama"], run_dir=tmp_path / "run")
    est = estimate(cfg, derive(cfg), run_dir=str(tmp_path / "run"))
    assert abs(est.disk_free_gb - 5.0) < 0.01
    assert any(note.startswith("disk quota: 90% of your 50 GiB quota on " + mount_point(str(tmp_path)))
               for note in est.notes)


def test_runs_go_to_the_runs_root(tmp_path):
    """HPCLLM_RUNS (a scratch filesystem) and cluster.runs_root, the latter winning, instead of ./runs."""
    def run_dir(*overrides, env=None):
        out = subprocess.run([sys.executable, os.path.join(PROJECT_ROOT, "launch.py"), "dry_run=true", *overrides],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300,
                             env=dict(os.environ, DS_ACCELERATOR="cpu", **(env or {})))
        assert out.returncode == 0, out.stderr
        return next(Path(line.strip()).parent for line in out.stdout.splitlines() if line.strip().endswith("config.yaml"))

    scratch = tmp_path / "scratch"
    assert run_dir(env={"HPCLLM_RUNS": str(scratch)}).is_relative_to(scratch)
    assert run_dir(f"cluster.runs_root={tmp_path / 'root'}", env={"HPCLLM_RUNS": str(scratch)}).is_relative_to(
        tmp_path / "root")


def test_partition_facts_that_contradict_the_preset_are_named():
    cfg = compose(["hw=a100x8"])
    facts = {"partition": "gpu", "cpus_per_node": 64, "ram_gb_per_node": 1000.0, "gpus_per_node": 4}
    lines = disagreements(cfg.hw, facts)
    assert any("64 cpus per node but hw.cpus_per_node=128" in line and "set hw.cpus_per_node=64" in line for line in lines)
    assert any("hw.gpus_per_node=8" in line for line in lines)
    assert not any("ram" in line for line in lines)  # 1000 vs 1024 GB: close enough
