"""Recipes: the published hyper-parameters a method runs with for a model of a given size.

A method preset (``conf/method/*.yaml``) says what a method is: its stage, adapter, data and loss.
How to run it (learning rate, epochs, warmup, batch, sequence length) depends on the model: a
learning rate that trains a 2M-parameter demo model destroys a 7B one. Every ``method.*`` value left
``null`` is filled here, at composition, from the recipe of the model's size; a value set on the
command line or in a preset always wins. Each value carries its source, written into the resolved
``config.yaml`` (``method.recipe_sources``) and shown by a dry run.

Tiny test models set ``model.recipe: demo``: the values that make a 2M-parameter random model learn
the bundled demo data in a minute on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from omegaconf import DictConfig, open_dict

from hpcllm.config.errors import ConfigError

ALPACA = "Stanford Alpaca README (7B: lr 2e-5, 13B: 1e-5; batch 128, 3 epochs, warmup_ratio 0.03, wd 0)"
VICUNA = "FastChat/Vicuna train script (model_max_length 2048)"
LLAMA_PAPER = "LLaMA paper, Touvron et al. 2023, sec. 2.2 (lr 3e-4 for 7B/13B, 1.5e-4 for 33B/65B, " \
              "4M-token batches, 2000 warmup steps, wd 0.1)"
QLORA = "QLoRA paper, Dettmers et al. 2023, app. B.2 (lr 2e-4 for 7B/13B, 1e-4 for 33B/65B; batch 16/16/32/64; " \
        "warmup_ratio 0.03)"
ALPACA_LORA = "tloen/alpaca-lora finetune.py (3 epochs)"
LF_LORA = "LLaMA-Factory examples/train_lora/llama3_lora_*.yaml (cutoff_len 2048)"
FREEZE = "liucongg/ChatGLM-Finetuning README, freeze (lr 1e-4, warmup_ratio 0.1, wd 0.1, last 4 of 28 layers)"
PTUNING = "THUDM/ChatGLM-6B ptuning/train.sh (LR=2e-2, PRE_SEQ_LEN=128, batch 1 x accumulation 16)"
INSTRUCTGPT = "InstructGPT paper, Ouyang et al. 2022, app. C.2 (reward model: lr 9e-6, batch 64, 1 epoch)"
DPO_PAPER = "DPO paper, Rafailov et al. 2023, app. B (beta 0.1, lr 1e-6, batch 64)"
HANDBOOK = "HF alignment-handbook zephyr-7b-beta recipes (warmup_ratio 0.1, max_length 1024; DPO-QLoRA lr 5e-6)"
DS_CHAT = "DeepSpeed-Chat step3 training scripts (actor lr 9.65e-6, critic lr 5e-6, prompt 256 + answer 256)"
HPCLLM = "hpcllm default (the pre-flight suggests a larger micro batch when one fits)"
DEMO = "a tiny random model learning the bundled demo data in a minute on CPU"


@dataclass(frozen=True)
class Recipe:
    """Values for ``method.<key>`` (dotted keys for sub-configs: ``ptuning.num_virtual_tokens``)."""

    name: str
    values: Dict[str, object]
    sources: Dict[str, str]
    max_seq_len: Optional[int] = None  # seq_len = min(this, model.max_positions) unless set
    seq_source: str = ""

    def __post_init__(self):
        missing = set(self.values) - set(self.sources)
        if missing:
            raise ValueError(f"recipe {self.name}: no source for {sorted(missing)}")


def _recipe(name: str, seq: Tuple[Optional[int], str], **entries: Tuple[object, str]) -> Recipe:
    return Recipe(name, {k.replace("__", "."): v for k, (v, _) in entries.items()},
                  {k.replace("__", "."): s for k, (_, s) in entries.items()}, seq[0], seq[1])


def method_kind(method: DictConfig) -> str:
    """What a method does, from its preset's stage, adapter and data (not its name: a user's own
    ``conf/method/my_sft.yaml`` gets the recipe of what it is)."""
    if method.stage != "lm":
        return str(method.stage)
    if method.adapter != "none":
        return str(method.adapter)
    return "pretrain" if method.data_kind == "pretrain" else "sft"


def _published(kind: str, params: float, adapter: str) -> Recipe:
    large = params >= 20e9  # the 33B/65B rows of LLaMA and QLoRA
    if kind == "pretrain":
        return _recipe("pretrain", (4096, f"the model's context, {LLAMA_PAPER}"),
                       lr=(1.5e-4 if large else 3e-4, LLAMA_PAPER), epochs=(1, LLAMA_PAPER),
                       warmup_ratio=(0.01, f"{LLAMA_PAPER}: 2000 of ~250k steps"),
                       weight_decay=(0.1, LLAMA_PAPER), micro_batch_size=(1, HPCLLM),
                       global_batch_tokens=(4 * 2**20, LLAMA_PAPER))
    if kind == "sft":
        return _recipe("sft", (2048, VICUNA), lr=(2e-5 if params < 10e9 else 1e-5, ALPACA), epochs=(3, ALPACA),
                       warmup_ratio=(0.03, ALPACA), weight_decay=(0.0, ALPACA), micro_batch_size=(1, HPCLLM),
                       global_batch_size=(128, ALPACA))
    if kind == "lora":
        return _recipe("lora", (2048, LF_LORA), lr=(1e-4 if large else 2e-4, QLORA), epochs=(3, ALPACA_LORA),
                       warmup_ratio=(0.03, QLORA), weight_decay=(0.0, QLORA), micro_batch_size=(1, HPCLLM),
                       global_batch_size=(64 if params >= 50e9 else 32 if large else 16, QLORA))
    if kind == "freeze":
        return _recipe("freeze", (2048, VICUNA), lr=(1e-4, FREEZE), epochs=(3, ALPACA),
                       warmup_ratio=(0.1, FREEZE), weight_decay=(0.1, FREEZE), micro_batch_size=(1, HPCLLM),
                       global_batch_size=(128, ALPACA))
    if kind == "ptuning":
        return _recipe("ptuning", (2048, VICUNA), lr=(2e-2, PTUNING), epochs=(3, ALPACA),
                       warmup_ratio=(0.0, PTUNING), weight_decay=(0.0, PTUNING), micro_batch_size=(1, PTUNING),
                       global_batch_size=(16, PTUNING), ptuning__num_virtual_tokens=(128, PTUNING))
    if kind == "reward":
        lr = (1e-4, LF_LORA) if adapter == "lora" else (9e-6, INSTRUCTGPT)
        return _recipe("reward", (1024, HANDBOOK), lr=lr, epochs=(1, INSTRUCTGPT), warmup_ratio=(0.1, HANDBOOK),
                       weight_decay=(0.0, INSTRUCTGPT), micro_batch_size=(1, HPCLLM),
                       global_batch_size=(64, INSTRUCTGPT))
    if kind == "dpo":
        lr = (5e-6, HANDBOOK) if adapter == "lora" else (1e-6, DPO_PAPER)
        return _recipe("dpo", (1024, HANDBOOK), lr=lr, epochs=(1, HANDBOOK), warmup_ratio=(0.1, HANDBOOK),
                       weight_decay=(0.0, DPO_PAPER), micro_batch_size=(1, HPCLLM), global_batch_size=(64, DPO_PAPER),
                       dpo__beta=(0.1, DPO_PAPER))
    if kind == "ppo":
        return _recipe("ppo", (256, DS_CHAT), lr=(9.65e-6, DS_CHAT), epochs=(1, DS_CHAT),
                       warmup_ratio=(0.0, DS_CHAT), weight_decay=(0.0, DS_CHAT), micro_batch_size=(1, HPCLLM),
                       ppo__critic_lr=(5e-6, DS_CHAT), ppo__max_new_tokens=(256, DS_CHAT))
    if kind == "eval":
        return _recipe("eval", (4096, "the model's context (5-shot prompts need it)"), lr=(0.0, "inference only"),
                       epochs=(1, "inference only"), micro_batch_size=(4, HPCLLM))
    raise ConfigError(f"no recipe for a method of kind {kind!r}: set method.lr, method.epochs, method.seq_len, "
                      "method.micro_batch_size and method.global_batch_size yourself")


def _demo(kind: str) -> Recipe:
    lr = {"pretrain": 3e-4, "sft": 1e-3, "lora": 3e-3, "freeze": 1e-3, "ptuning": 1e-2, "reward": 1e-3,
          "dpo": 5e-4, "ppo": 1e-4, "eval": 0.0}[kind]
    seq = {"ppo": 64, "eval": 512}.get(kind, 128)
    values = dict(lr=lr, epochs=2 if kind in ("sft", "lora", "freeze", "ptuning") else 1, warmup_steps=2,
                  weight_decay=0.1 if kind == "pretrain" else 0.0, micro_batch_size=4 if kind in ("ppo", "eval") else 2)
    if kind in ("ppo", "eval"):
        values["warmup_steps"] = 0
    if kind == "ppo":
        values.update({"ppo.critic_lr": 1e-3, "ppo.max_new_tokens": 16})
    if kind == "ptuning":
        values["ptuning.num_virtual_tokens"] = 16
    return Recipe("demo", values, {k: DEMO for k in values}, seq, DEMO)


KINDS = ("pretrain", "sft", "lora", "freeze", "ptuning", "reward", "dpo", "ppo", "eval")


def recipe_for(cfg: DictConfig) -> Recipe:
    kind = method_kind(cfg.method)
    if kind not in KINDS:
        return Recipe("none", {}, {})  # an unknown stage: derive() names it and the valid ones
    if cfg.model.recipe == "demo":
        return _demo(kind)
    if cfg.model.recipe != "published":
        raise ConfigError(f"model.recipe={cfg.model.recipe!r} is not one of published, demo")
    return _published(kind, float(cfg.model.num_params), str(cfg.method.adapter))


def _get(method: DictConfig, dotted: str):
    node = method
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    return node, leaf


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def apply_recipe(cfg: DictConfig, data_parallel_size: int) -> None:
    """Fill every ``method.*`` left null from the model's recipe, recording each value's source."""
    method = cfg.method
    if method.recipe_sources:
        return  # filled already (a run directory's config.yaml, or derive called twice)
    recipe = recipe_for(cfg)
    values, why = dict(recipe.values), dict(recipe.sources)
    if method.seq_len is None:
        values["seq_len"] = min(recipe.max_seq_len or cfg.model.max_positions, cfg.model.max_positions)
        why["seq_len"] = f"min(model.max_positions, {recipe.max_seq_len}): {recipe.seq_source}"
    tokens = values.pop("global_batch_tokens", None)
    if tokens is not None:
        values["global_batch_size"] = max(1, tokens // (method.seq_len or values["seq_len"]))
        why["global_batch_size"] = f"{tokens:,} tokens per step / seq_len: {why['global_batch_tokens']}"
    sources: Dict[str, str] = {}
    for key, value in values.items():
        node, leaf = _get(method, key)
        if node[leaf] is not None:
            continue  # the user's or the preset's value wins
        if key == "global_batch_size":  # a multiple of what one optimizer step consumes
            value = _round_to(int(value), (method.micro_batch_size or values["micro_batch_size"]) * data_parallel_size)
        node[leaf] = value
        sources[key] = f"{value} ({recipe.name} recipe: {why[key]})"
    if method.warmup_steps is None and method.warmup_ratio is None:
        method.warmup_ratio = 0.0
    with open_dict(method):
        method.recipe_sources = sources


def bundled_demo_data(cfg: DictConfig, root: str) -> Optional[str]:
    """The bundled demo file a non-demo model would train on, if it would (None otherwise)."""
    if cfg.model.recipe == "demo" or cfg.data.allow_demo_data or cfg.method.stage == "eval":
        return None
    for key in ("train", "eval", "pretrain"):
        path = cfg.data[key]
        if path and str(path).startswith(f"{root}/data/demo/"):
            return f"data.{key}={path}"
    return None


