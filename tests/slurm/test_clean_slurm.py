"""Cleaning as Slurm arrays on the local cluster: a 2-task array over two shards, one task cancelled,
then the same command resumes, redoing only that task, and the chain of dedup stages finishes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))
from test_clean_rules import FIXTURES, fixture_expectations, read_jsonl_zst  # noqa: E402

pytestmark = pytest.mark.slurm


def clean(out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "clean.py"), "preset=zh_web", f"input={FIXTURES / 'zh'}",
           f"output={out}", "cluster=slurm", "slurm.time=00:10:00", "slurm.mem_per_cpu_gb=1",
           "slurm.job_name=hpcllm-test-clean", "blacklist.enabled=true", f"blacklist.path={FIXTURES / 'blacklist.txt'}",
           *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def queued(job_ids) -> list:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(job_ids)], capture_output=True, text=True)
    return [line.split(maxsplit=2) for line in out.stdout.splitlines()]


def test_two_task_array_resumes_after_a_cancelled_task(tmp_path):
    out = tmp_path / "clean_out"
    jobs_file = out / "logs" / "slurm_jobs.json"
    all_jobs = []
    try:
        # Held at submission, so task 1 can be cancelled before it runs, whatever the machine's speed.
        first = clean(out, "+slurm.sbatch_args.hold=")
        assert first.returncode == 0, first.stderr[-3000:]
        jobs = json.loads(jobs_file.read_text())
        all_jobs += [j for j in jobs.values() if j]
        subprocess.run(["scancel", f"{jobs['filter']}_1"], check=True)
        subprocess.run(["scontrol", "release", *all_jobs], check=True)
        # Task 0 finishes; the later stages can never run and leave the queue (kill-on-invalid-dep).
        # (The cluster is shared: other jobs may hold the nodes for a while.)
        wait_for(lambda: (out / "logs" / "filter" / "completions" / "00000").exists(), 400, "filter task 0", every=1)
        wait_for(lambda: not queued(all_jobs), 60, "the later stages to leave the queue", every=1)
        assert not (out / "logs" / "filter" / "completions" / "00001").exists()
        assert not (out / "clean_report.json").exists()
        done_shard = out / "work" / "filtered" / "00000.jsonl.zst"
        stamp = done_shard.stat().st_mtime_ns

        second = clean(out, "wait=true", timeout=480)
        all_jobs += [j for j in json.loads(jobs_file.read_text()).values() if j]
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
        assert json.loads((out / "logs" / "filter" / "ranks_to_run.json").read_text()) == [1]
        assert done_shard.stat().st_mtime_ns == stamp  # the finished task was not redone
        assert not queued(all_jobs)

        expect = fixture_expectations("zh")
        kept = {r["id"] for r in read_jsonl_zst(str(out / "data" / "*.jsonl.zst"))}
        assert kept == {i for i, rule in expect.items() if rule == "keep"}
        report = json.loads((out / "clean_report.json").read_text())
        counts = {r["rule"]: r["documents"] for r in report["rules"]}
        assert counts["exact_dedup"] == 1 and counts["minhash_dedup"] == 1
        assert report["input"]["documents"] == len(expect)
    finally:
        if all_jobs:
            subprocess.run(["scancel", *all_jobs], capture_output=True)
