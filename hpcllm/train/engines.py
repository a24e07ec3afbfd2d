"""DeepSpeed engines: trained ones (the loop's model, PPO's critic) and optimizer-less ones for frozen models."""
from __future__ import annotations

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator


def training_engine(model: torch.nn.Module, parameters: list, ds_config: dict, lr_scheduler):
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameters, config=ds_config,
                                           lr_scheduler=lr_scheduler)
    return engine


def frozen_engine(model: torch.nn.Module, ds_config: dict | None, name: str = "frozen model"):
    """A model that only runs forward: under a ZeRO-3 ``ds_config`` an engine without optimizer whose
    parameters are partitioned (and offloaded where the config says); with None a replica on this
    rank's device. Either is called like the module (all ranks must run the same number of forwards
    through a partitioned one)."""
    model.requires_grad_(False).eval()
    if ds_config is None:
        model = model.to(get_accelerator().current_device_name())
        _report(name, f"a replica of all {sum(p.numel() for p in model.parameters()):,} parameters on every rank")
        return model
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    params = list(engine.module.parameters())
    local = sum(p.ds_tensor.numel() for p in params)
    where = "cpu" if ds_config["zero_optimization"].get("offload_param") else get_accelerator().device_name()
    _report(name, f"ZeRO-3 partitioned, {local:,} of its {sum(p.ds_numel for p in params):,} parameters held "
                  f"by rank 0, on {where}")
    return engine


def _report(name: str, how: str) -> None:
    if deepspeed.comm.get_rank() == 0:
        print(f"hpcllm: {name}: {how}", flush=True)
