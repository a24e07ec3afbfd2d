"""A causal LM backbone with a scalar value head: reward models and PPO critics.

On disk a reward model is a Hugging Face causal-LM directory (LoRA merged into the weights) plus
``value_head.safetensors`` (``weight`` [1, hidden], ``bias`` [1]); ``load_reward_model(dir)``
reads it back.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last non-padding token of each row (right, left or both sides padded)."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(-1).long().argmax(-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, so that left-padded rows see the positions generate() used."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class RewardModel(nn.Module):
    """``values(...)`` (or ``forward(..., per_token=True)``): one scalar per position; ``forward(...)``: the
    value at each row's last token."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The decoder alone: the backbone's LM head (vocabulary-sized logits) is never needed here.
        decoder = self.backbone.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids(attention_mask)).last_hidden_state
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        values = self.values(input_ids, attention_mask)
        if per_token:
            return values
        return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


def plain_state_dict(state_dict: dict, prefix: str = "", lora_scaling: float | None = None) -> dict:
    """The Hugging Face state dict of a (possibly peft-wrapped) causal LM found under ``prefix``:
    LoRA merged as ``W + scaling B A``, peft's wrapper prefixes and modules_to_save copies resolved."""
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not any(k.startswith("base_model.model.") for k in own):
        return own
    plain = {}
    for key, value in own.items():
        key = key[len("base_model.model."):]
        if ".lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        plain[key] = value
    for key, a in own.items():
        match = re.fullmatch(r"base_model\.model\.(.*)\.lora_A\.default\.weight", key)
        if match:
            b = own[key.replace(".lora_A.", ".lora_B.")]
            weight = match.group(1) + ".weight"
            plain[weight] = plain[weight] + (lora_scaling * (b.float() @ a.float())).to(plain[weight].dtype)
    return plain


def hf_model(backbone: nn.Module):
    """The transformers model inside a peft wrapper (or the model itself), for its config and save_pretrained."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def save_causal_lm(backbone: nn.Module, state_dict: dict, out_dir: Path) -> None:
    hf_model(backbone).save_pretrained(out_dir, state_dict={k: v.contiguous() for k, v in state_dict.items()})


def save_reward_model(model: RewardModel, state_dict: dict, out_dir: Path, lora_scaling: float | None = None,
                      prefix: str = "") -> None:
    """Write ``model`` (its full ``state_dict``, keys under ``prefix``) as a reward-model directory."""
    from safetensors.torch import save_file

    save_causal_lm(model.backbone, plain_state_dict(state_dict, prefix + "backbone.", lora_scaling), out_dir)
    head = {k: state_dict[f"{prefix}value_head.{k}"].detach().float().contiguous() for k in ("weight", "bias")}
    save_file(head, str(Path(out_dir) / VALUE_HEAD_FILE))


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32, attention: str = "sdpa",
                      trust_remote_code: bool = False) -> RewardModel:
    """A reward model directory written by ``save_reward_model`` (method=reward's ``final/``), in eval mode.

    Its backbone's own Python code (``auto_map``) runs only with ``trust_remote_code`` (the model preset's)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / VALUE_HEAD_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {VALUE_HEAD_FILE}: give the final/ directory of a method=reward run")
    try:
        backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention,
                                                        trust_remote_code=trust_remote_code)
    except ValueError as err:
        from hpcllm.models.build import untrusted_code, untrusted_code_error

        if not untrusted_code(err):
            raise

        raise untrusted_code_error(f"method.ppo.reward_model={path}") from None
    model = RewardModel(backbone)
    model.value_head.load_state_dict(load_file(str(path / VALUE_HEAD_FILE)))
    return model.to(dtype).eval()
