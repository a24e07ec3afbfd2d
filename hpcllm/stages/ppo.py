"""PPO (RLHF): an actor and a critic trained on rollouts generated from prompts.

How it fits the one loop: ``self.model`` is the actor (the SFT policy), trained by the loop's
engine under the job's ``zero=`` at method.lr. The critic (the reward model's backbone and head, or
a copy of the actor's starting backbone with a new value head) is an extra trained model: the loop
gives it an engine of its own under ``method.ppo.critic_zero`` (default the job's zero) at
method.ppo.critic_lr, checkpoints it beside the actor, and steps it with the value loss that
``loss`` returns for it. The stage's ``train_batches`` is where RL happens: for rollout k it takes
``rollout_batch_size`` prompts (all ranks together), samples responses with the actor, scores them
(reward model or toy reward), adds the per-token KL penalty against the frozen reference, computes
GAE advantages and returns, then yields ``ppo_epochs`` shuffled passes of micro batches over that
experience; the loop runs each micro batch's clipped policy (+ ptx) and value losses as it does any
stage's loss. One rollout is always a whole number of optimizer steps.

Frozen models (no optimizer): the reference is the actor with its adapter disabled under
method.adapter=lora, else a copy of the starting model under ``method.ppo.reference_zero``; the
reward model is ``load_reward_model(method.ppo.reward_model)`` under ``method.ppo.reward_zero``.
Under a ZeRO-3 profile a frozen model is partitioned over the ranks in an optimizer-less engine
(parameters offloaded to the CPU with stage3_offload); under any other it is a replica per rank.

Toy reward (no method.ppo.reward_model): the fraction of generated tokens equal to
method.ppo.target_token. Left null, the target is the ordinary (non-special) token with the highest
mean sampling probability (temperature and top-k applied) of the starting actor over up to 64
prompts (seeded by ``seed``; the same on every rank and on resume), i.e. a token the policy already
generates, so that the reward starts above zero even for the random tiny demo model.

Resume: each rank writes its current rollout to ``run_dir/rollouts/``; a run resumed in the middle
of rollout k reloads it, so the remaining micro batches (and the RNG, restored by the loop) are
those of the uninterrupted run. Log-probabilities use ``logits / temperature`` (top-k truncation of
the sampler is not part of them, as in common RLHF implementations).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import GenerationConfig

from hpcllm.config import ConfigError
from hpcllm.data import iter_batches
from hpcllm.models.adapters import apply_adapter
from hpcllm.models.build import DTYPES
from hpcllm.models.value_head import (RewardModel, load_reward_model, plain_state_dict, position_ids,
                                      save_causal_lm, save_reward_model)
from hpcllm.stages.base import Stage, StageContext
from hpcllm.stages.lm import build_policy, build_reference, open_dataset
from hpcllm.stages.losses import (gae, kl_penalized_rewards, masked_mean, ppo_policy_loss, ppo_value_loss,
                                  token_logprobs, whiten)
from hpcllm.stages.reward import lora_scaling

PROBE_PROMPTS = 64
EXPERIENCE_KEYS = ("input_ids", "attention_mask", "action_mask", "old_logprobs", "old_values", "advantages", "returns")


class Actor(nn.Module):
    """The policy, with the pretraining (ptx) loss in the same forward so one engine call serves both."""

    def __init__(self, actor: nn.Module) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, input_ids, attention_mask, ptx_input_ids=None, ptx_attention_mask=None, ptx_labels=None):
        logits = self.actor(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask)).logits
        ptx_loss = None
        if ptx_input_ids is not None:
            ptx_loss = self.actor(input_ids=ptx_input_ids, attention_mask=ptx_attention_mask, labels=ptx_labels).loss
        return logits, ptx_loss


def response_mask(responses: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 on generated tokens up to and including the first eos, 0 after it."""
    if eos_token_id is None:
        return torch.ones_like(responses)
    is_eos = (responses == eos_token_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


class PPOStage(Stage):
    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        cfg, ppo = ctx.cfg, ctx.cfg.method.ppo
        self._sizes()
        self.prompts = open_dataset(ctx, "train", ("prompt",))  # data.train is set (derive() checked)
        self.ptx_ds = open_dataset(ctx, "pretrain", ("pretrain", "sft")) if ppo.ptx_coef > 0 else None
        self.pad_token_id = ctx.tokenizer.pad_token_id if ctx.tokenizer is not None else 0
        self.eos_token_id = ctx.tokenizer.eos_token_id if ctx.tokenizer is not None else None

        lora = cfg.method.adapter == "lora"
        self.model = Actor(build_policy(ctx, keep_start=not lora))
        dtype = DTYPES[ctx.derived.precision]
        trust = bool(cfg.model.trust_remote_code)
        with self.building("critic"):
            if ppo.reward_model:
                critic = load_reward_model(ppo.reward_model, dtype, cfg.train.attention, trust).train()
                critic.backbone = apply_adapter(critic.backbone, cfg.method, cfg.model)
            else:
                critic = RewardModel(build_policy(ctx))
        self.critic = critic
        self.reward_model = None
        if ppo.reward_model:
            self.reward_model = self.frozen_model(
                "reward", lambda: load_reward_model(ppo.reward_model, dtype, cfg.train.attention, trust))
        # Under LoRA the reference is the actor with its adapter disabled.
        self.reference = None if lora else self.frozen_model("reference", lambda: build_reference(ctx))
        self.generation = GenerationConfig(
            do_sample=True, max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, top_k=ppo.top_k,
            top_p=1.0, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id)
        self.target_id = None

    def _sizes(self) -> None:
        """Rollout rows and micro batches per rank (derive() checked at composition that they divide evenly)."""
        method, derived = self.ctx.cfg.method, self.ctx.derived
        self.rows_per_rank = method.ppo.rollout_batch_size // derived.data_parallel_size
        self.micro_per_epoch = self.rows_per_rank // method.micro_batch_size
        self.micro_per_rollout = method.ppo.ppo_epochs * self.micro_per_epoch

    # -- the stage contract ---------------------------------------------------------------------
    def bind(self, engine, extra_engines: dict | None = None) -> None:
        super().bind(engine, extra_engines)
        self.critic_engine = self.extra_engines["critic"]
        if self.reward_model is None:
            # Before a checkpoint is loaded: the actor still has its starting weights on every rank.
            self.target_id = self._toy_target()

    def extra_trained(self) -> dict:
        params = [p for p in self.critic.parameters() if p.requires_grad]
        return {"critic": (self.critic, [{"params": params, "lr": self.ctx.cfg.method.ppo.critic_lr}])}

    def samples_per_epoch(self) -> int:
        """Experience rows trained per pass over the prompts: every prompt's rollout, ppo_epochs times."""
        return len(self.prompts) * self.ctx.cfg.method.ppo.ppo_epochs

    def train_batches(self, micro_step: int) -> Iterator[dict]:
        rollout_index, offset = divmod(micro_step, self.micro_per_rollout)
        ptx = self._ptx_batches(micro_step)
        while True:
            rollout = self._saved_rollout(rollout_index) if offset else None
            if rollout is None:
                rollout = self._rollout(rollout_index)
            for i in range(offset, self.micro_per_rollout):
                batch = self._micro_batch(rollout, rollout_index, i)
                if ptx is not None:
                    batch.update({f"ptx_{k}": v for k, v in next(ptx).items()})
                yield batch
            rollout_index, offset = rollout_index + 1, 0

    def loss(self, engine, batch: dict):
        ppo, width = self.ctx.cfg.method.ppo, batch["prompt_width"]
        ptx = {k: batch[k] for k in ("ptx_input_ids", "ptx_attention_mask", "ptx_labels") if k in batch}
        logits, ptx_loss = engine(batch["input_ids"], batch["attention_mask"], **ptx)
        values = self.critic_engine(batch["input_ids"], batch["attention_mask"], per_token=True)
        responses, mask = batch["input_ids"][:, width:], batch["action_mask"]
        logprobs = token_logprobs(logits[:, width - 1:-1] / ppo.temperature, responses)
        policy_loss, metrics = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, ppo.clip_range)
        value_loss, value_metrics = ppo_value_loss(values[:, width - 1:-1], batch["old_values"], batch["returns"], mask,
                                                   ppo.value_clip_range)
        if ptx_loss is not None:
            policy_loss = policy_loss + ppo.ptx_coef * ptx_loss
            metrics["ptx_loss"] = ptx_loss.item()
        return {"model": policy_loss, "critic": value_loss}, {**metrics, **value_metrics, **batch["rollout_stats"]}

    def export(self, engine, out_dir: Path) -> None:
        """``final/``: the actor as a Hugging Face causal LM (LoRA merged); ``final/critic/``: the critic as a
        reward-model directory (``load_reward_model``)."""
        actor_state, critic_state = self.gathered_state_dict(engine), self.gathered_state_dict(self.critic_engine)
        scaling = lora_scaling(self.ctx)

        def write(tmp: Path) -> None:
            save_causal_lm(engine.module.actor, plain_state_dict(actor_state, "actor.", scaling), tmp)
            save_reward_model(self.critic_engine.module, critic_state, tmp / "critic", scaling)

        self.write_export(out_dir, write)

    # -- rollouts -------------------------------------------------------------------------------
    def _prompt_batch(self, rollout_index: int, rank: int, world: int, rows: int) -> dict:
        batches = iter_batches(self.prompts, rows, rank, world,
                               consumed_samples=rollout_index * self.ctx.cfg.method.ppo.rollout_batch_size,
                               pad_token_id=self.pad_token_id)
        return {k: v.to(self.engine.device) for k, v in next(batches).items()}

    @torch.no_grad()
    def _generate(self, prompts: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(sequences, attention mask over prompt + response, prompt width) sampled from the actor."""
        actor = self.engine.module.actor
        sequences = actor.generate(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                                   generation_config=self.generation, synced_gpus=self.ctx.cfg.zero.stage == 3)
        width = prompts["input_ids"].shape[1]
        mask = torch.cat([prompts["attention_mask"], response_mask(sequences[:, width:], self.eos_token_id)], 1)
        return sequences, mask, width

    def _toy_target(self) -> int:
        ppo, tokenizer = self.ctx.cfg.method.ppo, self.ctx.tokenizer
        if ppo.target_token is not None:
            token_id = tokenizer.convert_tokens_to_ids(ppo.target_token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ConfigError(f"method.ppo.target_token={ppo.target_token!r} is not a token of the tokenizer: "
                                  "give one token string as the tokenizer spells it (e.g. 'Ġthe')")
            return token_id
        actor = self.engine.module.actor
        self.engine.module.eval()
        with torch.random.fork_rng(devices=[]), self._whole_model():
            torch.manual_seed(self.ctx.cfg.seed)
            # The same rows on every rank; many prompts, so that the token is common, not one prompt's.
            prompts = self._prompt_batch(0, 0, 1, min(len(self.prompts), PROBE_PROMPTS))
            sequences, mask, width = self._generate(prompts)
            with torch.no_grad():
                logits = actor(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask)).logits
        self.engine.module.train()
        # The sampler's own probabilities (temperature, top-k) averaged over the generated positions:
        # far less noisy than counting the sampled tokens.
        logits = logits[:, width - 1:-1].float() / ppo.temperature
        if ppo.top_k:
            kth = logits.topk(min(ppo.top_k, logits.shape[-1]), -1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = masked_mean(logits.softmax(-1), mask[:, width:].unsqueeze(-1), dim=(0, 1))
        probs[[i for i in tokenizer.all_special_ids if i < len(probs)]] = -1.0
        target = int(probs.argmax())
        if self.ctx.dist.is_main:
            print(f"hpcllm: toy reward target token {tokenizer.convert_ids_to_tokens(target)!r} (id {target}): "
                  f"{float(probs[target]):.1%} of the starting actor's samples", flush=True)
        return target

    @torch.no_grad()
    def _scores(self, sequences: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
        if self.reward_model is not None:
            return self.reward_model(sequences, mask).float()
        hits = (sequences[:, width:] == self.target_id).float() * mask[:, width:]
        return hits.sum(-1) / mask[:, width:].sum(-1).clamp(min=1)

    def _whole_model(self):
        """Under ZeRO-3 the actor is gathered whole for a rollout (as TRL does for generation): generate()
        runs a different number of forwards per rank, and a forward outside the engine's own call does
        not fetch partitioned parameters reliably. The critic and frozen models run one forward per
        rollout on every rank through their own engines."""
        if self.ctx.cfg.zero.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()))

    def _rollout(self, rollout_index: int) -> dict:
        with torch.no_grad(), self._whole_model():
            return self._rollout_gathered(rollout_index)

    def _rollout_gathered(self, rollout_index: int) -> dict:
        ppo = self.ctx.cfg.method.ppo
        module = self.engine.module
        module.eval()
        prompts = self._prompt_batch(rollout_index, self.ctx.dist.rank, self.ctx.derived.data_parallel_size,
                                     self.rows_per_rank)
        sequences, mask, width = self._generate(prompts)
        action_mask = mask[:, width:]
        responses = sequences[:, width:]
        logits, _ = module(sequences, mask)
        logprobs = token_logprobs(logits[:, width - 1:-1] / ppo.temperature, responses)
        self.critic_engine.eval()
        values = self.critic_engine(sequences, mask, per_token=True)[:, width - 1:-1]
        self.critic_engine.train()
        if self.reference is not None:
            ref_logits = self.reference(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask)).logits
        else:
            with module.actor.disable_adapter():
                ref_logits = module.actor(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask)).logits
        ref_logprobs = token_logprobs(ref_logits[:, width - 1:-1] / ppo.temperature, responses)
        module.train()
        scores = self._scores(sequences, mask, width)
        rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, action_mask, ppo.kl_coef)
        advantages, returns = gae(rewards, values, action_mask, ppo.gamma, ppo.lam)
        rollout = {"index": rollout_index, "prompt_width": width, "input_ids": sequences, "attention_mask": mask,
                   "action_mask": action_mask, "old_logprobs": logprobs, "old_values": values,
                   "advantages": whiten(advantages, action_mask), "returns": returns,
                   "stats": {"mean_reward": scores.mean().item(), "kl": kl.mean().item(),
                             "non_score_reward": (-ppo.kl_coef * kl).mean().item(),
                             "returns": masked_mean(returns, action_mask).item(),
                             "values": masked_mean(values, action_mask).item(),
                             "generation_length": action_mask.sum(-1).float().mean().item()}}
        self._save_rollout(rollout)
        return rollout

    def _micro_batch(self, rollout: dict, rollout_index: int, i: int) -> dict:
        """Micro batch i of a rollout: ppo_epochs passes, each in its own seeded order."""
        epoch, j = divmod(i, self.micro_per_epoch)
        seed = ((self.ctx.cfg.seed * 1_000_003 + rollout_index) * 1009 + epoch) * 1009 + self.ctx.dist.rank
        generator = torch.Generator().manual_seed(seed % 2**63)
        order = torch.randperm(self.rows_per_rank, generator=generator)
        m = self.ctx.cfg.method.micro_batch_size
        rows = order[j * m:(j + 1) * m].to(rollout["input_ids"].device)
        return {**{k: rollout[k][rows] for k in EXPERIENCE_KEYS}, "prompt_width": rollout["prompt_width"],
                "rollout_stats": rollout["stats"]}

    def _ptx_batches(self, micro_step: int) -> Iterator[dict] | None:
        if self.ptx_ds is None:
            return None
        m, dp = self.ctx.cfg.method.micro_batch_size, self.ctx.derived.data_parallel_size
        return iter_batches(self.ptx_ds, m, self.ctx.dist.rank, dp, consumed_samples=micro_step * m * dp,
                            dynamic_padding=self.ctx.cfg.data.dynamic_padding, pad_token_id=self.pad_token_id)

    # -- the current rollout on disk, for an exact resume in the middle of one ---------------------
    def _rollout_path(self, rollout_index: int) -> Path:
        return self.ctx.run_dir / "rollouts" / f"rank{self.ctx.dist.rank}_{rollout_index:08d}.pt"

    def _save_rollout(self, rollout: dict) -> None:
        path = self._rollout_path(rollout["index"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({k: v.cpu() if torch.is_tensor(v) else v for k, v in rollout.items()}, tmp)
        tmp.replace(path)
        # The previous rollout stays: the newest complete checkpoint may still be inside it.
        for old in path.parent.glob(f"rank{self.ctx.dist.rank}_*.pt"):
            if old.name < self._rollout_path(rollout["index"] - 1).name:
                old.unlink()

    def _saved_rollout(self, rollout_index: int) -> dict | None:
        path = self._rollout_path(rollout_index)
        if not path.is_file():
            if self.ctx.dist.is_main:
                print(f"hpcllm: no saved rollout {rollout_index} in {path.parent}: generating it again from the "
                      "checkpoint's actor (the resumed run is not exact)", flush=True)
            return None
        rollout = torch.load(path, weights_only=False)
        return {k: v.to(self.engine.device) if torch.is_tensor(v) else v for k, v in rollout.items()}
