"""Checkpoints that count only when complete, resume from the newest sound one, keep the last K and the best.

Layout: ``checkpoints/step_00000040/`` holds DeepSpeed's engine state (model, optimizer, lr
scheduler; every rank writes its shard), each extra trained engine's state in a subdirectory of
its name (PPO's ``critic/``), ``rng_rank{r}.pt`` per rank, ``state.json`` (the loop's own state),
the run's records (``config.yaml``, ``data.json``: see hpcllm/train/resume.py), ``manifest.json``
(size of every file, sha256 of the small ones) and, written last by rank 0 after a barrier,
``COMPLETE``. A directory without ``COMPLETE`` is a save that was interrupted: it is ignored on
resume and removed later. A complete checkpoint is never deleted before a newer one is complete:
saving a step that already has one writes ``step_X.next`` and swaps it in (an interrupted swap
leaves ``step_X.replaced`` or ``step_X.next`` complete, which count in its place). On resume the
manifest is checked; a damaged checkpoint is skipped for the previous complete one, saying so.
Resuming from an earlier checkpoint (resume=PATH) moves the newer ones aside, so runs never mix.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from hpcllm.distributed import all_reduce, barrier

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
# Param-group keys that come from the config (not the optimizer's progress): a resume takes this launch's.
OPTIMIZER_SETTINGS = ("initial_lr", "weight_decay", "betas", "eps", "bias_correction")
HASHED_UP_TO = 16 * 2**20  # files up to this size get a sha256 in the manifest (the rest: their size)
# step_X, and the two names of a same-step save being swapped in: preferred in this order.
_TAG = re.compile(r"step_(\d{8})(\.next|\.replaced)?")
_PREFERENCE = {None: 0, ".next": 1, ".replaced": 2}


class DiskFullError(RuntimeError):
    pass


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first, one per step."""
    root = Path(root)
    if not root.is_dir():
        return []
    by_step: dict[int, list] = {}
    for path in root.glob("step_*"):
        match = _TAG.fullmatch(path.name)
        if match and (path / COMPLETE).is_file():
            by_step.setdefault(int(match.group(1)), []).append((_PREFERENCE[match.group(2)], path))
    return [min(found)[1] for _, found in sorted(by_step.items())]


