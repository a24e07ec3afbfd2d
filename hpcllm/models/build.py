"""Build a causal LM from a local path / hub name, or from the preset's numbers with random weights."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from hpcllm.config import ConfigError
from hpcllm.data.tokenizer import REMOTE_CODE_FIX, untrusted_code

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def hf_config_kwargs(model: DictConfig) -> dict:
    """The preset's architecture numbers in the names each Hugging Face config class uses."""
    common = {"vocab_size": model.vocab_size, "tie_word_embeddings": model.tie_embeddings}
    if model.hf_model_type in ("llama", "qwen2", "mistral", "mixtral"):
        kwargs = dict(common, hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
                      num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
                      num_key_value_heads=model.num_kv_heads, max_position_embeddings=model.max_positions)
        if model.num_experts:
            kwargs.update(num_local_experts=model.num_experts, num_experts_per_tok=model.experts_top_k)
        return kwargs
    if model.hf_model_type == "bloom":
        if model.intermediate_size != 4 * model.hidden_size:
            raise ConfigError(f"model={model.name}: BLOOM's MLP is 4 x hidden_size; set model.intermediate_size="
                              f"{4 * model.hidden_size}")
        return dict(common, hidden_size=model.hidden_size, n_layer=model.num_layers, n_head=model.num_heads)
    if model.hf_model_type == "gpt2":
        return dict(common, n_embd=model.hidden_size, n_layer=model.num_layers, n_head=model.num_heads,
                    n_positions=model.max_positions, n_inner=model.intermediate_size)
    raise ConfigError(
        f"model={model.name} ({model.hf_model_type}) is not built into transformers: "
        "set model.path to a local directory with its weights and code")


def build_model(model: DictConfig, *, precision: str = "fp32", attention: str = "sdpa",
                seed: int = 1234, tokenizer=None) -> PreTrainedModel:
    """Load ``model.path`` or build the preset from its numbers (random weights seeded by ``seed``).

    Python code shipped with the weights (``auto_map``) runs only with ``model.trust_remote_code``."""
    try:
        return _build(model, DTYPES[precision], attention, seed, tokenizer)
    except ValueError as err:
        if untrusted_code(err):
            raise untrusted_code_error(f"model.path={model.path}") from None
        if attention != "sdpa" or "scaled_dot_product_attention" not in str(err):
            raise
        # Some architectures (BLOOM's ALiBi) have no SDPA path in transformers yet.
        return _build(model, DTYPES[precision], "eager", seed, tokenizer)


def untrusted_code_error(what: str) -> ConfigError:
    return ConfigError(f"{what} ships Python code of its own (auto_map), which runs only when trusted: "
                       f"{REMOTE_CODE_FIX}")


def _build(model: DictConfig, dtype, attention: str, seed: int, tokenizer) -> PreTrainedModel:
    if model.path:
        return auto_class(model.path).from_pretrained(
            model.path, dtype=dtype, trust_remote_code=bool(model.trust_remote_code), attn_implementation=attention)
    kwargs = hf_config_kwargs(model)
    kwargs.update(model.hf_config_overrides or {})
    if tokenizer is not None:
        kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(model.hf_model_type, **kwargs)
    torch.manual_seed(seed)  # every rank builds identical weights
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)


def auto_class(path: str):
    """The Auto class a model directory's own code registers: ChatGLM-6B's remote code registers
    ``AutoModel`` (its class generates text) but not ``AutoModelForCausalLM``."""
    config_file = Path(path) / "config.json"
    auto_map = json.loads(config_file.read_text()).get("auto_map", {}) if config_file.is_file() else {}
    if auto_map and "AutoModelForCausalLM" not in auto_map and "AutoModel" in auto_map:
        return AutoModel
    return AutoModelForCausalLM


def resize_embeddings(model: PreTrainedModel, vocab_size: int) -> int:
    """Grow the input embeddings (and an untied head) to ``vocab_size`` rows, new rows set to the mean of
    the old ones, as the Chinese-LLaMA line does after merging a vocabulary; returns the rows added."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return 0
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                       if m is not None}.values():
            module.weight[old:] = module.weight[:old].mean(dim=0, keepdim=True)
    return vocab_size - old


def base_model_dir(run_dir) -> Path:
    return Path(run_dir) / "base_model"


def save_base_model(model: PreTrainedModel, ctx) -> None:
    """Save the (random-weight) base of an adapter run into run_dir/base_model, once.

    Collective under ZeRO-3 (every rank gathers the partitions), rank 0 writes atomically."""
    import deepspeed

    from hpcllm.distributed import all_reduce, barrier

    out = base_model_dir(ctx.run_dir)
    # Every rank takes the same branch: a rank that looked only after rank 0 had written the directory
    # would skip the barrier below that rank 0 waits in (seen as a 10-minute gloo timeout under load).
    if all_reduce([1.0 if out.is_dir() else 0.0], op="max")[0]:
        return
    params = list(model.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params) if zero3 else nullcontext():
        if ctx.dist.is_main:
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            if ctx.tokenizer is not None:
                ctx.tokenizer.save_pretrained(tmp)
            tmp.rename(out)
    barrier()


def zero3_init_context(ds_config: dict):
    """Keep the returned object alive while building: transformers then creates the model under
    deepspeed.zero.Init (and gathers ZeRO-3 weights where it needs them, e.g. in generate)."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


@contextmanager
def building_under(ds_config: dict | None):
    """Models created inside are built under ``deepspeed.zero.Init`` for ``ds_config`` (a ZeRO-3 config),
    or plainly for None, whatever the job's own setting; the job's setting is restored on exit.

    transformers reads one process-wide DeepSpeed config (a weak reference set by HfDeepSpeedConfig):
    PPO's models may each have their own profile, so it is swapped while one of them is built."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    previous = hf_deepspeed._hf_deepspeed_config_weak_ref
    current = HfDeepSpeedConfig(ds_config) if ds_config is not None else None  # noqa: F841 (kept alive)
    if current is None:
        hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous
