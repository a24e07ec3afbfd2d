"""What the pre-flight check prints and writes: the short table, estimate.json, the capacity line."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

from omegaconf import DictConfig

from hpcllm.config import ConfigError, Derived
from hpcllm.plan.estimate import Estimate, estimate


class PreflightRefused(ConfigError):
    """The job is predicted not to fit (GPU memory, CPU memory or disk); the message says what to change."""


def _hours(est: Estimate) -> str:
    return "n/a (set train.max_steps or give the data size)" if est.job_hours is None else f"{est.job_hours:.2f} h"


def _time_line(est: Estimate) -> str:
    """What the step waits on: compute, the collectives over the link they cross (and how much of them
    compute does not hide), the offload copies and CPU optimizer."""
    t = est.time_breakdown
    parts = [f"compute {t.get('compute', 0):.3g} s"]
    if t.get("communication"):
        parts.append(f"communication {t['communication']:.3g} s over {est.link} "
                     f"({t.get('exposed_communication', 0):.3g} s not hidden)")
    if t.get("offload"):
        parts.append(f"offload {t['offload']:.3g} s")
    return f"              bound by {est.bound}: " + ", ".join(parts)


def format_table(cfg: DictConfig, est: Estimate) -> str:
    """A short human-readable table of the estimate."""
    unit = "rank" if cfg.hw.accelerator == "cpu" else "GPU"
    terms = "  ".join(f"{k} {v:.2f}" for k, v in est.breakdown.items() if v)
    cpu_terms = "  ".join(f"{k} {v:.2f}" for k, v in est.cpu_breakdown.items() if v)
    mark = lambda ok: "ok" if ok else "DOES NOT FIT"  # noqa: E731
    disk_free = "unknown" if est.disk_free_gb is None else f"{est.disk_free_gb:.1f} GB free"
    lines = [
        f"pre-flight estimate: model={cfg.model.name} method={cfg.method.name} hw={cfg.hw.name} "
        f"zero={cfg.zero.name} micro_batch={cfg.method.micro_batch_size} seq_len={cfg.method.seq_len}",
        f"  params        {est.total_params / 1e6:,.1f} M total, {est.trainable_params / 1e6:,.3f} M trainable",
        f"  memory/{unit:<5} {est.gpu_mem_gb:.2f} / {est.gpu_capacity_gb:.0f} GB  {mark(est.fits_gpu)}",
        f"                {terms}",
        f"  memory/node   {est.cpu_mem_gb:.2f} / {est.cpu_capacity_gb:.0f} GB  {mark(est.fits_cpu)}  ({cpu_terms})",
        f"  max micro batch that fits: {est.max_micro_batch_size}",
        f"  time          {est.step_time_s:.3g} s/step, {est.tokens_per_sec_per_gpu:,.0f} tokens/s per {unit}, "
        f"job {_hours(est)}",
        "  " + _time_line(est),
        f"  disk          checkpoint {est.checkpoint_gb:.2f} GB x keep_last {cfg.train.keep_last} (+ export) = "
        f"{est.disk_needed_gb:.2f} GB, {disk_free}  {mark(est.fits_disk)}",
    ]
    lines += [f"  warning: {note}" for note in est.notes if note.startswith("disk quota")]
    time_limit = time_limit_line(cfg, est)
    if time_limit:
        lines.append(time_limit)
    if est.remedies:
        lines.append("  remedies (cheapest first): " + "; ".join(est.remedies))
    return "\n".join(lines)


def time_limit_line(cfg: DictConfig, est: Estimate) -> Optional[str]:
    """Slurm jobs longer than one time limit: the runs they need (each requeue resumes from the checkpoint
    taken ``cluster.signal_before_min`` before the limit) against the ``1 + cluster.max_requeue`` allowed."""
    cluster = cfg.cluster
    if cluster.name != "slurm" or est.job_hours is None:
        return None
    usable_min = max(1, cluster.time_limit_min - cluster.signal_before_min)
    runs = math.ceil(est.job_hours * 60 / usable_min)
    if runs <= 1:
        return None
    allowed = 1 + cluster.max_requeue
    line = f"  time limit    about {runs} runs of cluster.time_limit_min={cluster.time_limit_min}"
    if runs > allowed:
        return (f"{line}, but at most {allowed} (1 + cluster.max_requeue={cluster.max_requeue}): the job would "
                f"stop unfinished; set cluster.max_requeue={runs - 1} or raise cluster.time_limit_min")
    return f"{line} (requeued {runs - 1} times of at most cluster.max_requeue={cluster.max_requeue})"


def capacity_line(cfg: DictConfig, est: Estimate) -> str:
    """One line per sweep point, e.g. for ``-m method.micro_batch_size=1,2,4,8`` dry runs."""
    fit = "fits" if est.fits else "OOM " if not (est.fits_gpu and est.fits_cpu) else "DISK"
    return (f"{fit} mb={cfg.method.micro_batch_size:<3d} seq={cfg.method.seq_len:<5d} "
            f"zero={cfg.zero.name:<14s} gc={'on ' if cfg.train.gradient_checkpointing else 'off'} "
            f"gpu {est.gpu_mem_gb:7.2f}/{est.gpu_capacity_gb:.0f} GB  cpu {est.cpu_mem_gb:7.1f}/"
            f"{est.cpu_capacity_gb:.0f} GB  {est.step_time_s:8.3g} s/step  "
            f"{est.tokens_per_sec_per_gpu:9,.0f} tok/s/gpu  max_mb={est.max_micro_batch_size}  {est.bound}-bound")


def preflight(cfg: DictConfig, derived: Derived, run_dir, num_samples: Optional[int] = None,
              show: bool = True) -> Optional[Estimate]:
    """Estimate, print the table (``show``), write ``run_dir/estimate.json``; refuse a job that will not fit.

    ``preflight=off`` skips everything; ``warn`` prints and continues; ``refuse`` (the default) raises
    :class:`PreflightRefused` with the breakdown and remedies.
    """
    if cfg.preflight == "off":
        return None
    est = estimate(cfg, derived, run_dir=str(run_dir), num_samples=num_samples)
    table = format_table(cfg, est)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "estimate.json"), "w") as f:
        json.dump(est.to_dict(), f, indent=2)
    if not est.fits and cfg.preflight == "refuse":
        refused = PreflightRefused(
            f"pre-flight: this job is predicted not to fit, so it was not submitted.\n{table}\n"
            "Apply one of the remedies above, or set preflight=warn to run anyway.")
        refused.estimate = est
        raise refused
    if show:
        print(table, flush=True)
    return est
