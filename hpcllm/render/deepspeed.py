"""config -> ds_config.json, and one ds_config_<role>.json per extra model of PPO/DPO (pure).

The LR schedule is not rendered here: the training loop owns it (warmup + cosine/linear
decay from the method config) and DeepSpeed checkpoints it as the client scheduler.

Extra models: PPO's critic trains in an engine of its own (``ds_config_critic.json``, the job's
config with the critic's ZeRO profile). A frozen model (DPO/PPO reference, PPO reward) has no
optimizer, gradients or optimizer state, so ZeRO stages 1-2 have nothing to partition for it: under
a stage-3 profile it gets an optimizer-less engine (``ds_config_<role>.json``, parameters partitioned
and optionally offloaded, as DeepSpeed-Chat serves its reference and reward models); under any
other profile it is a plain replica on every rank and has no DeepSpeed config. The model that
method=eval scores is such a frozen model under the job's zero (``ds_config_eval.json`` under ZeRO-3).
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


def render_ds_config(cfg: DictConfig, derived: Derived, zero: DictConfig | None = None) -> dict:
    """A complete DeepSpeed config for the job (optimizer, batch sizes, precision, ZeRO).

    ``zero``: another model's ZeRO profile in place of the job's (PPO's critic)."""
    method, zero = cfg.method, zero if zero is not None else cfg.zero
    on_cpu = cfg.hw.accelerator == "cpu"
    adam = {
        "lr": method.lr,
        "betas": [method.adam_beta1, method.adam_beta2],
        "eps": 1e-8,
        "weight_decay": method.weight_decay,
    }
    if on_cpu and not zero.offload_optimizer:
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
        "zero_optimization": _zero_section(zero),
        "activation_checkpointing": {"partition_activations": False},
        "steps_per_print": 2**31 - 1,  # hpcllm logs metrics itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def render_frozen_ds_config(cfg: DictConfig, derived: Derived, zero: DictConfig) -> dict:
    """An optimizer-less ZeRO-3 engine's config for a frozen model: partitioned parameters, offloaded
    to the CPU where the profile offloads parameters."""
    assert zero.stage == 3, "frozen models under ZeRO stages 0-2 are replicas without a DeepSpeed config"
    config = render_ds_config(cfg, derived, zero)
    del config["optimizer"], config["gradient_clipping"]
    config["zero_optimization"].pop("offload_optimizer", None)
    return config


def render_ds_configs(cfg: DictConfig, derived: Derived) -> dict:
    """file name -> DeepSpeed config, for every engine the job builds (see the module docstring)."""
    from hpcllm.config.profiles import extra_models

    configs = {"ds_config.json": render_ds_config(cfg, derived)}
    if cfg.method.stage == "eval" and cfg.zero.stage == 3:
        # Evaluation trains nothing: the evaluated model is frozen, partitioned like PPO's frozen models.
        configs["ds_config_eval.json"] = render_frozen_ds_config(cfg, derived, cfg.zero)
    for role, (zero, trained) in extra_models(cfg).items():
        if trained:
            configs[f"ds_config_{role}.json"] = render_ds_config(cfg, derived, zero)
        elif zero.stage == 3:
            configs[f"ds_config_{role}.json"] = render_frozen_ds_config(cfg, derived, zero)
    return configs
