"""The pipeline (DeepSpeed ``PipelineModule``) version of a llama-shaped causal LM (llama, qwen2, mistral).

The model is a flat list of layers, each a ``LayerSpec`` built only on the stage that owns it:

    0        EmbeddingPipe             model.embed_tokens
    1..L     DecoderPipe(i)            model.layers.{i-1}      (rotary embedding computed in each layer)
    L+1      HeadPipe                  model.norm + lm_head    (untied embeddings)
    L+1,L+2  NormPipe, tied embedding  model.norm, then logits = h @ embed.T (TiedLayerSpec, tied embeddings)

Activations between stages are the tuple ``(hidden_states, attention_mask)``; the last stage's logits go
to ``causal_lm_loss`` with the labels, the same shifted mean cross-entropy as the Hugging Face model.
``hf_prefixes`` names each layer's weights in the Hugging Face state dict, so a pipeline layer file and
an HF checkpoint convert into each other (tools/convert_checkpoint.py, the pipeline's ``final/`` export).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Hugging Face model types whose decoder shape (RMSNorm, rotary attention, SwiGLU MLP) this module pipes.
PIPE_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Why the other families cannot be piped yet (refused at composition with this reason).
NOT_PIPED = {
    "mixtral": "its MoE router's auxiliary loss is not carried between pipeline stages yet",
    "bloom": "its ALiBi attention bias is not built per pipeline layer yet",
    "gpt2": "its learned position embeddings are not split into a pipeline layer yet",
}
PARTITION_METHODS = ("parameters", "uniform")


def pipeline_refusal(model) -> str | None:
    """Why ``model`` (a ModelConfig) cannot train with train.pipeline_parallel > 1, or None."""
    if model.hf_model_type in PIPE_MODEL_TYPES:
        return None
    why = NOT_PIPED.get(model.hf_model_type, "its layers come from remote code the pipeline cannot rebuild")
    return (f"model={model.name} ({model.hf_model_type}) cannot train with train.pipeline_parallel > 1: {why}; "
            f"pipelined families are {', '.join(PIPE_MODEL_TYPES)}. Set train.pipeline_parallel=1 and use "
            "zero=stage3 (or stage3_offload) to split the model")


def _family_classes(model_type: str) -> dict:
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[model_type]
    return {kind: getattr(module, prefix + kind) for kind in ("DecoderLayer", "RMSNorm", "RotaryEmbedding")}


class EmbeddingPipe(nn.Module):
    """Token embedding; ``(input_ids, attention_mask)`` -> ``(hidden_states, attention_mask)``."""

    def __init__(self, config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        nn.init.normal_(self.weight, std=config.initializer_range)

    def forward(self, inputs):
        input_ids, attention_mask = inputs
        return F.embedding(input_ids, self.weight), attention_mask


def tied_head(embedding: EmbeddingPipe, inputs):
    """The output projection of tied embeddings: the last stage's copy of the embedding matrix."""
    return F.linear(inputs, embedding.weight)


class DecoderPipe(nn.Module):
    """One Hugging Face decoder layer; its rotary embedding and causal (padding, sliding-window) mask are
    computed here from the sequence length, since only hidden states travel between stages."""

    def __init__(self, config, index: int) -> None:
        super().__init__()
        classes = _family_classes(config.model_type)
        self.config, self.index = config, index
        self.layer = classes["DecoderLayer"](config, index)
        self.rotary = classes["RotaryEmbedding"](config)

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        layer_types = getattr(self.config, "layer_types", None)
        sliding = (layer_types[self.index] == "sliding_attention" if layer_types
                   else getattr(self.config, "sliding_window", None) is not None)
        make = create_sliding_window_causal_mask if sliding else create_causal_mask
        return make(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                    position_ids=position_ids)

    def forward(self, inputs):
        hidden, attention_mask = inputs
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        hidden = self.layer(hidden, attention_mask=self._mask(hidden, attention_mask, position_ids),
                            position_ids=position_ids, position_embeddings=self.rotary(hidden, position_ids))
        return hidden, attention_mask


class NormPipe(nn.Module):
    """The final RMSNorm (tied embeddings: the tied embedding layer after it makes the logits)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.norm = _family_classes(config.model_type)["RMSNorm"](config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, inputs):
        return self.norm(inputs[0])


class HeadPipe(NormPipe):
    """Final RMSNorm and the untied output projection: hidden states -> logits."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, inputs):
        return self.lm_head(self.norm(inputs[0]))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100, as Hugging Face's causal LM loss."""
    shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def layer_specs(config) -> list:
    """The pipeline's layers (see the module docstring) as DeepSpeed LayerSpecs."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    decoders = [LayerSpec(DecoderPipe, config, i) for i in range(config.num_hidden_layers)]
    if config.tie_word_embeddings:
        return [TiedLayerSpec("embed", EmbeddingPipe, config), *decoders, LayerSpec(NormPipe, config),
                TiedLayerSpec("embed", EmbeddingPipe, config, forward_fn=tied_head)]
    return [LayerSpec(EmbeddingPipe, config), *decoders, LayerSpec(HeadPipe, config)]


def hf_prefixes(config) -> list[dict[str, str]]:
    """Per pipeline layer: its state-dict key -> the Hugging Face state-dict key of the same tensor."""
    def decoder(i: int) -> dict:
        return {"layer.": f"model.layers.{i}."}

    embed = {"weight": "model.embed_tokens.weight"}
    decoders = [decoder(i) for i in range(config.num_hidden_layers)]
    if config.tie_word_embeddings:
        return [embed, *decoders, {"norm.weight": "model.norm.weight"}, embed]
    return [embed, *decoders, {"norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}]


def to_hf_key(mapping: dict[str, str], key: str) -> str | None:
    """The HF name of a pipeline layer's state-dict ``key`` (None: not a stored weight, e.g. rotary buffers)."""
    for local, hf in mapping.items():
        if key == local:
            return hf
        if local.endswith(".") and key.startswith(local):
            return hf + key[len(local):]
    return None


def layer_state_from_hf(layer: nn.Module, mapping: dict[str, str], hf_state: dict) -> dict:
    """The state dict of pipeline layer ``layer`` with its weights taken from an HF state dict."""
    state = {}
    for key, value in layer.state_dict().items():
        hf_key = to_hf_key(mapping, key)
        state[key] = hf_state[hf_key] if hf_key is not None and hf_key in hf_state else value
    return state


def parts_boundaries(parts: list[int], num_layers: int, num_stages: int, key: str) -> list[int]:
    """Explicit layers per stage -> DeepSpeed's stage boundaries [0, p0, p0+p1, ..., num_layers]."""
    if len(parts) != num_stages or sum(parts) != num_layers or min(parts) < 1:
        raise ValueError(f"{key}={list(parts)} must give {num_stages} positive layer counts (one per stage) "
                         f"summing to the pipeline's {num_layers} layers (embedding, decoder layers, "
                         "final norm/head)")
    bounds = [0]
    for count in parts:
        bounds.append(bounds[-1] + count)
    return bounds


def build_pipeline_module(config, hf_state: dict | None, *, num_stages: int, partition: str,
                          parts: list[int] | None = None, checkpoint_layers: bool = False, seed: int = 1234,
                          dynamic_shape: bool = True):
    """The PipelineModule of HF ``config``: this rank's layers only, loaded from ``hf_state`` (an HF state
    dict, e.g. the built model's) when given. ``partition``: parameters | uniform | type:REGEX; ``parts``
    (layers per stage) overrides it. ``checkpoint_layers``: recompute each decoder layer in backward.
    ``dynamic_shape``: micro batches may differ in length (dynamic padding), so stages exchange shapes."""
    from deepspeed.pipe import PipelineModule

    class LlamaPipeline(PipelineModule):
        def _partition_layers(self, method="uniform"):
            if parts is None:
                return super()._partition_layers(method)
            self.parts = parts_boundaries(parts, len(self._layer_specs), self.num_stages, "train.pipeline_parts")
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    specs = layer_specs(config)
    module = LlamaPipeline(specs, num_stages=num_stages, loss_fn=causal_lm_loss, partition_method=partition,
                           base_seed=seed, activation_checkpoint_interval=1 if checkpoint_layers else 0,
                           checkpointable_layers=["DecoderPipe"], dynamic_shape=dynamic_shape)
    module.hf_config = config
    if hf_state is not None:
        mappings = hf_prefixes(config)
        for local, layer in enumerate(module.forward_funcs):
            if isinstance(layer, nn.Module):
                layer.load_state_dict(layer_state_from_hf(layer, mappings[module._local_start + local], hf_state))
        for tied in module.tied_modules.values():  # the last stage's copy of tied embeddings
            tied.load_state_dict(layer_state_from_hf(tied, mappings[0], hf_state))
    return module


