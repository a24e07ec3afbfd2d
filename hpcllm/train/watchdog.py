"""A hang watchdog, and the records a rank leaves in ``logs/ranks/`` for whoever watches the job.

A rank that hangs (a collective whose peer is stuck or stopped) waits silently: NCCL and gloo time
out only after 30 minutes, if at all. Each training rank therefore runs a small thread that

- writes ``logs/ranks/rank{r}.json`` every few seconds: host, pid, step, phase, time of the last
  progress and of this heartbeat (a rank whose heartbeat goes stale is frozen as a whole: stopped,
  or stuck without releasing the GIL; one whose heartbeat is fresh but whose step stands still waits);
- once no step made progress for ``train.hang_timeout_min``, prints which ranks stopped progressing
  (from the other ranks' files), dumps every Python thread's stack (faulthandler) to this rank's log,
  writes ``rank{r}.failed.json`` and exits with :data:`HANG_EXIT_CODE`.

``kill -QUIT PID`` dumps a rank's stacks by hand (faulthandler), without stopping it.

``rank{r}.failed.json`` is also written by :func:`failure_recorded` around a rank's whole task, at
the moment its error is raised, so a launcher can tell the rank that failed first from the peers that
failed after it only because their connection to it closed (see :func:`first_failure`).
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

HANG_EXIT_CODE = 124  # as coreutils' `timeout`: the job did not finish in time
# A heartbeat older than this many heartbeat intervals means the whole process stopped running.
FROZEN_AFTER_HEARTBEATS = 3


def ranks_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "logs" / "ranks"


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)  # readers never see half a file


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _env_rank() -> int:
    """This task's rank before the process group exists (torchrun/local launcher, or Slurm)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def record_failure(run_dir: str | Path, rank: int, message: str, kind: str = "error") -> None:
    """Note when and why this rank failed (only its first failure counts); ``kind``: error | hang."""
    path = ranks_dir(run_dir) / f"rank{rank}.failed.json"
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                       "kind": kind, "error": message})


@contextmanager
def failure_recorded(run_dir: str | Path):
    """Around a rank's whole task: an exception is recorded (time, host, error) before it propagates."""
    try:
        yield
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:500]
        record_failure(run_dir, _env_rank(), f"{type(err).__name__}: {first_line}".rstrip(": "))
        raise


def read_failures(run_dir: str | Path) -> list[dict]:
    """Every rank's failure record, earliest first."""
    records = [_read_json(p) for p in ranks_dir(run_dir).glob("rank*.failed.json")]
    return sorted((r for r in records if r), key=lambda r: r["time"])


class Watchdog:
    """``progress(step)`` from the training loop (two attribute writes: nothing on the hot path waits);
    a daemon thread does the rest. ``timeout_min <= 0`` disables it (no thread, no files)."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, timeout_min: float) -> None:
        self.dir, self.rank, self.world_size = ranks_dir(run_dir), rank, world_size
        self.run_dir = Path(run_dir)
        self.timeout_s = 60.0 * timeout_min
        # Often enough that a frozen peer shows up well within the timeout, rarely enough to cost nothing.
        self.interval_s = min(30.0, max(0.5, self.timeout_s / 12))
        self.started = time.time()
        self.step, self.phase, self._progress_at = 0, "starting", time.monotonic()  # monotonic: immune to clock steps
        self._stopped = threading.Event()
        self._thread = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def progress(self, step: int, phase: str = "training") -> None:
        self.step, self.phase, self._progress_at = step, phase, time.monotonic()

    @property
    def idle_s(self) -> float:
        return time.monotonic() - self._progress_at

    def start(self) -> "Watchdog":
        if self.enabled and self._thread is None:
            self.started, self._progress_at = time.time(), time.monotonic()
            faulthandler.register(signal.SIGQUIT, all_threads=True)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._heartbeat()
            self._thread = threading.Thread(target=self._watch, name="hpcllm-watchdog", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.phase = "finished"
            self._heartbeat()

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the thread ------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self._heartbeat()
            except OSError:
                pass  # a full or vanished disk must not end the watch itself
            if self.idle_s > self.timeout_s:
                self._fire()

    def _heartbeat(self) -> None:
        now = time.time()
        _write_json(self.dir / f"rank{self.rank}.json", {
            "rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self.step,
            "phase": self.phase, "last_progress": now - self.idle_s, "heartbeat": now,
            "started": self.started, "interval_s": self.interval_s})

    def _fire(self) -> None:
        try:
            stalled = self.stalled_ranks()
            minutes = self.timeout_s / 60
            summary = (f"no step progress for {minutes:.2g} min (train.hang_timeout_min={minutes:.2g}); "
                       f"stopped progressing: {'; '.join(stalled)}")
            print(f"hpcllm: watchdog on rank {self.rank} ({socket.gethostname()}, pid {os.getpid()}): {summary}.\n"
                  f"hpcllm: Python stacks of rank {self.rank} follow; exiting with code {HANG_EXIT_CODE}",
                  file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            record_failure(self.run_dir, self.rank, summary, kind="hang")
        finally:
            os._exit(HANG_EXIT_CODE)  # the main thread is stuck: nothing else would end the process

    def stalled_ranks(self) -> list[str]:
        """The ranks whose last progress is older than the timeout, the likeliest culprits first: frozen
        processes, then ranks without a record of this run, then the ranks furthest behind."""
        now, entries = time.time(), []
        for rank in range(self.world_size):
            record = _read_json(self.dir / f"rank{rank}.json")
            if record is None or record["started"] < self.started - self.timeout_s:  # an earlier run's
                entries.append((1, 0, f"rank {rank}: no progress record of this run (it never started training)"))
                continue
            idle = now - record["last_progress"]
            if idle < self.timeout_s and rank != self.rank:
                continue
            where, at = f"rank {rank} on {record['host']} (pid {record['pid']}", f"step {record['step']}, {record['phase']}"
            silent = now - record["heartbeat"]
            if record["phase"] == "finished":
                entries.append((1, record["step"], f"{where}, {at}): left the job"))
            elif rank != self.rank and silent > FROZEN_AFTER_HEARTBEATS * record["interval_s"]:
                entries.append((0, record["step"], f"{where}): process not responding for {silent:.0f} s (stopped, "
                                                   f"or stuck without releasing the GIL; last heard of at {at})"))
            else:
                entries.append((2, record["step"], f"{where}, {at}): alive, no progress for {idle:.0f} s"))
        return [text for *_, text in sorted(entries, key=lambda e: e[:2])]
