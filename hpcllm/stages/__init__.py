"""Stages: what differs between pretrain/SFT, reward, DPO, PPO and eval."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from hpcllm.config import derive
from hpcllm.distributed import DistEnv


def _stage_class(name: str):
    if name == "lm":
        from hpcllm.stages.lm import LMStage

        return LMStage
    raise ValueError(f"method.stage={name!r} has no training stage")


def run_stage(cfg: DictConfig, run_dir: Path, dist: DistEnv) -> str:
    """Build the stage of cfg.method and run it through the training loop (or the evaluator)."""
    from hpcllm.data import load_tokenizer
    from hpcllm.launch.datasets import memmap_paths
    from hpcllm.stages.base import StageContext

    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.path)
    ctx = StageContext(cfg, derive(cfg), Path(run_dir), dist, memmap_paths(cfg, Path(run_dir)), tokenizer)
    if cfg.method.stage == "eval":
        from hpcllm.stages.eval import run_eval

        return run_eval(ctx)
    from hpcllm.train.loop import Trainer

    return Trainer(ctx, _stage_class(cfg.method.stage)(ctx)).train()