# -- checkpoint conversion: Hugging Face state dict <-> pipeline layer files -------------------------------
MANIFEST = "pipeline_manifest.json"
FORMAT = "hpcllm-pipeline-layers-v1"


def layer_file(index: int) -> str:
    """The file DeepSpeed's PipelineModule saves layer ``index`` to (no tensor-parallel axis)."""
    return f"layer_{index:02d}-model_states.pt"


def stored_layers(config) -> list[int]:
    """Indices of the layers that have a file: the last stage's tied embedding is a copy of layer 0's."""
    count = len(hf_prefixes(config))
    return list(range(count - 1)) if config.tie_word_embeddings else list(range(count))


def hf_to_layer_states(hf_state: dict, config) -> dict[int, dict]:
    """An HF state dict split into pipeline layer state dicts (index -> state dict); every HF tensor lands
    in exactly one layer, or this raises naming the ones that did not."""
    layers, used = {}, set()
    mappings = hf_prefixes(config)
    for index in stored_layers(config):
        state = {}
        for local, hf in mappings[index].items():
            if local.endswith("."):
                for key in (k for k in hf_state if k.startswith(hf)):
                    state[local + key[len(hf):]] = hf_state[key]
                    used.add(key)
            elif hf in hf_state:
                state[local] = hf_state[hf]
                used.add(hf)
        layers[index] = state
    tied_head = {"lm_head.weight"} if config.tie_word_embeddings else set()
    left = sorted(set(hf_state) - used - tied_head)
    if left:
        raise ValueError(f"{len(left)} weights have no pipeline layer (e.g. {left[:3]}): the checkpoint is not "
                         f"a {config.model_type} model of this config")
    return layers


def layer_states_to_hf(layers: dict[int, dict], config) -> dict:
    """Pipeline layer state dicts (index -> state dict) back into one HF state dict."""
    mappings, hf_state = hf_prefixes(config), {}
    for index, state in layers.items():
        for key, value in state.items():
            hf_key = to_hf_key(mappings[index], key)
            if hf_key is not None:
                hf_state[hf_key] = value
    return hf_state


def pp_to_hf_state(directory: Path, config) -> dict:
    """The HF state dict of a directory of pipeline layer files (a training checkpoint or hf_to_pp's output)."""
    directory = Path(directory)
    missing = [layer_file(i) for i in stored_layers(config) if not (directory / layer_file(i)).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks pipeline layer files {missing[:3]} "
                                f"({len(missing)} of {len(stored_layers(config))}): not a complete pipeline "
                                f"checkpoint of this {config.model_type} config")
    layers = {i: torch.load(directory / layer_file(i), map_location="cpu", weights_only=True)
              for i in stored_layers(config)}
    return layer_states_to_hf(layers, config)


def save_layer_files(layers: dict[int, dict], config, out_dir: Path) -> None:
    """Layer files plus the HF config and a manifest naming each file's HF tensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mappings = hf_prefixes(config)
    manifest = {"format": FORMAT, "model_type": config.model_type, "tied_embeddings": bool(config.tie_word_embeddings),
                "num_pipeline_layers": len(mappings), "layers": []}
    for index, state in sorted(layers.items()):
        torch.save({k: v.contiguous() for k, v in state.items()}, out_dir / layer_file(index))
        manifest["layers"].append({"index": index, "file": layer_file(index),
                                   "hf_keys": sorted(filter(None, (to_hf_key(mappings[index], k) for k in state)))})
    config.save_pretrained(out_dir)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def save_hf_weights(hf_state: dict, config, out_dir: Path) -> None:
    """An HF model directory (config.json + model.safetensors) from a state dict; tied heads are not stored."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in hf_state.items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
