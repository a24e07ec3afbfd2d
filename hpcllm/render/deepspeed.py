"""config -> ds_config.json (pure).

The LR schedule is not rendered here: the training loop owns it (warmup + cosine/linear
decay from the method config) and DeepSpeed checkpoints it as the client scheduler.
"""
from __future__ import annotations

from omegaconf import DictConfig

from hpcllm.config import Derived


def _zero_section(zero: DictConfig) -> dict:
    section = {
        "stage": zero.stage,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": zero.contiguous_gradients,
        "reduce_bucket_size": zero.reduce_bucket_size,
    }
    if zero.stage in (1, 2):
        section.update(
            allgather_partitions=True,
            allgather_bucket_size=zero.allgather_bucket_size,
            reduce_scatter=True,
            round_robin_gradients=zero.round_robin_gradients,
        )
    if zero.stage == 3:
        section.update(
            stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold,
            stage3_max_live_parameters=zero.stage3_max_live_parameters,
            stage3_max_reuse_distance=zero.stage3_max_reuse_distance,
            stage3_gather_16bit_weights_on_model_save=zero.stage3_gather_16bit_weights_on_model_save,
        )
    if zero.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": zero.pin_memory}
    if zero.offload_param:
        section["offload_param"] = {"device": "cpu", "pin_memory": zero.pin_memory}
    if zero.stage == 0:
        return {"stage": 0}
    return section


def render_ds_config(cfg: DictConfig, derived: Derived) -> dict:
    """A complete DeepSpeed config for the job (optimizer, batch sizes, precision, ZeRO)."""
    method = cfg.method
    on_cpu = cfg.hw.accelerator == "cpu"
    adam = {
        "lr": method.lr,
        "betas": [method.adam_beta1, method.adam_beta2],
        "eps": 1e-8,
        "weight_decay": method.weight_decay,
    }
    if on_cpu and not cfg.zero.offload_optimizer:
        # DeepSpeed's fused Adam is a CUDA kernel; torch's AdamW is the CPU equivalent.
        adam["torch_adam"] = True
    return {
        "train_batch_size": derived.global_batch_size,
        "train_micro_batch_size_per_gpu": method.micro_batch_size,
        "gradient_accumulation_steps": derived.grad_accum_steps,
        "gradient_clipping": method.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "bf16": {"enabled": derived.precision == "bf16"},
        "fp16": {
            "enabled": derived.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": _zero_section(cfg.zero),
        "activation_checkpointing": {"partition_activations": False},
        "steps_per_print": 2**31 - 1,  # hpcllm logs metrics itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
