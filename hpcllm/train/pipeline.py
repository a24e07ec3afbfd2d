"""What the loop and the LM stage do differently under pipeline parallelism (train.pipeline_parallel > 1).

DeepSpeed's PipelineEngine runs a whole optimizer step itself (``train_batch``: the 1F1B schedule over
the step's micro batches, gradient all-reduce over the data-parallel replicas, tied-weight gradients,
clipping, the optimizer and LR scheduler), so the loop hands it the step's micro batches instead of
calling forward/backward/step per micro batch. Ranks are laid out pipe-major (rank = stage x data-parallel
size + data-parallel index): the first and last stage of one pipe read the same rows.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hpcllm.models.pipeline import build_pipeline_module, pp_to_hf_state, save_hf_weights
from hpcllm.train.checkpoint import complete_checkpoints


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def pipeline_model(ctx, hf_model: torch.nn.Module):
    """The PipelineModule of the stage's Hugging Face model: this rank's layers, with its weights (the
    same values a non-pipeline run of the same seed starts from)."""
    train = ctx.cfg.train
    parts = list(train.pipeline_parts) if train.pipeline_parts is not None else None
    return build_pipeline_module(hf_model.config, hf_model.state_dict(), num_stages=train.pipeline_parallel,
                                 partition=train.pipeline_partition, parts=parts,
                                 checkpoint_layers=train.gradient_checkpointing, seed=ctx.cfg.seed,
                                 dynamic_shape=ctx.cfg.data.dynamic_padding)


def pipeline_parameter_counts(engine) -> tuple[int, int]:
    """(trainable, total) parameters of the whole pipeline: the stages' counts summed over one replica
    (the last stage's copy of tied embeddings not counted twice)."""
    from hpcllm.distributed import all_reduce
    from hpcllm.models.adapters import parameter_counts

    module = engine.module
    trainable, total = parameter_counts(module)
    if module.tied_modules and engine.is_last_stage() and not engine.is_first_stage():
        tied = sum(p.numel() for m in module.tied_modules.values() for p in m.parameters())
        trainable, total = trainable - tied, total - tied
    dp = engine.grid.get_data_parallel_world_size()
    summed = all_reduce([float(trainable), float(total)])
    return int(summed[0]) // dp, int(summed[1]) // dp


def _pair(batch: dict):
    """A micro batch as the pipeline takes it: (first stage's inputs, last stage's labels)."""
    return (batch["input_ids"], batch["attention_mask"]), batch["labels"]


def train_batch(trainer, batches) -> tuple[torch.Tensor, int]:
    """One optimizer step over the step's micro batches: (the step's mean loss, this rank's share of its
    tokens). Every rank draws the step's batches (so tokens/s and the data position agree on all stages);
    the pipeline reads them on its first and last stage."""
    micro = [next(batches) for _ in range(trainer.accum)]
    loss = trainer.engine.train_batch(iter([_pair(b) for b in micro]))  # the step's mean loss, on every rank
    tokens = sum(trainer.stage.tokens(b) for b in micro)
    return loss.detach(), tokens // trainer.ctx.cfg.train.pipeline_parallel  # each pipe's stages share the rows


def eval_loss(engine, batch: dict) -> torch.Tensor:
    """The loss of one eval micro batch through the pipeline (all stages call it; averaged over replicas)."""
    return engine.eval_batch(iter([_pair(batch)]), num_micro_batches=1)


def export(stage, engine, out_dir: Path) -> None:
    """``final/`` in Hugging Face format, converted by the main rank from the layer files of the
    checkpoint the loop saved just before (every stage wrote its own layers there)."""
    checkpoint = complete_checkpoints(stage.ctx.run_dir / "checkpoints")[-1]
    config = engine.module.hf_config

    def write(tmp: Path) -> None:
        save_hf_weights(pp_to_hf_state(checkpoint, config), config, tmp)

    stage.write_export(out_dir, write)
