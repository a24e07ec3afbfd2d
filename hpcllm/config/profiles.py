"""Per-model ZeRO profiles: PPO's critic, reference and reward models (and DPO's reference) may each
use a ``conf/zero`` preset of their own, named by ``method.ppo.<role>_zero`` / ``method.dpo.reference_zero``.

The trained model of a job (the policy, PPO's actor) always uses the job's ``zero=``.
"""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from hpcllm.config import PROJECT_ROOT
from hpcllm.config.derive import ConfigError

ZERO_DIR = os.path.join(PROJECT_ROOT, "conf", "zero")


def zero_preset(name: str, key: str = "zero") -> DictConfig:
    """The ``conf/zero/<name>.yaml`` preset, checked against the ZeroConfig schema."""
    from hpcllm.config.schema import ZeroConfig

    path = os.path.join(ZERO_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(ZERO_DIR) if f.endswith(".yaml"))
        raise ConfigError(f"{key}={name!r} is not a ZeRO preset: use one of {', '.join(known)} (conf/zero/)")
    preset = OmegaConf.load(path)
    preset.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(ZeroConfig), preset)


def role_key(cfg: DictConfig, role: str) -> str | None:
    """The config key naming ``role``'s profile in this job, or None when the role has no key of its own."""
    stage = cfg.method.stage
    if stage == "ppo" and role in ("critic", "reference", "reward"):
        return f"method.ppo.{role}_zero"
    if stage == "dpo" and role == "reference":
        return "method.dpo.reference_zero"
    return None


def model_zero(cfg: DictConfig, role: str) -> DictConfig:
    """The ZeRO profile ``role`` runs under: its own preset if one is named, else the job's ``zero``."""
    key = role_key(cfg, role)
    name = OmegaConf.select(cfg, key) if key else None
    if name is None or name == cfg.zero.name:
        return cfg.zero
    return zero_preset(name, key)


def extra_models(cfg: DictConfig) -> dict:
    """role -> (profile, trained?) for the models a job runs beside its trained one."""
    stage = cfg.method.stage
    if stage == "ppo":
        models = {"critic": True, "reference": cfg.method.adapter != "lora", "reward": cfg.method.ppo.reward_model}
    elif stage == "dpo":
        models = {"reference": cfg.method.adapter != "lora" and not cfg.method.dpo.precompute_reference}
    else:
        return {}
    return {role: (model_zero(cfg, role), role == "critic") for role, present in models.items() if present}


def describe_extra_models(cfg: DictConfig) -> list[str]:
    """One line per extra model: its profile and how it is held (for dry runs and the estimate)."""
    lines = []
    for role, (zero, trained) in extra_models(cfg).items():
        if trained:
            how = f"trained in its own engine (ds_config_{role}.json)"
        elif zero.stage == 3:
            where = "offloaded to CPU memory" if zero.offload_param else "on each rank's device"
            how = f"frozen, parameters partitioned over ranks, {where} (ds_config_{role}.json)"
        else:
            how = "frozen, a full replica on every rank"
        lines.append(f"{role}: zero={zero.name}, {how}")
    return lines
