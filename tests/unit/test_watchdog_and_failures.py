"""The hang watchdog, failure records and the local launcher's report, with real processes but no
DeepSpeed (the 2-rank runs are in tests/e2e/test_failures.py)."""
import json
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from hpcllm.config import ConfigError, compose, derive
from hpcllm.launch import local
from hpcllm.train.metrics import MetricWindow
from hpcllm.train.watchdog import HANG_EXIT_CODE, failure_recorded, ranks_dir, read_failures


def write_rank_record(run_dir, rank, **fields):
    now = time.time()
    record = {"rank": rank, "host": "node7", "pid": 4242, "step": 4, "phase": "training", "last_progress": now,
              "heartbeat": now, "started": now, "interval_s": 0.5, **fields}
    ranks_dir(run_dir).mkdir(parents=True, exist_ok=True)
    (ranks_dir(run_dir) / f"rank{rank}.json").write_text(json.dumps(record))


def test_watchdog_dumps_the_stacks_and_exits_naming_the_frozen_rank_first(tmp_path):
    # Rank 1 froze 100 s ago (no heartbeat); rank 0 makes one step, then waits "in a collective".
    write_rank_record(tmp_path, 1, last_progress=time.time() - 100, heartbeat=time.time() - 100)
    script = textwrap.dedent(f"""
        import time
        from hpcllm.train.watchdog import Watchdog

        def waiting_in_a_collective():
            time.sleep(60)

        Watchdog({str(tmp_path)!r}, rank=0, world_size=2, timeout_min=0.02).start().progress(5)
        waiting_in_a_collective()
        """)
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == HANG_EXIT_CODE
    assert time.time() - started < 30
    err = proc.stderr
    assert re.search(r"no step progress for 0.02 min \(train.hang_timeout_min=0.02\); stopped progressing: rank 1 on "
                     r"node7 \(pid 4242\): process not responding for 10\d s \(stopped, or stuck without releasing "
                     r"the GIL; last heard of at step 4, training\)", err), err
    assert "rank 0 on" in err.split("stopped progressing:")[1] and "alive, no progress" in err
    assert "waiting_in_a_collective" in err and "most recent call first" in err  # faulthandler's stacks
    [failure] = read_failures(tmp_path)
    assert failure["rank"] == 0 and failure["kind"] == "hang" and "rank 1 on node7" in failure["error"]


def test_watchdog_off_and_a_progressing_rank_stay_quiet(tmp_path):
    from hpcllm.train.watchdog import Watchdog

    with Watchdog(tmp_path, 0, 1, timeout_min=0) as off:
        assert not off.enabled
    assert not ranks_dir(tmp_path).exists()
    with Watchdog(tmp_path, 0, 1, timeout_min=0.02) as dog:  # 1.2 s, heartbeat every 0.5 s
        for step in range(1, 9):
            time.sleep(0.25)
            dog.progress(step)
    record = json.loads((ranks_dir(tmp_path) / "rank0.json").read_text())
    assert record["step"] == 8 and record["phase"] == "finished"
    assert read_failures(tmp_path) == []


def test_a_record_of_an_earlier_run_is_not_taken_for_this_one(tmp_path):
    from hpcllm.train.watchdog import Watchdog

    write_rank_record(tmp_path, 1, started=time.time() - 3600, heartbeat=time.time() - 3500)
    with Watchdog(tmp_path, 0, 2, timeout_min=1) as dog:
        assert dog.stalled_ranks()[0] == "rank 1: no progress record of this run (it never started training)"


