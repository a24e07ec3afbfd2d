"""Stages: what differs between pretrain/SFT, reward, DPO, PPO and eval."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from omegaconf import DictConfig

from hpcllm.config import derive
from hpcllm.distributed import DistEnv

# method.stage -> "module:Class" of the stage the training loop runs.
STAGES = {
    "lm": "hpcllm.stages.lm:LMStage",
    "reward": "hpcllm.stages.reward:RewardStage",
    "dpo": "hpcllm.stages.dpo:DPOStage",
    "ppo": "hpcllm.stages.ppo:PPOStage",
}


def _stage_class(name: str):
    if name not in STAGES:
        raise ValueError(f"method.stage={name!r} has no training stage (known: {', '.join(STAGES)})")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def run_stage(cfg: DictConfig, run_dir: Path, dist: DistEnv) -> str:
    """Build the stage of cfg.method and run it through the training loop (or the evaluator)."""
    from hpcllm.data import load_tokenizer
    from hpcllm.distributed import barrier
    from hpcllm.launch.datasets import ensure_memmaps, memmap_paths
    from hpcllm.stages.base import StageContext

    if dist.is_main:  # started by torchrun or a bare srun, nobody prepared the data yet
        ensure_memmaps(cfg, Path(run_dir))
    barrier()
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    ctx = StageContext(cfg, derive(cfg), Path(run_dir), dist, memmap_paths(cfg, Path(run_dir)), tokenizer)
    if cfg.zero.stage == 3 and cfg.train.zero_init:
        from hpcllm.models.build import zero3_init_context

        ctx.zero3_init = zero3_init_context(json.loads((Path(run_dir) / "ds_config.json").read_text()))
    if cfg.method.stage == "eval":
        from hpcllm.stages.eval import run_eval

        return run_eval(ctx)
    from hpcllm.train.loop import Trainer

    return Trainer(ctx, _stage_class(cfg.method.stage)(ctx)).train()
