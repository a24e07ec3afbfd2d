"""Per-stage figures of a pipeline-parallel job (train.pipeline_parallel > 1), from the architecture numbers.

Each stage holds only its layers' parameters, gradients and optimizer states (ZeRO-1 partitions the
optimizer states over the stage's data-parallel replicas); under DeepSpeed's 1F1B schedule stage ``s``
of ``p`` keeps the activations of up to ``min(p - s, m)`` micro batches in flight (the first stage the
most); the last stage also holds the logits; every stage keeps send/receive buffers of one micro batch's
hidden states. The tightest stage decides whether the job fits. The layer split is the one DeepSpeed's
PipelineModule makes (same partition functions over the same per-layer parameter counts).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from omegaconf import DictConfig

from hpcllm.config import Derived
from hpcllm.plan import formulas as F


@dataclass
class StageFigures:
    stage: int
    layers: tuple[int, int]  # [start, stop) indices of the pipeline's layers
    params: int
    states_bytes: int  # parameters + gradients + optimizer states
    activation_bytes: int  # micro batches in flight x their activations, plus logits on the last stage
    p2p_bytes: int
    in_flight: int

    @property
    def total_bytes(self) -> int:
        return self.states_bytes + self.activation_bytes + self.p2p_bytes


def layer_kinds(arch: F.Arch) -> list[str]:
    """The class names of the pipeline's layers (hpcllm/models/pipeline.py's layer_specs)."""
    tail = ["NormPipe", "EmbeddingPipe"] if arch.tied else ["HeadPipe"]
    return ["EmbeddingPipe", *["DecoderPipe"] * arch.layers, *tail]


def layer_param_counts(arch: F.Arch) -> list[int]:
    """Parameters of each pipeline layer (the last stage's tied embedding is a full copy)."""
    embedding = arch.vocab * arch.hidden
    tail = [arch.hidden, embedding] if arch.tied else [F.head_params(arch)]
    return [embedding, *[F.layer_params(arch)] * arch.layers, *tail]


def stage_bounds(train: DictConfig, arch: F.Arch) -> list[int]:
    """[0, b1, ..., n]: the layer split train.pipeline_parts / train.pipeline_partition gives."""
    return [int(b) for b in _bounds(train, arch)]


def _bounds(train: DictConfig, arch: F.Arch) -> list:
    from deepspeed.runtime import utils as ds_utils

    stages, counts = train.pipeline_parallel, layer_param_counts(arch)
    if train.pipeline_parts is not None:
        from hpcllm.models.pipeline import parts_boundaries

        return parts_boundaries(list(train.pipeline_parts), len(counts), stages, "train.pipeline_parts")
    method = train.pipeline_partition.lower()
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(counts), num_parts=stages)
    if method.startswith("type:"):
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if pattern.search(kind) else 0 for kind in layer_kinds(arch)]
        return ds_utils.partition_balanced(weights=weights, num_parts=stages)
    # DeepSpeed's "parameters" method counts trainable parameters per layer.
    return ds_utils.partition_balanced(weights=counts, num_parts=stages)


def stage_figures(cfg: DictConfig, derived: Derived) -> list[StageFigures]:
    """Per-stage memory of the job's pipeline, first stage first."""
    arch, method, train, zero = F.arch_of(cfg.model), cfg.method, cfg.train, cfg.zero
    mixed = derived.precision in ("fp16", "bf16")
    a = 2 if mixed else 4
    stages, micro = train.pipeline_parallel, derived.grad_accum_steps
    tokens = method.micro_batch_size * method.seq_len
    per_layer = F.layer_activation_bytes_per_token(arch, method.seq_len, a, attention=train.attention)
    bounds, counts, kinds = stage_bounds(train, arch), layer_param_counts(arch), layer_kinds(arch)
    figures = []
    for s in range(stages):
        start, stop = bounds[s], bounds[s + 1]
        params = sum(counts[start:stop])
        states = F.model_states(params, params, stage=zero.stage, dp=derived.data_parallel_size,
                                gpus_per_node=cfg.hw.gpus_per_node, nodes=cfg.hw.nodes, mixed=mixed,
                                offload_optimizer=zero.offload_optimizer)
        in_flight = min(stages - s, micro)
        decoders = sum(1 for kind in kinds[start:stop] if kind == "DecoderPipe")
        activations = in_flight * F.activation_bytes(per_layer, tokens, decoders, a=a, hidden=arch.hidden,
                                                     checkpointing=train.gradient_checkpointing)
        if s == stages - 1:
            activations += F.logits_bytes(tokens, arch.vocab, arch.hidden, a)
        p2p = 2 * tokens * arch.hidden * a  # one received and one sent micro batch of hidden states
        figures.append(StageFigures(s, (start, stop), params, states.gpu, activations, p2p, in_flight))
    return figures


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle share of a 1F1B step: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)