def _step(checkpoint: Path) -> int:
    return int(_TAG.fullmatch(checkpoint.name).group(1))


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "state.json").read_text())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Size of every file of the checkpoint, and sha256 of those up to HASHED_UP_TO bytes."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETE)):
        size = path.stat().st_size
        files[str(path.relative_to(checkpoint))] = {"size": size, **({"sha256": _sha256(path)}
                                                                     if size <= HASHED_UP_TO else {})}
    (checkpoint / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def damage(checkpoint: Path) -> list[str]:
    """What is wrong with a complete checkpoint's files against its manifest ([] = sound or no manifest)."""
    manifest = Path(checkpoint) / MANIFEST
    if not manifest.is_file():
        return []  # written before manifests existed: nothing to check against
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return [f"{MANIFEST} is unreadable"]
    problems = []
    for name, expected in files.items():
        path = Path(checkpoint) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {expected['size']} were saved")
        elif "sha256" in expected and _sha256(path) != expected["sha256"]:
            problems.append(f"{name} does not have the content that was saved (sha256 differs)")
    return problems


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Checkpointer:
    def __init__(self, root: Path, rank: int, keep_last: int, keep_best: bool, min_free_gb: float,
                 records: dict | None = None) -> None:
        """``records``: file name -> text that rank 0 writes into every checkpoint (the run's config, data)."""
        self.root, self.rank = Path(root), rank
        self.keep_last, self.keep_best, self.min_free_gb = keep_last, keep_best, min_free_gb
        self.records = records or {}

    def latest(self) -> Path | None:
        done = complete_checkpoints(self.root)
        return done[-1] if done else None

    def latest_sound(self) -> Path | None:
        """The newest complete checkpoint whose files match its manifest, on every rank's view; each
        damaged one is named and skipped. Refuses when checkpoints exist but none is sound, rather
        than train again from scratch over them."""
        done = complete_checkpoints(self.root)
        skipped = []
        for path in reversed(done):
            problems = damage(path)
            if not all_reduce([1.0 if problems else 0.0], op="max")[0]:
                if skipped and self.rank == 0:
                    print(f"hpcllm: resuming from the previous complete checkpoint {path.name} instead", flush=True)
                return path
            skipped.append(path)
            if self.rank == 0:
                print(f"hpcllm: checkpoint {path} is damaged, not resuming from it: {'; '.join(problems[:3])}",
                      flush=True)
        if skipped:
            raise RuntimeError(f"every complete checkpoint under {self.root} is damaged (see above): restore one "
                               "from a backup, or start a new run in another hydra.run.dir")
        return None

    def set_aside_newer(self, start: Path) -> list[Path]:
        """Resuming this run from an earlier checkpoint (resume=PATH): the newer ones belong to the
        continuation being abandoned. They are moved aside, kept but never resumed from or pruned with
        this run's; returns where they went."""
        same_run = Path(start).resolve().parent == self.root.resolve() and _TAG.fullmatch(Path(start).name)
        if not same_run:
            return []
        newer = [p for p in complete_checkpoints(self.root) if _step(p) > _step(Path(start))]
        aside = self.root / f"superseded_after_{_tag(_step(Path(start)))}_{time.strftime('%Y%m%d-%H%M%S')}"
        if newer and self.rank == 0:
            aside.mkdir()
            for path in newer:
                path.rename(aside / path.name)
            print(f"hpcllm: resuming from the earlier {Path(start).name}: the newer {', '.join(p.name for p in newer)} "
                  f"moved aside to {aside} (kept, not part of this run any more)", flush=True)
        barrier()
        return [aside / p.name for p in newer]

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
        final = self.root / _tag(state["step"])
        # A complete checkpoint of this step stays until its replacement is complete too.
        tag = final.name + ".next" if (final / COMPLETE).is_file() else final.name
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
            for name, text in self.records.items():
                (path / name).write_text(text)
            write_manifest(path)
            marker = path / COMPLETE
            with open(marker, "w") as f:
                f.write(final.name + "\n")
                f.flush()
                os.fsync(f.fileno())
            if path != final:
                _swap_in(path, final)
            self._prune(state)
        barrier()
        return final

    def load(self, engines: dict, path: Path) -> dict:
        for name, engine in engines.items():
            where, tag = (path.parent, path.name) if name == "model" else (path, name)
            if not (Path(where) / tag).is_dir():
                raise FileNotFoundError(f"checkpoint {path} has no state of the {name} engine ({tag}/): it was "
                                        "written by a job with other models; resume from a checkpoint of this job")
            settings = optimizer_settings(engine)
            loaded, _ = engine.load_checkpoint(str(where), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load the {name} engine's state from {Path(where) / tag}")
            apply_optimizer_settings(engine, settings)
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return read_state(path)

    def _prune(self, state: dict) -> None:
        """Keep the last K complete checkpoints and the one with the best eval loss; drop partial ones."""
        done = complete_checkpoints(self.root)
        keep = set(done[-self.keep_last:]) if self.keep_last > 0 else set()
        keep.add(self.root / _tag(state["step"]))
        best = state.get("best_checkpoint")
        if self.keep_best and best and self.root / best in done:
            keep.add(self.root / best)
        for path in self.root.glob("step_*"):
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for path in keep:  # a swap that was interrupted: the complete copy takes its step's name
            settled = self.root / path.name.split(".")[0]
            if path != settled and path.is_dir() and not settled.exists():
                path.rename(settled)


def _swap_in(new: Path, final: Path) -> None:
    """Put the complete ``new`` in place of the complete ``final``; at every instant one of them counts."""
    replaced = final.with_name(final.name + ".replaced")
    shutil.rmtree(replaced, ignore_errors=True)
    final.rename(replaced)
    new.rename(final)
    shutil.rmtree(replaced)


def optimizer_settings(engine) -> dict:
    """This launch's optimizer hyper-parameters and lr schedule, taken before a checkpoint overwrites them."""
    optimizer, scheduler = getattr(engine, "optimizer", None), getattr(engine, "lr_scheduler", None)
    groups = [{k: g[k] for k in OPTIMIZER_SETTINGS if k in g} for g in optimizer.param_groups] if optimizer else []
    lambdas = [dict(vars(f)) for f in getattr(scheduler, "lr_lambdas", [])]
    return {"groups": groups, "base_lrs": list(getattr(scheduler, "base_lrs", [])), "lambdas": lambdas}


def apply_optimizer_settings(engine, settings: dict) -> None:
    """After loading: keep the checkpoint's progress (moments, scheduler step) but this launch's lr,
    schedule and optimizer settings, so a resumed run trains with what its config.yaml says."""
    optimizer, scheduler = getattr(engine, "optimizer", None), getattr(engine, "lr_scheduler", None)
    if optimizer is None:
        return
    for group, fresh in zip(optimizer.param_groups, settings["groups"]):
        group.update(fresh)
    if scheduler is None or not hasattr(scheduler, "lr_lambdas"):
        return
    scheduler.base_lrs = list(settings["base_lrs"])
    for multiplier, fresh in zip(scheduler.lr_lambdas, settings["lambdas"]):
        vars(multiplier).update(fresh)
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
