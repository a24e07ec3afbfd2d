"""Talk to a trained model: load an exported directory (full weights, or a LoRA / P-tuning adapter on its
base), turn a conversation into the prompt the model was trained on, and generate.

The prompt comes from the run's own ``hpcllm_config.yaml`` (the family format it was trained with), else
from the tokenizer's chat template, else the text is used as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from hpcllm.data.prompts import Chat, Turn, get_format

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False,
                    "repetition_penalty": self.repetition_penalty}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "repetition_penalty": self.repetition_penalty}


@dataclass
class Conversation:
    system: Optional[str] = None
    # {"role": "user"|"assistant", "content"}; a user message may carry an instruction record's "input"
    messages: List[Dict[str, str]] = field(default_factory=list)


def run_config(model_dir: Path) -> Optional[dict]:
    """The hpcllm config a model was exported with (None for any other Hugging Face directory)."""
    path = Path(model_dir) / "hpcllm_config.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else None


class ChatModel:
    def __init__(self, model_dir: str | Path, *, prompt_format: str = "auto", dtype: str = "auto",
                 trust_remote_code: Optional[bool] = None, device: str = "auto"):
        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file() and not (self.dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{self.dir}: no config.json or adapter_config.json: not a model directory "
                                    "(give a run's final/ or a Hugging Face model directory)")
        cfg = run_config(self.dir) or {}
        model_cfg = cfg.get("model", {})
        trust = model_cfg.get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code
        self.tokenizer, self.model = _load(self.dir, trust, dtype, device)
        self.format_id = _format_id(prompt_format, model_cfg, self.tokenizer)
        self.special_tokens = model_cfg.get("special_tokens") or {}

    def prompt_text(self, conv: Conversation) -> str:
        """The text the model sees before its answer, as its training rendered the same conversation."""
        if self.format_id == "tokenizer":
            messages = ([{"role": "system", "content": conv.system}] if conv.system else []) + conv.messages
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.format_id == "plain":
            return "\n".join(m["content"] for m in conv.messages)
        fmt = get_format(self.format_id)
        turns = [Turn("user", m["content"], m.get("input")) if m["role"] == "user" else
                 Turn("assistant", [(m["content"], False)]) for m in conv.messages]
        pieces = fmt.render(Chat(turns, conv.system), fmt.resolve_tokens(self.special_tokens, self.tokenizer),
                            generation_prompt=True)
        return "".join(p.text for p in pieces)

    def encode(self, conv: Conversation) -> torch.Tensor:
        # The whole prompt text at once, as the family's reference tokenizes it (special tokens stay single ids).
        ids = self.tokenizer(self.prompt_text(conv), add_special_tokens=False, return_tensors="pt").input_ids
        return ids.to(self.model.device)

    def reply(self, conv: Conversation, sampling: Sampling, streamer=None) -> str:
        ids = self.encode(conv)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                      pad_token_id=self.tokenizer.pad_token_id, **sampling.generate_kwargs())
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _format_id(wanted: str, model_cfg: dict, tokenizer) -> str:
    if wanted != "auto":
        if wanted not in ("tokenizer", "plain"):
            get_format(wanted)  # an unknown id fails here, listing the known ones
        return wanted
    if model_cfg.get("prompt_format"):
        return model_cfg["prompt_format"]
    return "tokenizer" if getattr(tokenizer, "chat_template", None) else "plain"


def _load(model_dir: Path, trust: bool, dtype: str, device: str):
    from transformers import AutoTokenizer

    from hpcllm.models.build import auto_class

    on_gpu = torch.cuda.is_available() and device != "cpu"
    torch_dtype = DTYPES.get(dtype) or (torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else
                                        torch.float16 if on_gpu else torch.float32)
    # Several GPUs: layers spread over them (transformers' device_map, needs accelerate); one: all on it.
    placement = {"device_map": "auto"} if on_gpu and torch.cuda.device_count() > 1 else {}
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (model_dir / "adapter_config.json").is_file():  # LoRA / P-tuning: peft loads the base and the adapter
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, trust_remote_code=trust,
                                                         **placement)
    else:
        model = auto_class(str(model_dir)).from_pretrained(model_dir, dtype=torch_dtype, trust_remote_code=trust,
                                                          **placement)
    if on_gpu and not placement:
        model = model.cuda()
    return tokenizer, model.eval()
