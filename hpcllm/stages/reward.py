"""Reward model: a causal LM backbone with a value head, trained on chosen/rejected pairs
(``reward_ranking_loss``), the reward read at each response's last non-padding token."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from hpcllm.models.value_head import RewardModel, save_reward_model
from hpcllm.stages.base import StageContext
from hpcllm.stages.lm import MemmapStage, build_policy
from hpcllm.stages.losses import reward_ranking_loss


def lora_scaling(ctx: StageContext) -> float | None:
    lora = ctx.cfg.method.lora
    return lora.alpha / lora.r if ctx.cfg.method.adapter == "lora" else None


def pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value)


def stack_pairs(batch: dict, pad_token_id: int) -> dict:
    """chosen rows then rejected rows in one batch (right-padded to a common width): one forward for both."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    return {key: torch.cat([pad_to(batch[f"{side}_{key}"], width, pad) for side in ("chosen", "rejected")])
            for key, pad in pads.items()}


class PreferenceStage(MemmapStage):
    """Rows of chosen/rejected pairs; no perplexity in eval."""

    data_kinds = ("preference",)

    def eval_summary(self, metrics: dict) -> dict:
        return {}


class RewardStage(PreferenceStage):
    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.model = RewardModel(build_policy(ctx))
        self.pad_token_id = ctx.tokenizer.pad_token_id if ctx.tokenizer is not None else 0

    def loss(self, engine, batch: dict):
        pairs = stack_pairs(batch, self.pad_token_id)
        rewards = engine(pairs["input_ids"], pairs["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        return reward_ranking_loss(chosen, rejected)

    def export(self, engine, out_dir: Path) -> None:
        """A reward-model directory (merged backbone + value_head.safetensors): ``load_reward_model(out_dir)``."""
        state_dict = self.gathered_state_dict(engine)
        self.write_export(out_dir, lambda tmp: save_reward_model(
            engine.module, state_dict, tmp, lora_scaling(self.ctx)))
