"""``layout=auto``: the fastest layout predicted to fit, chosen before anything is rendered.

Candidates are every ZeRO profile (stage 0-3, optimizer and parameter offload) with and without gradient
checkpointing, each at the largest micro batch that fits and divides the job's per-rank batch, so the
global batch (and with it the optimisation) stays what the job asked for. They are ranked by predicted
tokens/s per GPU among those that fit; the dry run prints the ranking with memory and time.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional

from omegaconf import DictConfig

from hpcllm.config import ConfigError, derive
from hpcllm.plan.estimate import ZERO_PROFILES, _max_micro_batch, _with, estimate


@dataclass
class Layout:
    """One candidate layout and what the estimate predicts for it."""

    zero: str
    gradient_checkpointing: bool
    micro_batch_size: int  # 0: not even a micro batch of 1 fits
    gpu_mem_gb: float
    step_time_s: float
    tokens_per_sec_per_gpu: float
    bound: str
    fits: bool

    @property
    def overrides(self) -> List[str]:
        return [f"zero={self.zero}", f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                f"method.micro_batch_size={self.micro_batch_size}"]


def _divisors_down(n: int, limit: int) -> List[int]:
    return [b for b in range(min(n, limit), 0, -1) if n % b == 0]


def _candidate(cfg: DictConfig, zero: str, checkpointing: bool, per_rank: int) -> Layout:
    derived = derive(cfg)
    cfg, derived = _with(cfg, derived, f"zero={zero}")
    cfg.train.gradient_checkpointing = checkpointing
    fitting = _max_micro_batch(cfg, derived, cfg.train.zero_init, limit=per_rank)
    micro = next(iter(_divisors_down(per_rank, fitting)), 0)
    cfg.method.micro_batch_size = max(micro, 1)
    est = estimate(cfg, derive(cfg), with_remedies=False)
    return Layout(zero, checkpointing, micro, est.gpu_mem_gb, est.step_time_s, est.tokens_per_sec_per_gpu,
                  est.bound, bool(micro) and est.fits_gpu and est.fits_cpu)


def rank_layouts(cfg: DictConfig) -> List[Layout]:
    """Every candidate, fastest fitting first, then those that do not fit."""
    cfg = copy.deepcopy(cfg)
    derived = derive(cfg)
    # Keep the global batch: fix it explicitly, then vary how each rank splits its share.
    cfg.method.global_batch_size = derived.global_batch_size
    per_rank = derived.global_batch_size // derived.data_parallel_size
    zeros = [z for z, (stage, _, _) in ZERO_PROFILES.items() if not (stage >= 2 and cfg.train.pipeline_parallel > 1)]
    checkpointing = (False, True) if cfg.method.stage != "eval" else (False,)
    layouts = [_candidate(cfg, z, gc, per_rank) for z in zeros for gc in checkpointing]
    return sorted(layouts, key=lambda l: (not l.fits, -l.tokens_per_sec_per_gpu, l.gpu_mem_gb))


def format_layouts(layouts: List[Layout], chosen: Optional[Layout]) -> str:
    lines = ["layout=auto: candidates, fastest fitting first (global batch kept)"]
    for rank, l in enumerate(layouts, 1):
        mark = "->" if l is chosen else "  "
        fit = "fits" if l.fits else "OOM "
        lines.append(f"{mark} {rank:2d}. {fit} zero={l.zero:<14s} gc={'on ' if l.gradient_checkpointing else 'off'} "
                     f"micro_batch={l.micro_batch_size:<4d} {l.gpu_mem_gb:7.2f} GB  {l.step_time_s:8.3g} s/step  "
                     f"{l.tokens_per_sec_per_gpu:9,.0f} tok/s/gpu  bound by {l.bound}")
    return "\n".join(lines)


def choose_layout(cfg: DictConfig) -> DictConfig:
    """With ``layout=auto``, the job with the fastest layout predicted to fit (printed with the ranking);
    the job unchanged when ``layout=manual`` or when nothing fits (the pre-flight then refuses it with
    remedies)."""
    if cfg.layout == "manual":
        return cfg
    if cfg.layout != "auto":
        raise ConfigError(f"layout={cfg.layout!r} is not a layout mode: use layout=manual or layout=auto")
    layouts = rank_layouts(cfg)
    best = layouts[0] if layouts and layouts[0].fits else None
    print(format_layouts(layouts, best), flush=True)
    if best is None:
        return cfg
    chosen = copy.deepcopy(cfg)
    chosen.method.global_batch_size = derive(cfg).global_batch_size
    chosen, _ = _with(chosen, derive(chosen), f"zero={best.zero}")
    chosen.train.gradient_checkpointing = best.gradient_checkpointing
    chosen.method.micro_batch_size = best.micro_batch_size
    return chosen
