"""Run `python launch.py` for real in a subprocess, as a user would."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def launch_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), f"hydra.run.dir={run_dir}", *overrides]


def env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1")


def launch(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(launch_cmd(run_dir, *overrides), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(run_dir: Path) -> list[dict]:
    return [m for m in metrics(run_dir) if "loss" in m]


def launch_and_stop_at(run_dir: Path, step: int, *overrides: str) -> int:
    """Start a run, send SIGUSR1 (Slurm's pre-time-limit signal) once it logs `step`; return its exit code."""
    proc = subprocess.Popen(launch_cmd(run_dir, *overrides), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if any(m["step"] >= step for m in train_records(run_dir)):
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=300)
    if proc.returncode not in (0, 3):
        raise AssertionError(f"run failed ({proc.returncode}):\n{out[-4000:]}")
    return proc.returncode


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline wandb run file (LevelDB log blocks of wandb Record protos)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    block, pos, rows, chunks = 32768, 7, [], []  # a 7-byte ":W&B" header, then 32 KiB blocks
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
