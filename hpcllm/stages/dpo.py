"""DPO (and IPO, hinge): a policy trained on chosen/rejected pairs against a frozen reference.

The reference is the starting model: with method.adapter=lora it is the policy with its adapter
disabled (one model copy in memory); otherwise a frozen copy under method.dpo.reference_zero
(default the job's zero): partitioned over the ranks in an optimizer-less engine under a ZeRO-3
profile, a full replica on every rank under any other. With method.dpo.precompute_reference=true a
pre-pass computes the reference log-probabilities of every row once, before the first step, and
stores them in ``run_dir/data/<split>_reference_logps.npy`` (beside the run's memmaps; a resumed run
reuses them), so training runs the policy only.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np
import torch

from hpcllm.stages.base import StageContext
from hpcllm.stages.losses import dpo_loss, sequence_logprobs
from hpcllm.stages.lm import build_policy, build_reference
from hpcllm.stages.reward import PreferenceStage, stack_pairs

REFERENCE_KEYS = ("reference_chosen", "reference_rejected")


class DPOStage(PreferenceStage):
    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.uses_adapter_as_reference = ctx.cfg.method.adapter == "lora"
        needs_copy = not self.uses_adapter_as_reference and not ctx.cfg.method.dpo.precompute_reference
        self.model = build_policy(ctx, keep_start=needs_copy)
        self.pad_token_id = ctx.tokenizer.pad_token_id if ctx.tokenizer is not None else 0
        self.reference = self.frozen_model("reference", lambda: build_reference(ctx)) if needs_copy else None
        self.precomputed: dict = {}

    def bind(self, engine, extra_engines: dict | None = None) -> None:
        super().bind(engine, extra_engines)
        if self.ctx.cfg.method.dpo.precompute_reference:
            # Called before a checkpoint is loaded: engine.module still holds the starting weights.
            for split, ds in (("train", self.train_ds), ("eval", self.eval_ds)):
                if ds is not None:
                    self.precomputed[split] = self._reference_logps(split, ds)

    # -- reference log-probabilities ------------------------------------------------------------
    def _reference_context(self):
        return self.engine.module.disable_adapter() if self.uses_adapter_as_reference else contextlib.nullcontext()

    @torch.no_grad()
    def _reference_pair_logps(self, pairs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.reference if self.reference is not None else self.engine.module
        with self._reference_context():
            logits = model(input_ids=pairs["input_ids"], attention_mask=pairs["attention_mask"]).logits
        return sequence_logprobs(logits, pairs["labels"]).chunk(2)

    def _reference_logps(self, split: str, ds) -> np.ndarray:
        """[rows, 2] reference log-probs (chosen, rejected), from the file or computed by all ranks."""
        path = self.ctx.run_dir / "data" / f"{split}_reference_logps.npy"
        if path.is_file():
            return np.load(path)
        world, rank, m = self.ctx.derived.data_parallel_size, self.ctx.dist.rank, self.ctx.cfg.method.micro_batch_size
        per_rank = -(-len(ds) // world)
        per_rank = -(-per_rank // m) * m  # equal forward counts on every rank (ZeRO-3 gathers collectively)
        mine = []
        self.engine.module.eval()
        for start in range(rank * per_rank, (rank + 1) * per_rank, m):
            rows = {k: torch.from_numpy(v.astype(np.int64)) for k, v in ds.rows(start, start + m).items()}
            pairs = {k: v.to(self.engine.device) for k, v in stack_pairs(rows, self.pad_token_id).items()}
            mine.append(torch.stack(self._reference_pair_logps(pairs), -1).double().cpu())
        self.engine.module.train()
        mine = torch.cat(mine)
        if world > 1:
            gathered = [torch.empty_like(mine) for _ in range(world)]
            torch.distributed.all_gather(gathered, mine)
            mine = torch.cat(gathered)
        table = mine[:len(ds)].numpy()
        if self.ctx.dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".tmp.npy")
            np.save(tmp, table)
            os.replace(tmp, path)
        return table

    # -- batches ------------------------------------------------------------------------------
    def _with_reference(self, split: str, ds, micro_step: int) -> Iterator[dict]:
        """The memmap batches, plus the precomputed reference log-probs of their rows when there are any."""
        batches = self._iter(ds, micro_step)
        if split not in self.precomputed:
            yield from batches
            return
        table, m = self.precomputed[split], self.ctx.cfg.method.micro_batch_size
        start = micro_step * self.rows_per_micro_step + self.ctx.dist.rank * m  # as iter_batches picks rows
        for batch in batches:
            rows = torch.from_numpy(table[np.arange(start, start + m) % len(ds)])
            yield {**batch, "reference_chosen": rows[:, 0], "reference_rejected": rows[:, 1]}
            start += self.rows_per_micro_step

    def train_batches(self, micro_step: int) -> Iterator[dict]:
        return self._with_reference("train", self.train_ds, micro_step)

    def eval_batches(self) -> list[dict] | None:
        if self.eval_ds is None:
            return None
        count = min(self.ctx.cfg.train.eval_batches, len(self.eval_ds) // self.rows_per_micro_step)
        batches = self._with_reference("eval", self.eval_ds, 0)
        return [next(batches) for _ in range(count)]

    # -- loss ---------------------------------------------------------------------------------
    def loss(self, engine, batch: dict):
        pairs = stack_pairs(batch, self.pad_token_id)
        logits = engine(input_ids=pairs["input_ids"], attention_mask=pairs["attention_mask"]).logits
        policy_chosen, policy_rejected = sequence_logprobs(logits, pairs["labels"]).chunk(2)
        if "reference_chosen" in batch:
            reference_chosen, reference_rejected = (batch[k].to(policy_chosen.dtype) for k in REFERENCE_KEYS)
        else:
            reference_chosen, reference_rejected = self._reference_pair_logps(pairs)
        dpo = self.ctx.cfg.method.dpo
        return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                        dpo.beta, dpo.loss, dpo.label_smoothing)