def test_failure_recorded_keeps_when_and_why_a_rank_failed_first(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(OSError):
        with failure_recorded(tmp_path):
            raise OSError("checkpoint shard truncated\nsecond line")
    with pytest.raises(RuntimeError):  # the echo on the way out does not replace the cause
        with failure_recorded(tmp_path):
            raise RuntimeError("Connection closed by peer")
    [record] = read_failures(tmp_path)
    assert record["rank"] == 3 and record["error"] == "OSError: checkpoint shard truncated"
    assert record["host"] == socket.gethostname() and record["kind"] == "error"


def rank_process(tmp_path, rank, code):
    """A stand-in for a rank: ``code`` in a process; rank 0 writes to the console, the others to a log."""
    log = None if rank == 0 else tmp_path / "logs" / f"rank{rank}.log"
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env={"RANK": str(rank)},
                            stdout=open(log, "w") if log else subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return local.RankProcess(rank, proc, log)


def test_the_launcher_names_the_rank_that_failed_first_not_the_first_to_exit(tmp_path, monkeypatch):
    """Rank 1 fails first but lingers (a slow teardown); rank 2 fails after it and exits at once; rank 0
    hangs and is ended by the launcher. The report names rank 1 and shows the end of its log."""
    monkeypatch.setattr(local, "PEER_GRACE_S", 3.0)
    run = str(tmp_path)
    fail = """
        import sys, time
        from hpcllm.train.watchdog import failure_recorded
        time.sleep({before})
        try:
            with failure_recorded({run!r}):
                raise OSError({message!r})
        except OSError as err:
            print("Traceback (most recent call last): ...", "OSError:", err, sep="\\n", flush=True)
        time.sleep({after})
        sys.exit({code})
        """
    ranks = [rank_process(tmp_path, 0, "import time; time.sleep(60)"),
             rank_process(tmp_path, 1, fail.format(before=0.2, run=run, message="shard unreadable", after=1.5, code=7)),
             rank_process(tmp_path, 2, fail.format(before=1.0, run=run, message="Connection closed by peer", after=0,
                                                   code=1))]
    assert local._wait_all(tmp_path, ranks) == 7
    assert ranks[2].exited_at < ranks[1].exited_at  # rank 2 was seen to exit first
    report = local.failure_report(tmp_path, ranks)
    lines = report.splitlines()
    assert lines[0].startswith(f"hpcllm: rank 1 on {socket.gethostname()} failed first (at ")
    assert lines[0].endswith("UTC): OSError: shard unreadable")
    assert lines[1] == f"hpcllm: the last 3 lines of {tmp_path / 'logs' / 'rank1.log'}:"
    assert lines[-2] == "  | shard unreadable"
    assert lines[-1].startswith("hpcllm: then: rank 0 was ended by the launcher, rank 2 exited with code 1")
    assert ranks[0].proc.returncode == -9


def test_a_rank_killed_without_a_record_is_named_by_its_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "PEER_GRACE_S", 0.5)
    ranks = [rank_process(tmp_path, 0, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"),
             rank_process(tmp_path, 1, "import time; time.sleep(60)")]
    assert local._wait_all(tmp_path, ranks) == 128 + 9
    lines = local.failure_report(tmp_path, ranks).splitlines()
    assert lines[0].startswith("hpcllm: rank 0 on ") and lines[0].endswith("UTC): killed by SIGKILL")
    assert lines[1:] == ["hpcllm: its output is above", f"hpcllm: then: rank 1 was ended by the launcher "
                                                        f"(logs in {tmp_path / 'logs'})"]


def test_metric_window_averages_device_tensors_and_floats_then_empties():
    window = MetricWindow()
    window.add({"loss": torch.tensor(2.0), "reward_accuracy": 0.5})
    window.add({"loss": torch.tensor(4.0)})
    means, totals = window.reduce({"stop": 1.0})
    assert means == {"loss": 3.0, "reward_accuracy": 0.5} and totals == {"stop": 1.0}
    assert window.reduce() == ({}, {})


@pytest.mark.parametrize("override,message", [
    ("train.hang_timeout_min=-1", "train.hang_timeout_min=-1.0 must be >= 0"),
    ("train.stop_check_every=0", "train.stop_check_every=0 must be at least 1")])
def test_watchdog_and_stop_settings_are_checked_at_composition(override, message):
    with pytest.raises(ConfigError, match=message):
        derive(compose([override]))
