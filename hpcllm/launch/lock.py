"""One launch at a time per run directory: ``RUN_DIR/run.lock`` names its holder (host, pid, Slurm job).

Two launches into one run directory would interleave ``metrics.jsonl``, checkpoints and ``final/``.
The launcher takes the lock before it writes anything into the run directory and keeps it while
its ranks run (they share it through ``HPCLLM_RUN_LOCK``); a Slurm submission hands it to the job
id, whose rank 0 takes it over when it starts - so a requeued job, same id, is the same run
continuing. A lock whose holder is gone (a dead pid on this host, a Slurm job no longer in the
queue) is stale and taken over, saying so; a live or unverifiable holder is refused with its details.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hpcllm.config import ConfigError

LOCK_NAME = "run.lock"
TOKEN_ENV = "HPCLLM_RUN_LOCK"  # the holder's token: processes it starts (its ranks) share its lock
# squeue states of a job that still holds its run directory (it runs, or will run again).
ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                       "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


class RunDirLocked(ConfigError):
    pass


def slurm_job_id(env=os.environ) -> str | None:
    """This process's Slurm job as squeue names it (``ARRAY_TASK`` for an array task), or None."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return start is None or _process_start(pid) in (None, start)


def slurm_job_active(job_id: str) -> bool | None:
    """Whether Slurm still runs (or will run) ``job_id``; None when squeue cannot say."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # An id Slurm has forgotten is reported as invalid: the job ended long ago.
        return False if "invalid job id" in out.stderr.lower() else None
    return any(state in ACTIVE_SLURM_STATES for state in out.stdout.split())


def holder_alive(holder: dict) -> bool | None:
    """True: the holder still runs; False: it is gone (stale lock); None: cannot tell from here."""
    if holder.get("slurm_job_id"):
        return slurm_job_active(holder["slurm_job_id"])
    if holder.get("host") == socket.gethostname() and holder.get("pid"):
        return _process_alive(int(holder["pid"]), holder.get("pid_start"))
    return None


def _restarts() -> str:
    return os.environ.get("SLURM_RESTART_COUNT", "0")


def _earlier_in_this_job(holder: dict) -> bool:
    """A lock of this process's own Slurm job left by its submitter or by an earlier run of the job
    (before a requeue); not one of a second launch inside the same allocation that is still running."""
    if holder.get("pid") is None or holder.get("slurm_restart", "0") != _restarts():
        return True
    return holder.get("host") == socket.gethostname() and not _process_alive(int(holder["pid"]),
                                                                             holder.get("pid_start"))


def describe(holder: dict) -> str:
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid') or '-'}"]
    if holder.get("slurm_job_id"):
        parts.append(f"Slurm job {holder['slurm_job_id']}")
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    return ", ".join(parts)


def _me(job_id: str | None) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "slurm_job_id": job_id, "slurm_restart": _restarts(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            # One token per launching process: a pipeline's launcher holds every stage's lock, and the ranks
            # of each stage (which inherit TOKEN_ENV) share whichever of them they run in.
            "token": os.environ.get(TOKEN_ENV) or uuid.uuid4().hex}


def _read(path: Path) -> dict | None:
    """The holder recorded in ``path``; {} when unreadable (a writer killed half-way), None when absent."""
    for _ in range(3):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.1)  # being written this instant
    return {}


def _create(path: Path, holder: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _write(path: Path, holder: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(holder))
    tmp.replace(path)


@dataclass
class RunLock:
    path: Path
    token: str
    owned: bool  # False: joined the lock of the process that started this one

    def release(self) -> None:
        """Remove the lock if it still names this holder (a Slurm hand-over rewrote it otherwise)."""
        if self.owned and (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.owned = False


def acquire(run_dir: Path, release_at_exit: bool = True) -> RunLock:
    """Take ``run_dir``'s lock for this process (and the processes it starts), or refuse naming the holder."""
    path = Path(run_dir) / LOCK_NAME
    job_id = slurm_job_id()
    for _ in range(5):
        holder = _read(path)
        if holder is None:
            me = _me(job_id)
            if _create(path, me):
                return _held(path, me, release_at_exit)
            continue  # another launch created it this instant: look at who
        if holder and os.environ.get(TOKEN_ENV) and holder.get("token") == os.environ[TOKEN_ENV]:
            return RunLock(path, holder["token"], owned=False)
        if holder and job_id and holder.get("slurm_job_id") == job_id and _earlier_in_this_job(holder):
            me = _me(job_id)  # this Slurm job, requeued or started after its submission: the run continues
            _write(path, me)
            return _held(path, me, release_at_exit)
        alive = holder_alive(holder) if holder else False
        if alive is not False:
            raise RunDirLocked(_refusal(run_dir, path, holder, alive))
        print(f"hpcllm: {path} was left by a run that is gone ({describe(holder)}): taking it over", flush=True)
        stale = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            path.rename(stale)  # only one of several launches seeing the stale lock wins the rename
            stale.unlink()
        except FileNotFoundError:
            pass
    raise RunDirLocked(f"could not take the lock {path}: other launches keep taking it; launch one at a time")


def _held(path: Path, me: dict, release_at_exit: bool) -> RunLock:
    lock = RunLock(path, me["token"], owned=True)
    os.environ[TOKEN_ENV] = me["token"]  # inherited by the ranks this process starts
    if release_at_exit:
        atexit.register(lock.release)
    return lock


def _refusal(run_dir: Path, path: Path, holder: dict, alive: bool | None) -> str:
    what = "is in use by" if alive else "is locked by a run that cannot be checked from here"
    text = (f"run directory {run_dir} {what} another launch ({describe(holder)}): two runs in one "
            f"directory would mix their metrics, checkpoints and final/. Wait for it to end, or pass another "
            f"hydra.run.dir")
    if holder.get("slurm_job_id"):
        text += f", or cancel it (scancel {holder['slurm_job_id']})"
    if not alive:
        text += f"; if that run is surely gone, delete {path}"
    return text


def hand_to_slurm_job(run_dir: Path, job_id: str) -> None:
    """After submitting ``job_id`` into ``run_dir``: the lock now belongs to that job (pending or running)."""
    holder = dict(_me(str(job_id)), pid=None, pid_start=None)
    _write(Path(run_dir) / LOCK_NAME, holder)
