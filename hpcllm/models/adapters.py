"""What trains: LoRA and P-tuning v2 through peft, layer freezing by parameter name."""
from __future__ import annotations

import re

import torch
from omegaconf import DictConfig


def apply_lora(model, method: DictConfig, model_cfg: DictConfig):
    from peft import LoraConfig, TaskType, get_peft_model

    lora = method.lora
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.targets or model_cfg.lora_targets),
        modules_to_save=list(lora.extra_trainable) or None,
    )
    return get_peft_model(model, config)


def apply_ptuning(model, method: DictConfig, model_cfg: DictConfig):
    """P-tuning v2: trainable key/value prefixes in every layer (peft prefix tuning)."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    pt = method.ptuning
    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=pt.num_virtual_tokens,
        prefix_projection=pt.prefix_projection, encoder_hidden_size=pt.projection_hidden_size,
    )
    return get_peft_model(model, config)


def trainable_layer_prefixes(model_cfg: DictConfig, trainable_layers: int) -> list[str]:
    first = model_cfg.num_layers - trainable_layers
    return [model_cfg.layer_pattern.format(i=i) for i in range(first, model_cfg.num_layers)]


def apply_freeze(model, method: DictConfig, model_cfg: DictConfig):
    """Only the last ``freeze.trainable_layers`` layers (and ``freeze.extra_trainable`` regexes) train."""
    prefixes = trainable_layer_prefixes(model_cfg, method.freeze.trainable_layers)
    extra = [re.compile(p) for p in method.freeze.extra_trainable]
    matched = 0
    for name, param in model.named_parameters():
        train = name.startswith(tuple(prefixes)) or any(p.search(name) for p in extra)
        param.requires_grad_(train)
        matched += train
    if not matched:
        raise ValueError(f"method=freeze: no parameter matches {prefixes} (model.layer_pattern="
                         f"{model_cfg.layer_pattern!r}); fix model.layer_pattern for this model")
    return model


ADAPTERS = {"none": lambda model, method, model_cfg: model, "lora": apply_lora,
            "ptuning": apply_ptuning, "freeze": apply_freeze}


def apply_adapter(model, method: DictConfig, model_cfg: DictConfig):
    return ADAPTERS[method.adapter](model, method, model_cfg)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters (full sizes, also when ZeRO-3 has partitioned them)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    total = sum(n for n, _ in sizes)
    trainable = sum(n for n, grad in sizes if grad)
    return trainable, total
