"""Run a prepared job on this machine: one process per rank, like torchrun, rank 0 on the console."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpcllm.distributed import free_port

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def run_local(run_dir: Path, world_size: int, accelerator: str) -> int:
    """Start every rank of the job as `python -m hpcllm.launch.worker RUN_DIR`; return the exit code."""
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
        if accelerator == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        out = None if rank == 0 else open(logs / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "hpcllm.launch.worker", str(run_dir)],
                                      env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
    # A stop signal to the launcher (Ctrl-C, a time limit) reaches every rank, which checkpoints.
    previous = {sig: signal.signal(sig, lambda s, _f: [p.send_signal(s) for p in procs]) for sig in FORWARDED_SIGNALS}
    try:
        return _wait_all(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_all(procs) -> int:
    """Wait for every rank; if one fails, stop the others rather than let them hang in a collective."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            time.sleep(5)  # give the peers a moment to exit on their own error first
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)
