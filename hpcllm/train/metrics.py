"""Metrics: metrics.jsonl always, wandb when enabled, a readable console line; rank 0 writes."""
from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch
from tqdm import tqdm
from omegaconf import DictConfig, OmegaConf


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


class MetricsLogger:
    """``log(step, metrics)`` on every rank; only rank 0 writes anything."""

    def __init__(self, cfg: DictConfig, run_dir: Path, is_main: bool) -> None:
        self.is_main = is_main
        self.file = open(run_dir / "metrics.jsonl", "a") if is_main else None
        self.wandb = self._start_wandb(cfg, run_dir) if is_main and cfg.wandb.enabled else None

    @staticmethod
    def _start_wandb(cfg: DictConfig, run_dir: Path):
        import wandb

        mode = cfg.wandb.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            print("hpcllm: wandb.mode=online but WANDB_API_KEY is not set; logging offline", flush=True)
            mode = "offline"
        return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=mode, dir=str(run_dir),
                          name=run_dir.name, config=OmegaConf.to_container(cfg, resolve=True), resume="allow",
                          id=run_dir.name.replace("/", "-"))

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if console:
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in record.items() if k != "step")
            tqdm.write(f"step {step}: {shown}")  # above the progress bar, if there is one

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
