"""Language-model stages: continued pretraining and SFT (full, LoRA, freeze, P-tuning), optionally
mixing pretraining data into SFT with ``data.pretrain_ratio``."""
from __future__ import annotations

import math
from typing import Iterator

from omegaconf import OmegaConf

from hpcllm.config import ConfigError
from hpcllm.data import MemmapDataset, iter_batches, lm_inputs, tokenizer_hash
from hpcllm.models.adapters import apply_adapter
from hpcllm.models.build import base_model_dir, build_model, save_base_model
from hpcllm.stages.base import Stage, StageContext

def build_policy(ctx: StageContext, keep_start: bool = False):
    """The causal LM every stage starts from: weights, gradient checkpointing, adapter.

    ``keep_start``: a frozen reference will need these starting weights again (DPO, PPO): unless
    ``model.path`` holds them as they are, they are saved to ``run_dir/base_model`` once."""
    cfg = ctx.cfg
    model = build_model(cfg.model, precision=ctx.derived.precision, attention=cfg.train.attention,
                        seed=cfg.seed, tokenizer=ctx.tokenizer)
    if ctx.tokenizer is not None and len(ctx.tokenizer) > cfg.model.vocab_size and not cfg.model.path:
        raise ConfigError(f"the tokenizer has {len(ctx.tokenizer)} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}: raise model.vocab_size or use a smaller tokenizer")
    resized = ctx.tokenizer is not None and len(ctx.tokenizer) > model.get_input_embeddings().num_embeddings
    if resized:
        model.resize_token_embeddings(len(ctx.tokenizer))  # e.g. a vocabulary extended with Chinese tokens
    adapter_base = cfg.method.adapter in ("lora", "ptuning") and not cfg.model.path
    if adapter_base or (keep_start and (not cfg.model.path or resized)):
        # The frozen base of an adapter run (the exported adapter needs weights to load onto), or the
        # starting weights a frozen reference copies.
        save_base_model(model, ctx)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return apply_adapter(model, cfg.method, cfg.model)


def build_reference(ctx: StageContext):
    """A new copy of the starting model (``build_policy(ctx, keep_start=True)`` ran first): ``model.path``,
    or the starting weights saved in ``run_dir/base_model``."""
    base = base_model_dir(ctx.run_dir)
    model = OmegaConf.merge(ctx.cfg.model, {"path": str(base)}) if base.is_dir() else ctx.cfg.model
    return build_model(model, precision=ctx.derived.precision, attention=ctx.cfg.train.attention,
                       seed=ctx.cfg.seed, tokenizer=ctx.tokenizer)


def open_dataset(ctx: StageContext, split: str, kinds: tuple[str, ...]) -> MemmapDataset | None:
    path = ctx.data.get(split)
    if path is None:
        return None
    ds = MemmapDataset(path, expect_seq_len=ctx.cfg.method.seq_len,
                       expect_tokenizer_hash=tokenizer_hash(ctx.tokenizer) if ctx.tokenizer is not None else None)
    if ds.kind not in kinds:
        raise ConfigError(f"data.{split}={path} holds {ds.kind} data, but method={ctx.cfg.method.name} "
                          f"trains on {' or '.join(kinds)} data")
    return ds


class MemmapStage(Stage):
    """A stage whose batches are rows of memmaps, sharded over data-parallel ranks."""

    data_kinds: tuple[str, ...] = ("sft", "pretrain")

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.train_ds = open_dataset(ctx, "train", self.data_kinds)  # data.train is set (derive() checked)
        self.eval_ds = open_dataset(ctx, "eval", self.data_kinds)

    @property
    def rows_per_micro_step(self) -> int:
        return self.ctx.cfg.method.micro_batch_size * self.ctx.derived.data_parallel_size

    def _iter(self, ds: MemmapDataset, micro_step: int) -> Iterator[dict]:
        dp = self.ctx.derived.data_parallel_size
        # This rank's data-parallel index: with pipeline stages (pipe-major ranks) the stages of one pipe share it.
        return iter_batches(ds, self.ctx.cfg.method.micro_batch_size, self.ctx.dist.rank % dp, dp,
                            consumed_samples=micro_step * self.rows_per_micro_step,
                            dynamic_padding=self.ctx.cfg.data.dynamic_padding,
                            pad_token_id=self.ctx.tokenizer.pad_token_id if self.ctx.tokenizer is not None else 0)

    def samples_per_epoch(self) -> int:
        return len(self.train_ds)

    def train_batches(self, micro_step: int) -> Iterator[dict]:
        return self._iter(self.train_ds, micro_step)

    def eval_batches(self) -> list[dict] | None:
        if self.eval_ds is None:
            return None
        count = min(self.ctx.cfg.train.eval_batches, len(self.eval_ds) // self.rows_per_micro_step)
        batches = self._iter(self.eval_ds, 0)
        return [next(batches) for _ in range(count)]


class LMStage(MemmapStage):
    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.model = build_policy(ctx)
        if ctx.cfg.train.pipeline_parallel > 1:
            from hpcllm.train.pipeline import pipeline_model

            self.model = pipeline_model(ctx, self.model)
        ratio = ctx.cfg.data.pretrain_ratio
        # derive() checked at composition that the ratio is in [0, 1) and data.pretrain is set.
        self.pretrain_ds = open_dataset(ctx, "pretrain", ("pretrain",)) if ratio > 0 else None

    def _is_pretrain_step(self, micro_step: int) -> bool:
        """Micro steps alternate deterministically so that a resumed run draws the same sources."""
        ratio = self.ctx.cfg.data.pretrain_ratio
        return math.floor((micro_step + 1) * ratio) > math.floor(micro_step * ratio)

    def train_batches(self, micro_step: int) -> Iterator[dict]:
        if self.pretrain_ds is None:
            yield from self._iter(self.train_ds, micro_step)
            return
        pretrain_steps = math.floor(micro_step * self.ctx.cfg.data.pretrain_ratio)
        sources = {"pretrain": self._iter(self.pretrain_ds, pretrain_steps),
                   "sft": self._iter(self.train_ds, micro_step - pretrain_steps)}
        while True:
            source = "pretrain" if self._is_pretrain_step(micro_step) else "sft"
            yield {**next(sources[source]), "source": source}
            micro_step += 1

    def loss(self, engine, batch: dict):
        if self.ctx.cfg.train.pipeline_parallel > 1:  # only evaluation asks (the pipeline trains whole steps)
            from hpcllm.train.pipeline import eval_loss

            return eval_loss(engine, batch), {}
        out = engine(**lm_inputs(batch))
        source = batch.get("source")
        return out.loss, ({f"loss_{source}": out.loss.detach()} if source else {})

    def export(self, engine, out_dir) -> None:
        if self.ctx.cfg.train.pipeline_parallel > 1:
            from hpcllm.train import pipeline

            pipeline.export(self, engine, out_dir)
            return
        super().export(engine, out_dir)
