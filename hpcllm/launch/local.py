"""Run a prepared job on this machine: one process per rank, like torchrun, rank 0 on the console.

Ranks 1.. write ``logs/rank{r}.log``. When a rank fails, the others are stopped (they would otherwise
wait in a collective) and the console names the rank that failed first, its host and the end of its
log: the peers' own errors ("Connection closed by peer") are only the echo of it. Workers die with the
launcher, even when it is killed with SIGKILL (Linux: ``PR_SET_PDEATHSIG``).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hpcllm.distributed import free_port
from hpcllm.train.watchdog import HANG_EXIT_CODE, ranks_dir, read_failures

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
STOPPED_EXIT_CODE = 3  # worker.py: the ranks agreed to stop and saved a checkpoint
PEER_GRACE_S = 5.0  # after a failure, how long the other ranks may take to exit on their own error
LOG_TAIL_LINES = 30
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class RankProcess:
    rank: int
    proc: subprocess.Popen
    log: Path | None  # None: rank 0 writes to the console
    exited_at: float | None = None
    ended_by_launcher: bool = False

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None and self.exited_at is None:
            self.exited_at = time.time()
        return code


def run_local(run_dir: Path, world_size: int, accelerator: str) -> int:
    """Start every rank of the job as `python -m hpcllm.launch.worker RUN_DIR`; return the exit code."""
    (run_dir / "logs").mkdir(exist_ok=True)
    shutil.rmtree(ranks_dir(run_dir), ignore_errors=True)  # an earlier launch's progress and failures
    port, die_with_launcher = free_port(), _die_with(os.getpid())
    ranks = [_start_rank(run_dir, rank, world_size, port, accelerator, die_with_launcher) for rank in range(world_size)]
    # A stop signal to the launcher (Ctrl-C, a time limit) reaches every rank, which checkpoints.
    previous = {sig: signal.signal(sig, lambda s, _f: [r.proc.send_signal(s) for r in ranks if r.poll() is None])
                for sig in FORWARDED_SIGNALS}
    try:
        code = _wait_all(run_dir, ranks)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code not in (0, STOPPED_EXIT_CODE):
        print(failure_report(run_dir, ranks), file=sys.stderr, flush=True)
    return code


def _start_rank(run_dir: Path, rank: int, world_size: int, port: int, accelerator: str, preexec) -> RankProcess:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")  # a log ends with the rank's last words, even when it is killed
    if accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, "-m", "hpcllm.launch.worker", str(run_dir)]
    if rank == 0:
        return RankProcess(rank, subprocess.Popen(command, env=env, preexec_fn=preexec), None)
    log = run_dir / "logs" / f"rank{rank}.log"
    with open(log, "w") as out:  # the child keeps its own copy of the file
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec)
    return RankProcess(rank, proc, log)


def _die_with(launcher_pid: int):
    """A ``preexec_fn`` that makes the child get SIGKILL when the launcher dies, however it dies.
    Elsewhere than Linux it does nothing (a killed launcher can leave workers running there)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec should do little

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _wait_all(run_dir: Path, ranks: list[RankProcess]) -> int:
    """Wait for every rank. Once one fails, stop the others rather than let them hang in a collective;
    the job's exit code is then that of the rank that failed first."""
    while True:
        codes = [r.poll() for r in ranks]
        if any(c not in (None, 0, STOPPED_EXIT_CODE) for c in codes):
            _end_peers(run_dir, ranks)
            first = first_failure(run_dir, ranks)[1]
            own = [r for r in (first, *ranks) if r.proc.returncode not in (0, STOPPED_EXIT_CODE) and not r.ended_by_launcher]
            return _exit_code(own[0].proc.returncode)
        if all(c is not None for c in codes):
            return STOPPED_EXIT_CODE if STOPPED_EXIT_CODE in codes else 0
        time.sleep(0.2)


def _end_peers(run_dir: Path, ranks: list[RankProcess]) -> None:
    deadline = time.time() + PEER_GRACE_S
    while time.time() < deadline and any(r.poll() is None for r in ranks):
        time.sleep(0.2)
    running = [r for r in ranks if r.poll() is None]
    if running and any(f.get("kind") == "hang" for f in read_failures(run_dir)):
        # A hang: ranks still running dump their Python stacks into their logs before they are ended
        # (the watchdog registered faulthandler for SIGQUIT; without it SIGQUIT would dump core).
        for r in running:
            if (ranks_dir(run_dir) / f"rank{r.rank}.json").is_file():
                r.proc.send_signal(signal.SIGQUIT)
        time.sleep(1.0)
    for r in running:  # SIGKILL: SIGTERM only asks a rank to stop at its next step, which a stuck one never reaches
        r.ended_by_launcher = True
        r.proc.kill()
        r.proc.wait()


def _exit_code(returncode: int) -> int:
    """A rank killed by signal N (returncode -N) gives the shell's 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def first_failure(run_dir: Path, ranks: list[RankProcess]) -> tuple[dict | None, RankProcess]:
    """(failure record, rank) of the rank that failed first: by the time its error was raised, where the
    rank recorded it (hpcllm.train.watchdog), else by the time the launcher saw it exit."""
    records = {f["rank"]: f for f in read_failures(run_dir)}
    # A rank ended by the launcher counts only with a record: it may have failed first, then hung in teardown.
    failed = [r for r in ranks if r.rank in records
              or (r.proc.returncode not in (None, 0, STOPPED_EXIT_CODE) and not r.ended_by_launcher)]
    rank = min(failed, key=lambda r: records[r.rank]["time"] if r.rank in records else r.exited_at)
    return records.get(rank.rank), rank


def failure_report(run_dir: Path, ranks: list[RankProcess]) -> str:
    """What the console shows about a failed job: the first failure and the end of its log, then the others."""
    record, first = first_failure(run_dir, ranks)
    host = record["host"] if record else socket.gethostname()
    when = datetime.fromtimestamp(record["time"] if record else first.exited_at, timezone.utc).strftime("%H:%M:%S")
    cause = record["error"] if record else _describe_exit(first.proc.returncode)
    if record and record.get("kind") == "hang":
        lines = [f"hpcllm: the job hung; rank {first.rank} on {host} noticed (at {when} UTC): {cause}"]
    else:
        lines = [f"hpcllm: rank {first.rank} on {host} failed first (at {when} UTC): {cause}"]
    if first.log is None:
        lines.append("hpcllm: its output is above")
    else:
        tail = first.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        lines.append(f"hpcllm: the last {len(tail)} lines of {first.log}:")
        lines += [f"  | {line}" for line in tail]
    others = [f"rank {r.rank} {'was ended by the launcher' if r.ended_by_launcher else _describe_exit(r.proc.returncode)}"
              for r in ranks if r is not first and r.proc.returncode != 0]
    if others:
        lines.append(f"hpcllm: then: {', '.join(others)} (logs in {run_dir / 'logs'})")
    return "\n".join(lines)


def _describe_exit(returncode: int) -> str:
    if returncode == HANG_EXIT_CODE:
        return f"exited with code {HANG_EXIT_CODE} (hang watchdog)"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"
