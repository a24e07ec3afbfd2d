"""Failures of a real 2-rank job (`python launch.py`, tiny_llama on 2 CPU ranks): a stopped rank, a killed
launcher, a rank that raises. Each must end the job promptly, non-zero, naming the rank at fault."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from e2e_helpers import ROOT, env, launch_cmd, train_records

pytestmark = pytest.mark.e2e

LONG = ("train.max_steps=100000", "method.seq_len=64", "train.export=false")


def start(run_dir: Path, *overrides: str, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(launch_cmd(run_dir, *overrides), cwd=ROOT, env={**env(), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out waiting for the job")


def rank_record(run_dir: Path, rank: int) -> dict | None:
    path = run_dir / "logs" / "ranks" / f"rank{rank}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (dead, not yet reaped by whoever adopted it) is not alive."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_a_stopped_rank_is_detected_named_and_the_job_ends(tmp_path):
    """SIGSTOP stands in for a rank hung in a collective: the others wait for it forever without the watchdog."""
    proc = start(tmp_path, *LONG, "train.hang_timeout_min=0.2")
    wait_for(lambda: len(train_records(tmp_path)) >= 2 and rank_record(tmp_path, 1), proc)
    stopped = rank_record(tmp_path, 1)["pid"]
    os.kill(stopped, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if alive(stopped):  # let a failed test leave nothing stopped behind
            os.kill(stopped, signal.SIGKILL)
    assert proc.returncode == 124, out[-4000:]
    assert time.time() - stopped_at < 60  # 12 s of timeout, a few seconds to end the ranks
    console = out[out.index("hpcllm: watchdog"):]
    assert "no step progress for 0.2 min (train.hang_timeout_min=0.2)" in console
    # The stopped rank is named first, as not responding; rank 0, which noticed, as alive but waiting.
    assert f"stopped progressing: rank 1 on {rank_record(tmp_path, 1)['host']} (pid {stopped}" in console
    assert "process not responding" in console and "rank 0 on" in console
    assert "most recent call first" in console  # rank 0's Python stacks (faulthandler)
    assert "hpcllm: the job hung; rank 0" in console  # the launcher's summary
    assert not alive(stopped)  # the stopped rank was ended too
    failed = json.loads((tmp_path / "logs" / "ranks" / "rank0.failed.json").read_text())
    assert failed["kind"] == "hang" and "rank 1" in failed["error"]


def test_a_launcher_killed_with_sigkill_leaves_no_worker(tmp_path):
    proc = start(tmp_path, *LONG)
    wait_for(lambda: train_records(tmp_path), proc)  # both ranks are training
    workers = children(proc.pid)
    assert len(workers) == 2 and all(alive(pid) for pid in workers)
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not [pid for pid in workers if alive(pid)], "workers outlived their launcher"


SITECUSTOMIZE = '''
import os

if os.environ.get("RANK") == "1":  # only in the job's rank 1: its third training micro batch fails
    from hpcllm.stages.lm import LMStage

    loss, calls = LMStage.loss, []

    def failing_loss(self, engine, batch):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("injected for the test: rank 1 could not read its shard")
        return loss(self, engine, batch)

    LMStage.loss = failing_loss
'''


def test_b_the_first_failing_rank_its_host_and_cause_reach_the_console(tmp_path):
    """Rank 1 raises; rank 0 then only sees its peer vanish. The console must name rank 1 and its error."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)  # test-only code, injected from outside hpcllm
    run_dir = tmp_path / "run"
    started = time.time()
    proc = start(run_dir, *LONG, extra_env={"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-4000:]
    assert time.time() - started < 240
    assert [m["step"] for m in train_records(run_dir)] == [1, 2]  # the third step never completed
    summary = out[out.index("hpcllm: rank 1 on"):]
    assert "failed first" in summary
    assert "OSError: injected for the test: rank 1 could not read its shard" in summary.splitlines()[0]
    assert "the last" in summary and str(run_dir / "logs" / "rank1.log") in summary
    tail = [line for line in summary.splitlines() if line.startswith("  | ")]
    assert "OSError: injected for the test" in tail[-1] and any("failing_loss" in line for line in tail)
    # Rank 0 then failed on the closed connection (or, on a slow machine, was ended by the launcher).
    assert summary.splitlines()[-1].startswith("hpcllm: then: rank 0 ")
