"""Metrics: summed on the device between log steps, reduced over ranks once per log step, written to
metrics.jsonl always, to wandb when enabled and to a readable console line; rank 0 writes."""
from __future__ import annotations

import json
import os
import resource
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from omegaconf import DictConfig, OmegaConf


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


class MetricWindow:
    """Per-micro-batch values summed where they are computed: a loss stays a tensor on the device, so
    adding it costs no host sync (``loss.item()`` would wait for the GPU every micro batch).
    :meth:`reduce` averages them over the window and every rank in one all-reduce."""

    def __init__(self) -> None:
        self.sums: dict = {}
        self.counts: dict = defaultdict(int)

    def add(self, values: dict) -> None:
        for key, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] += 1

    def reduce(self, totals: dict | None = None) -> tuple[dict, dict]:
        """(each value's mean over every micro batch of every rank, ``totals`` summed over the ranks);
        collective: every rank calls it with the same keys. Empties the window."""
        from hpcllm.distributed import all_reduce

        keys, totals = sorted(self.sums), dict(totals or {})
        reduced = all_reduce([self.sums[k] for k in keys] + [float(self.counts[k]) for k in keys] + list(totals.values()))
        n = len(keys)
        means = {k: reduced[i] / max(1.0, reduced[n + i]) for i, k in enumerate(keys)}
        self.sums, self.counts = {}, defaultdict(int)
        return means, dict(zip(totals, reduced[2 * n:]))


class MetricsLogger:
    """``log(step, metrics)`` on every rank; only rank 0 writes anything. A context manager: leaving it
    closes metrics.jsonl and finishes the wandb run, marked failed when an exception is on its way."""

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

    def close(self, failed: bool = False) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.close(failed=exc_type is not None)
