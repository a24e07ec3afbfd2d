"""Checkpoints that count only when complete, resume from the newest, keep the last K and the best.

Layout: ``checkpoints/step_00000040/`` holds DeepSpeed's engine state (model, optimizer, lr
scheduler; every rank writes its shard), each extra trained engine's state in a subdirectory of
its name (PPO's ``critic/``), ``rng_rank{r}.pt`` per rank, ``state.json`` (the loop's
own state) and, written last by rank 0 after a barrier, ``COMPLETE``. A directory without
``COMPLETE`` is a save that was interrupted: it is ignored on resume and removed later.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from hpcllm.distributed import all_reduce, barrier

COMPLETE = "COMPLETE"


class DiskFullError(RuntimeError):
    pass


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Checkpointer:
    def __init__(self, root: Path, rank: int, keep_last: int, keep_best: bool, min_free_gb: float) -> None:
        self.root, self.rank = Path(root), rank
        self.keep_last, self.keep_best, self.min_free_gb = keep_last, keep_best, min_free_gb

    def latest(self) -> Path | None:
        done = complete_checkpoints(self.root)
        return done[-1] if done else None

    def _check_disk(self, expected_bytes: int) -> None:
        """Every rank stops with the same clear error rather than half-write a checkpoint."""
        short = 0.0
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
            needed = expected_bytes + self.min_free_gb * 2**30
            short = 1.0 if free < needed else 0.0
            if short:
                print(f"hpcllm: only {free / 2**30:.1f} GiB free under {self.root}, a checkpoint needs about "
                      f"{expected_bytes / 2**30:.1f} GiB plus train.min_free_disk_gb={self.min_free_gb}: "
                      "free space or lower train.keep_last", flush=True)
        if all_reduce([short], op="max")[0]:
            raise DiskFullError(f"not enough free disk under {self.root} for a checkpoint (see rank 0's message)")

    def save(self, engines: dict, state: dict, expected_bytes: int) -> Path:
        """``engines``: name -> DeepSpeed engine; "model" is the loop's own."""
        previous = self.latest()
        self._check_disk(_dir_size(previous) if previous else expected_bytes)
        tag = _tag(state["step"])
        path = self.root / tag
        if self.rank == 0 and path.exists():  # a leftover of an interrupted save of this step
            shutil.rmtree(path)
        barrier()
        engines["model"].save_checkpoint(str(self.root), tag=tag, client_state={"hpcllm": state}, save_latest=False)
        for name, engine in engines.items():
            if name != "model":
                engine.save_checkpoint(str(path), tag=name, save_latest=False)
        torch.save(rng_state(), path / f"rng_rank{self.rank}.pt")
        barrier()
        if self.rank == 0:
            (path / "state.json").write_text(json.dumps(state, indent=2))
            marker = path / COMPLETE
            with open(marker, "w") as f:
                f.write(tag + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._prune(state)
        barrier()
        return path

    def load(self, engines: dict, path: Path) -> dict:
        for name, engine in engines.items():
            where, tag = (path.parent, path.name) if name == "model" else (path, name)
            if not (Path(where) / tag).is_dir():
                raise FileNotFoundError(f"checkpoint {path} has no state of the {name} engine ({tag}/): it was "
                                        "written by a job with other models; resume from a checkpoint of this job")
            loaded, _ = engine.load_checkpoint(str(where), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load the {name} engine's state from {Path(where) / tag}")
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((path / "state.json").read_text())

    def _prune(self, state: dict) -> None:
        """Keep the last K complete checkpoints and the one with the best eval loss; drop partial ones."""
        done = complete_checkpoints(self.root)
        keep = set(done[-self.keep_last:]) if self.keep_last > 0 else set()
        best = state.get("best_checkpoint")
        if self.keep_best and best:
            keep.add(self.root / best)
        for path in self.root.glob("step_*"):
            if path not in keep and path.name != _tag(state["step"]):
                shutil.rmtree(path, ignore_errors=True)
