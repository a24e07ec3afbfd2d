"""Every formula the pre-flight estimate uses, one function per term.

All sizes are in bytes and counts in elements; ``a`` is the activation element size (2 for
fp16/bf16, 4 for fp32) and ``p`` the parameter element size in the training dtype.

Sources:
- ZeRO: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models", section 3.1 (mixed-precision Adam keeps 2 + 2 + 12 bytes per parameter), and DeepSpeed's
  own ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``
  (deepspeed.runtime.zero.stage_1_and_2 / stage3), which the model-state terms reproduce exactly.
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", section 4.1 (``s*b*h*(34 + 5*a*s/h)`` per layer), generalised term by term to GQA, gated
  (SwiGLU) MLPs, RMSNorm, memory-efficient attention and MoE, as Hugging Face implements them.
- FLOPs: Kaplan et al. 2020 / Chowdhery et al. 2022 (PaLM, appendix B): ``6*N + 12*L*h*s`` per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

GIB = 1024 ** 3

# Framework constants, each documented where it is used.
CUDA_CONTEXT_BYTES = int(1.0 * GIB)
CPU_RANK_RUNTIME_BYTES = int(0.5 * GIB)
GPU_RANK_HOST_RUNTIME_BYTES = int(2.5 * GIB)
FRAGMENTATION = 0.10
DEEPSPEED_BUFFER_FACTOR = 1.5
# Bytes per parameter of a whole model as a script loads it (model.load_dtype; None = the training dtype).
LOAD_BYTES = {"auto": None, "fp32": 4, "fp16": 2, "bf16": 2}

# DeepSpeed's CPU Adam (AVX512, fp32): parameters updated per second per CPU core. An assumption of the
# order ZeRO-Offload (Ren et al. 2021) reports for its CPU-Adam (a 1B-parameter update in a fraction of a
# second on one server), to be replaced by bench/bench_estimate.py --gpu measurements.
CPU_ADAM_PARAMS_PER_CORE_S = 2e8


@dataclass(frozen=True)
class Arch:
    """The architecture numbers the formulas need, with family facts resolved."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    tied: bool
    gated: bool  # SwiGLU: gate, up and down projections
    layernorm: bool  # LayerNorm with bias (GPT-2/BLOOM/GLM); False = RMSNorm (LLaMA family)
    linear_bias: bool  # every linear has a bias (GPT-2/BLOOM/GLM style)
    qkv_bias: bool  # only q, k, v have biases (Qwen2, ChatGLM2/3)
    learned_positions: int  # learned position tables of max_positions x hidden (0 for RoPE/ALiBi)
    embedding_norm: bool  # BLOOM's LayerNorm right after the word embeddings
    fused_gate_up: bool  # ChatGLM2/3 fuse gate and up into one (h, 2I) matrix
    experts: int = 0
    top_k: int = 0
    # Hugging Face GPT-2: dropout 0.1 everywhere by default, and its tanh-GeLU written as Python ops
    # keeps four I-wide tensors (input, tanh output, 0.5*x and 1+tanh) instead of one.
    dropout: bool = False
    gelu_tensors: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def arch_of(model) -> Arch:
    """Resolve a ``ModelConfig`` into :class:`Arch` (family facts come from family/activation/position)."""
    gelu = model.activation == "gelu"
    family = model.family
    positions = 0
    if model.position == "learned":
        # GLM adds a second (block) position table; Pangu a top-query position table.
        positions = 2 if family in ("glm", "pangu") and model.hf_model_type != "gpt2" else 1
    return Arch(
        layers=model.num_layers, hidden=model.hidden_size, heads=model.num_heads, kv_heads=model.num_kv_heads,
        intermediate=model.intermediate_size, vocab=model.vocab_size, max_positions=model.max_positions,
        tied=bool(model.tie_embeddings), gated=not gelu, layernorm=gelu, linear_bias=gelu,
        qkv_bias=family in ("qwen", "qwen2", "chatglm2", "chatglm3"), learned_positions=positions,
        embedding_norm=family == "bloom", fused_gate_up=family in ("chatglm2", "chatglm3"),
        experts=model.num_experts or 0, top_k=model.experts_top_k or 0,
        dropout=model.hf_model_type == "gpt2", gelu_tensors=4 if model.hf_model_type == "gpt2" else 1,
    )


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

def linear_shapes(arch: Arch) -> Dict[str, list]:
    """Per-layer linear modules as ``name -> [(in, out, copies), ...]``, under the names LoRA targets use.

    One name can stand for several matrices (GPT-2's ``c_proj`` is both the attention output and the MLP
    down projection; Mixtral's ``w1`` exists once per expert).
    """
    h, kv, i, e = arch.hidden, arch.kv_dim, arch.intermediate, max(arch.experts, 1)
    qkv = h + 2 * kv
    up = 2 * i if arch.fused_gate_up else i
    mlp_copies = e if arch.experts else 1
    return {
        "q_proj": [(h, h, 1)], "k_proj": [(h, kv, 1)], "v_proj": [(h, kv, 1)], "o_proj": [(h, h, 1)],
        "gate_proj": [(h, i, 1)], "up_proj": [(h, i, 1)], "down_proj": [(i, h, 1)],
        "w1": [(h, i, mlp_copies)], "w3": [(h, i, mlp_copies)], "w2": [(i, h, mlp_copies)],
        "query_key_value": [(h, qkv, 1)], "W_pack": [(h, qkv, 1)], "c_attn": [(h, qkv, 1)],
        "dense": [(h, h, 1)], "dense_h_to_4h": [(h, up, 1)], "dense_4h_to_h": [(i, h, 1)],
        "c_proj": [(h, h, 1), (i, h, 1)], "c_fc": [(h, i, 1)],
    }


def layer_params(arch: Arch) -> int:
    """Parameters of one transformer layer.

    attention ``h*(h + 2*kv) + h*h`` (+ biases), MLP ``3*h*I`` gated or ``2*h*I`` plain (x experts, plus
    the ``h*E`` router for MoE), two norms of ``h`` (RMSNorm) or ``2h`` (LayerNorm).
    """
    h, kv, i = arch.hidden, arch.kv_dim, arch.intermediate
    attn = h * (h + 2 * kv) + h * h
    if arch.linear_bias:
        attn += (h + 2 * kv) + h
    elif arch.qkv_bias:
        attn += h + 2 * kv
    mlp = (3 if arch.gated else 2) * h * i
    if arch.linear_bias:
        mlp += i + h
    if arch.experts:
        mlp = arch.experts * mlp + h * arch.experts
    norms = 2 * (2 * h if arch.layernorm else h)
    return attn + mlp + norms


def embedding_params(arch: Arch) -> int:
    """Word embeddings ``V*h``, learned position tables, BLOOM's embedding LayerNorm."""
    n = arch.vocab * arch.hidden + arch.learned_positions * arch.max_positions * arch.hidden
    return n + (2 * arch.hidden if arch.embedding_norm else 0)


def head_params(arch: Arch) -> int:
    """Final norm plus the output projection ``V*h`` unless tied to the word embeddings."""
    final_norm = 2 * arch.hidden if arch.layernorm else arch.hidden
    return final_norm + (0 if arch.tied else arch.vocab * arch.hidden)


def count_params(arch: Arch) -> int:
    """Total parameters from the architecture numbers (shared tensors counted once)."""
    return embedding_params(arch) + arch.layers * layer_params(arch) + head_params(arch)


def matmul_params(arch: Arch) -> int:
    """Parameters that take part in a matmul per token, for FLOPs: the layers with only ``top_k`` of
    the experts active, plus the output projection (always computed, tied or not)."""
    per_layer = layer_params(arch)
    if arch.experts:
        one_expert = (3 if arch.gated else 2) * arch.hidden * arch.intermediate
        per_layer -= (arch.experts - arch.top_k) * one_expert
    return arch.layers * per_layer + arch.vocab * arch.hidden


def largest_module_params(arch: Arch) -> int:
    """DeepSpeed's ``largest_layer_params``: the most parameters any single module owns directly
    (the word embedding / output projection, or the widest linear)."""
    widest = max(i * o for shapes in linear_shapes(arch).values() for i, o, _ in shapes)
    return max(arch.vocab * arch.hidden, widest)


def lora_params(arch: Arch, targets: Iterable[str], r: int) -> int:
    """LoRA adds ``r*(in + out)`` per adapted matrix (A is r x in, B is out x r), in every layer.
    Unknown module names are counted as one ``h x h`` matrix."""
    shapes = linear_shapes(arch)
    per_layer = 0
    for name in targets:
        for fan_in, fan_out, copies in shapes.get(name, [(arch.hidden, arch.hidden, 1)]):
            per_layer += copies * r * (fan_in + fan_out)
    return arch.layers * per_layer


def prefix_params(arch: Arch, virtual_tokens: int, projection: bool, projection_hidden: int) -> int:
    """P-tuning v2 (peft prefix tuning): a key and a value prefix per layer.

    Without projection an embedding ``T x (L*2*kv_dim)``; with it ``T*d + d*m + m + m*(L*2*kv_dim) +
    L*2*kv_dim`` (embedding, Linear(d, m), Tanh, Linear(m, L*2*kv_dim)), where peft takes d = kv_dim and,
    for GQA models, m = kv_dim.
    """
    out = arch.layers * 2 * arch.kv_dim
    if not projection:
        return virtual_tokens * out
    d = arch.kv_dim
    m = d if arch.kv_heads != arch.heads else projection_hidden
    return virtual_tokens * d + d * m + m + m * out + out


# ---------------------------------------------------------------------------------------------
# Model states (ZeRO)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes of one model's states, and the bytes it puts in CPU memory per node."""

    parameters: int
    gradients: int
    optimizer: int
    cpu: int

    @property
    def gpu(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def model_states(total: int, trainable: int, *, stage: int, dp: int, gpus_per_node: int, nodes: int,
                 mixed: bool, offload_optimizer: bool = False, offload_param: bool = False,
                 largest_module: int = 0, load_bytes: int = 4, zero_init: bool = True,
                 buffer_factor: float = DEEPSPEED_BUFFER_FACTOR) -> ModelStates:
    """Bytes of parameters, gradients and Adam states under ZeRO ``stage`` over ``dp`` ranks.

    Per trainable parameter, mixed precision (ZeRO paper section 3.1, DeepSpeed's estimators):
    16-bit gradients 2 (partitioned from stage 2, bucketed away at stage 3, on the CPU with
    optimizer offload), an fp32 gradient partition 4 (partitioned from stage 1) and Adam's fp32 master
    weights, momentum and variance 12 (partitioned from stage 1). Every parameter, trainable or not, is
    held once in the 16-bit training dtype (partitioned at stage 3; on the CPU with parameter offload).
    Stage 3 also gathers one whole module at a time: ``4 * largest_module`` bytes (DeepSpeed's
    ``largest_layer_memory``). So stage 2 is ``2*P + 18*T/dp`` and stage 3 ``4*largest + 18*P/dp``, as
    DeepSpeed's ``estimate_zero{2,3}_model_states_mem_needs`` give for T = P.

    fp32 training (the CPU ranks): 4-byte parameters and gradients; Adam's momentum and variance
    (8 bytes); DeepSpeed's ZeRO optimizer additionally keeps its own fp32 partition (4 bytes) and an
    fp32 gradient partition from stage 1 on, exactly as in the mixed-precision case.

    CPU per node is ``max(model load, offloaded states) * buffer_factor``: every local rank first
    materialises the model (``load_bytes`` per parameter; DeepSpeed assumes 4) unless ZeRO-3 builds it
    partitioned under ``zero.Init`` (``zero_init``; then one module per rank), while the offloaded
    partitions of this node's ranks (``16 * T`` or ``18 * T`` with parameter offload, split over
    ``nodes``) live in pinned memory.
    ``buffer_factor`` is DeepSpeed's ``additional_buffer_factor`` (pinned staging buffers).
    """
    p = 2 if mixed else 4
    part = dp if stage >= 1 else 1
    if stage == 3:
        params = (0 if offload_param else p * total // dp) + 4 * largest_module
    else:
        params = p * total
    if offload_optimizer:
        grads = 0 if stage >= 2 else p * trainable
        optim = 0
    else:
        grads_lowp = {0: p * trainable, 1: p * trainable, 2: p * trainable // dp, 3: 0}[stage]
        grads_fp32 = 4 * trainable // part if (mixed or stage >= 1) else 0
        grads = grads_lowp + grads_fp32
        optim = (12 if (mixed or stage >= 1) else 8) * trainable // part
    offloaded = 0
    if offload_optimizer:
        offloaded = 16 * trainable + (p * total if offload_param else 0)
        offloaded = offloaded / nodes
    if stage == 3 and zero_init:
        load = 4 * largest_module * gpus_per_node if not offload_optimizer else 0
    else:
        load = load_bytes * total * gpus_per_node
    cpu = int(max(load, offloaded) * buffer_factor)
    return ModelStates(parameters=int(params), gradients=int(grads), optimizer=int(optim), cpu=cpu)


def frozen_model_bytes(total: int, *, p: int, stage: int, dp: int, offload_param: bool) -> int:
    """A model that only runs forward (DPO/PPO reference, PPO reward): its weights in the training
    dtype, partitioned over ``dp`` under ZeRO-3 (DeepSpeed shards inference engines the same way)."""
    if stage == 3:
        return 0 if offload_param else p * total // dp
    return p * total


def fragmentation_bytes(allocated: int) -> int:
    """What PyTorch's caching allocator reserves beyond what is allocated (block rounding, cached
    blocks of freed activations that later requests cannot reuse), which ``nvidia-smi`` and OOM
    errors count: ``FRAGMENTATION`` (10 %) of everything allocated besides the CUDA context. The factor
    is fitted to the published table in tests/unit/data/published_measurements.json, where without
    it the estimate runs 5-20 % under the published figures."""
    return int(FRAGMENTATION * allocated)


def zero3_load_peak_bytes(total: int, *, p: int) -> int:
    """Without ``deepspeed.zero.Init`` every rank builds the whole model and DeepSpeed's engine moves it
    to the device in the training dtype before ZeRO-3 partitions it (``engine._configure_distributed_model``:
    ``module.to(device)`` unless the parameters already carry ``ds_id``). The caching allocator keeps
    that memory reserved, so a ZeRO-3 rank peaks at no less than ``p * total`` bytes."""
    return p * total


def zero3_gathered_bytes(total: int, *, p: int, max_live: int, largest_module: int) -> int:
    """What ZeRO-3 keeps gathered beyond the two largest modules DeepSpeed's estimator counts: parameters
    fetched ahead (``stage3_prefetch_bucket_size``) and those kept for reuse within
    ``stage3_max_reuse_distance`` stay gathered until ``stage3_max_live_parameters`` (default 1e9: 2 GB in
    fp16) are, which also bounds the prefetch; at most the whole model (so a model under 1e9 parameters
    gains no parameter memory from ZeRO-3 with the defaults)."""
    return max(0, p * min(max_live, total) - 4 * largest_module)


def bucket_bytes(trainable: int, *, p: int, reduce_bucket: int, overlap_comm: bool, stage: int = 0,
                 contiguous_gradients: bool = True, lazy: bool = False) -> int:
    """Communication buffers from the zero profile: the gradient reduce bucket of ``reduce_bucket_size``
    elements in the training dtype. DeepSpeed's ZeRO optimizer allocates it whole with
    ``contiguous_gradients``, whatever the number of trainable parameters: stages 1-2 twice with
    ``overlap_comm`` (double buffering, ``setup_buckets``), stage 3 once (its IPG bucket); the measured
    growth of 2 bytes per element of bucket for a 350M model (sunzeyeah/RLHF's table, 2e8 -> 5e9) shows it.
    Stage 0 flattens at most the gradients there are. On CPU ranks (``lazy``) untouched pages of an
    allocation are not resident, so only what the gradients fill counts. ZeRO-3's parameter prefetch is
    part of the gathered working set (:func:`zero3_gathered_bytes`)."""
    if trainable <= 0:
        return 0
    buffers = 2 if overlap_comm and stage < 3 else 1
    if stage == 0 or not contiguous_gradients or lazy:
        return min(reduce_bucket, trainable) * p * buffers
    return reduce_bucket * p * buffers


# ---------------------------------------------------------------------------------------------
# Activations, logits
# ---------------------------------------------------------------------------------------------

def layer_activation_bytes_per_token(arch: Arch, seq: int, a: int, *, attention: str = "sdpa",
                                     dropout: Optional[bool] = None, softmax_fp32: bool = True,
                                     kv_extra: int = 0, lora_inputs: int = 0, lora_r: int = 0,
                                     lora_dropout: bool = False) -> int:
    """Bytes one layer keeps for backward, per token (Korthikanti et al. 2022, section 4.1, term by term).

    - norms: each saves its input (fp32 for Hugging Face's RMSNorm, which upcasts, plus the normalised
      tensor its weight multiplies) -> ``2 * (4h + a*h)`` RMSNorm, ``2 * a*h`` LayerNorm;
    - attention inputs: the QKV projection input ``a*h``, Q ``a*h``, K and V ``a*kv_dim`` each
      (``a*h`` each with eager or SDPA attention, which save the copies ``repeat_kv`` expands for
      GQA), the output projection input ``a*h``;
    - eager attention scores: softmax output ``heads*s`` in fp32 (4 bytes, Hugging Face upcasts) plus
      its cast to the compute dtype; with attention dropout a 1-byte mask and the dropped copy. This is
      Korthikanti's ``5*a*s/h`` term; SDPA/flash keep only a per-row log-sum-exp (``4*heads``);
    - MLP: input ``a*h``; gated ``4*a*I`` (gate output, SiLU output, up output, product); plain
      ``2*a*I`` (GeLU input and output; ``(1 + gelu_tensors)*a*I`` for GPT-2's Python GeLU);
      MoE: each of the ``top_k`` experts sees a copy of the input
      and its output is weighted, ``top_k * (MLP + 2*a*h)``, plus fp32 router probabilities ``4*E``;
    - hidden dropout masks ``2h`` (1 byte each) when ``dropout`` (default: the architecture's);
    - LoRA: per adapted input feature a dropout copy and mask ``(a + 1)`` when LoRA dropout is on,
      and the rank-r intermediate ``a*r`` per adapted matrix.

    With ``dropout=True``, ``softmax_fp32=False``, LayerNorm, eager MHA and ``I = 4h`` this is exactly
    Korthikanti's ``34*h + 5*heads*s`` bytes at a = 2 (measured against real tensors in
    ``bench/bench_estimate.py``).
    """
    h, kv, i = arch.hidden, arch.kv_dim, arch.intermediate
    dropout = arch.dropout if dropout is None else dropout
    norms = 2 * (a * h if arch.layernorm else 4 * h + a * h)
    expand = attention in ("eager", "sdpa") and arch.kv_heads != arch.heads
    qkv_saved = a * h + 2 * a * (h if expand else kv)
    attn = a * h + qkv_saved + a * h
    s_k = seq + kv_extra
    if attention == "eager":
        soft = 4 + (a if a < 4 else 0) if softmax_fp32 else a
        attn += arch.heads * s_k * (soft + ((1 + a) if dropout else 0))
    else:
        attn += 4 * arch.heads
    mlp_one = (4 if arch.gated else 1 + arch.gelu_tensors) * a * i
    mlp = a * h + (arch.top_k * (mlp_one + 2 * a * h) + 4 * arch.experts if arch.experts else mlp_one)
    masks = 2 * h if dropout else 0
    lora = lora_inputs * (a + 1 if lora_dropout else 0) + lora_r * a
    return norms + attn + mlp + masks + lora


def activation_bytes(per_layer_token: int, tokens: int, layers: int, *, a: int, hidden: int,
                     checkpointing: bool) -> int:
    """Activations of ``layers`` layers that backpropagate, for ``tokens`` tokens of one micro batch.

    Without checkpointing every layer keeps everything (``layers * per_layer``). With full activation
    checkpointing each layer keeps only its input (``a*h`` per token) and one layer at a time is
    recomputed during backward (Korthikanti et al. 2022, section 4.2: ``2*s*b*h*L`` plus one layer).
    """
    if checkpointing:
        return tokens * (layers * a * hidden + per_layer_token)
    return tokens * layers * per_layer_token


def logits_bytes(tokens: int, vocab: int, hidden: int, a: int) -> int:
    """Peak of the output projection and cross-entropy, per micro batch.

    ``tokens * (a*h + V*(a + 12))``: the final hidden states, the logits in the compute dtype (kept by
    the model output), and during the loss backward three fp32 ``V``-wide tensors at once: the saved
    log-softmax output, its incoming gradient and the gradient of the logits (Hugging Face's loss
    upcasts to fp32). For 128k vocabularies this is the largest activation term.
    """
    return tokens * (a * hidden + vocab * (a + 12))


def kv_cache_bytes(arch: Arch, tokens: int, a: int) -> int:
    """Generation KV cache: ``2 * L * kv_dim * a`` per token (PPO rollouts)."""
    return 2 * arch.layers * arch.kv_dim * a * tokens


# ---------------------------------------------------------------------------------------------
# Compute and disk
# ---------------------------------------------------------------------------------------------

def flops_per_token(arch: Arch, seq: int, *, frozen_fraction: float = 0.0,
                    checkpointing: bool = False, backward_layers_fraction: float = 1.0) -> float:
    """Training FLOPs per token: ``2*N`` forward, ``4*N`` backward (``2*N`` for the activation
    gradients, ``2*N`` for weight gradients, skipped for frozen weights), ``2*N`` again when
    checkpointing recomputes the forward; attention scores add ``12*L*h*s`` (PaLM appendix B). Layers
    below the first trainable one (``freeze``) run forward only: ``backward_layers_fraction``.
    N counts matmul parameters with only the active MoE experts (:func:`matmul_params`)."""
    n = matmul_params(arch)
    attn = 4 * arch.layers * arch.hidden * seq  # forward QK^T and AV
    fwd = 2 * n + attn
    bwd = backward_layers_fraction * (2 * n * (2 - frozen_fraction) + 2 * attn)
    recompute = backward_layers_fraction * fwd if checkpointing else 0.0
    return fwd + bwd + recompute


# ---------------------------------------------------------------------------------------------
# Communication and offload (step time beyond FLOPs)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    """The link a collective crosses: NCCL bus bandwidth (bytes/s per GPU, as nccl-tests report it for
    large messages) and the latency of one ring step (seconds)."""

    name: str
    bandwidth: float
    latency: float


# Between nodes, per node (all NICs together): NCCL bus bandwidth (GB/s) and latency per ring step (us),
# typical for each hw.interconnect when hw.inter_node_bw_gbs / inter_node_latency_us are not set: about
# 90 % of the line rate of 4 x HDR InfiniBand 200 Gb/s, of 4 x RoCE 100 GbE, and of one 25 GbE link
# under NCCL's socket transport (which reaches less); "none" (no fabric named, e.g. hw=cpu's gloo ranks
# spread over nodes) talks over the same sockets.
INTERCONNECTS = {"ib": (90.0, 6.0), "roce": (45.0, 8.0), "ethernet": (2.5, 30.0), "none": (2.5, 30.0)}


def collective_link(hw) -> Link:
    """Inside one node the GPUs' own link; across nodes the ring is as fast as its slowest hop, the
    node's NICs together (``hw.interconnect``), since NCCL runs one ring per NIC."""
    intra = Link(hw.intra_node_link, hw.intra_node_bw_gbs * 1e9, hw.intra_node_latency_us * 1e-6)
    if hw.nodes <= 1:
        return intra
    bw, latency = INTERCONNECTS.get(hw.interconnect, INTERCONNECTS["ethernet"])
    bw = hw.inter_node_bw_gbs if hw.inter_node_bw_gbs is not None else bw
    latency = hw.inter_node_latency_us if hw.inter_node_latency_us is not None else latency
    return Link(f"{hw.intra_node_link} + {hw.interconnect}", min(intra.bandwidth, bw * 1e9),
                max(intra.latency, latency * 1e-6))


RING_PASSES = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1}  # an all-reduce is both halves


def ring_seconds(kind: str, nbytes: float, ranks: int, link: Link, calls: int = 1) -> float:
    """One ring collective over ``ranks`` of a buffer of ``nbytes`` (the whole, unpartitioned buffer),
    split into ``calls`` calls: each rank sends ``(n-1)/n`` of it for a reduce-scatter or an all-gather,
    twice that for an all-reduce (a reduce-scatter followed by an all-gather), plus ``n-1`` (``2(n-1)``)
    latencies per call (Thakur et al. 2005; NCCL's bus bandwidth is defined so that this holds)."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return RING_PASSES[kind] * ((ranks - 1) / ranks * nbytes / link.bandwidth + calls * (ranks - 1) * link.latency)


@dataclass(frozen=True)
class ZeroTraffic:
    """Bytes of the whole buffers a ZeRO stage moves per rank, by collective: ``per_micro`` in every
    micro step, ``per_step`` once per optimizer step. Each rank sends ``(n-1)/n`` of each buffer."""

    per_micro: Dict[str, int]
    per_step: Dict[str, int]

    def sent_per_rank(self, ranks: int, micro_steps: int = 1) -> float:
        """Bytes one rank sends in an optimizer step of ``micro_steps`` micro steps."""
        def passes(buffers):
            return sum(RING_PASSES[kind] * nbytes for kind, nbytes in buffers.items())
        return (ranks - 1) / ranks * (micro_steps * passes(self.per_micro) + passes(self.per_step))


def zero_traffic(stage: int, total: int, trainable: int, *, p: int, checkpointing: bool = False) -> ZeroTraffic:
    """The collectives of ZeRO ``stage`` (Rajbhandari et al. 2020, section 7: data parallelism and
    P_os / P_os+g move ``2Ψ`` per step, P_os+g+p ``3Ψ``), as DeepSpeed runs them:

    - stage 0: an all-reduce of the ``p*T`` gradient bytes at the accumulation boundary;
    - stage 1: a reduce-scatter of the gradients at the boundary, then an all-gather of the updated
      ``p*T`` parameter bytes (2Ψ);
    - stage 2: gradients are partitioned, so the reduce-scatter runs every micro step; the all-gather of
      the updated parameters once per step;
    - stage 3: an all-gather of every parameter (``p*P``, frozen ones included: all are partitioned) in
      forward and again in backward, once more when checkpointing recomputes the forward, and a
      reduce-scatter of the gradients, every micro step (3Ψ, 4Ψ with recomputation).
    """
    grads, weights = p * trainable, p * total
    if stage == 0:
        return ZeroTraffic({}, {"all_reduce": grads})
    if stage == 1:
        return ZeroTraffic({}, {"reduce_scatter": grads, "all_gather": grads})
    if stage == 2:
        return ZeroTraffic({"reduce_scatter": grads}, {"all_gather": grads})
    gathers = 3 if checkpointing else 2
    return ZeroTraffic({"all_gather": gathers * weights, "reduce_scatter": grads}, {})


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step by resource, and the step as they overlap."""

    compute: float  # FLOPs at the assumed utilisation
    communication: float  # collectives, whether or not hidden behind compute
    offload: float  # CPU <-> GPU copies and the CPU optimizer step
    exposed_communication: float  # what the collectives add to the step beyond compute
    total: float

    @property
    def bound(self) -> str:
        """What the step waits on most: compute, communication or offload."""
        times = {"compute": self.compute, "communication": self.communication, "offload": self.offload}
        return max(times, key=times.get)


def step_seconds(*, compute_micro: float, micro_steps: int, traffic: ZeroTraffic, ranks: int, link: Link,
                 overlap_comm: bool, reduce_bucket: int, p: int, gather_calls: int, largest_module_bytes: int,
                 checkpointing: bool = False, offload: float = 0.0, prefetch: bool = True) -> StepTime:
    """Step time of ``micro_steps`` micro steps of ``compute_micro`` seconds each, with the collectives of
    :func:`zero_traffic` and ``offload`` seconds of host transfers and CPU optimizer.

    Overlap as DeepSpeed achieves it: ZeRO-3 prefetches the next modules' parameters while the current
    ones compute (the first module's gather is exposed; ``prefetch`` off, with a zero
    ``stage3_prefetch_bucket_size``, every gather waits), so a micro step takes ``max(compute, gathers)``
    per pass, forward and backward. With ``overlap_comm`` the gradient reduce-scatter of stages 2-3 runs
    beside backward on its own stream and only its last bucket is exposed; without it the reduction
    waits for backward. Stages 0-1 reduce once per step, after the last backward (not hidden), and the
    all-gather of updated parameters (stages 1-2) follows the optimizer step (not hidden either).
    """
    micro = traffic.per_micro
    gather = ring_seconds("all_gather", micro.get("all_gather", 0), ranks, link, calls=gather_calls)
    grads = micro.get("reduce_scatter", 0)
    buckets = max(1, math.ceil(grads / max(1, reduce_bucket * p)))
    reduce = ring_seconds("reduce_scatter", grads, ranks, link, calls=buckets)
    exposed_first = ring_seconds("all_gather", largest_module_bytes, ranks, link) if gather else 0.0
    if overlap_comm:
        tail = ring_seconds("reduce_scatter", min(grads, reduce_bucket * p), ranks, link)
        backward_comm = reduce - tail
    else:
        tail, backward_comm = reduce, 0.0
    # Gathers are prefetched in any case; reductions share the backward pass when overlapped. Forward is
    # a third of the FLOPs (a quarter with recomputation) and one of the two (three) gathers.
    fwd_share, gather_share = (1 / 4, 1 / 3) if checkpointing else (1 / 3, 1 / 2)
    fwd, bwd = compute_micro * fwd_share, compute_micro * (1 - fwd_share)
    gather_fwd, gather_bwd = gather * gather_share, gather * (1 - gather_share)
    if prefetch:
        micro_time = max(fwd, gather_fwd) + max(bwd, gather_bwd + backward_comm) + tail + exposed_first
    else:  # stage3_prefetch_bucket_size=0: each module waits for its own gather
        micro_time = fwd + gather_fwd + max(bwd + gather_bwd, gather_bwd + backward_comm) + tail
    step_comm = 0.0
    for kind, nbytes in traffic.per_step.items():
        calls = max(1, math.ceil(nbytes / max(1, reduce_bucket * p)))
        step_comm += ring_seconds(kind, nbytes, ranks, link, calls=calls)
    compute = compute_micro * micro_steps
    total = micro_time * micro_steps + step_comm + offload
    communication = (gather + reduce) * micro_steps + step_comm
    return StepTime(compute=compute, communication=communication, offload=offload,
                    exposed_communication=max(0.0, total - offload - compute), total=total)


def offload_seconds(*, trainable: int, total: int, dp: int, p: int, micro_steps: int, host_bw: float,
                    offload_optimizer: bool, offload_param: bool, gathers_per_micro: int,
                    adam_params_per_s: float) -> float:
    """CPU <-> GPU traffic and the CPU optimizer of ZeRO-Offload (Ren et al. 2021, section 4):
    each micro step the rank's reduced gradient partition ``p*T/dp`` goes to the CPU, once per step CPU
    Adam updates ``T/dp`` parameters and the updated ``p*T/dp`` come back; with parameter offload every
    gather first copies the rank's ``p*P/dp`` partition from CPU memory. The PCIe copies of DeepSpeed's
    CPU Adam are not overlapped with the update itself."""
    if not offload_optimizer:
        return 0.0
    part = trainable / dp
    moved = micro_steps * p * part + p * part
    if offload_param:
        moved += micro_steps * gathers_per_micro * p * total / dp
    return moved / host_bw + part / adam_params_per_s


def gather_calls_per_micro(arch: Arch, modules_per_layer: int, gathers: int) -> int:
    """ZeRO-3 gathers parameters module by module: ``modules_per_layer`` linear modules in each layer
    (norms stay resident below ``stage3_param_persistence_threshold``), plus embedding and head,
    ``gathers`` times per micro step (forward, backward, recomputation)."""
    return gathers * (arch.layers * modules_per_layer + 2)


def checkpoint_bytes(total: int, trainable: int, *, p: int) -> int:
    """One DeepSpeed checkpoint: the module state dict in the training dtype (all parameters,
    frozen ones included) plus the optimizer's fp32 master weights, momentum and variance of the
    trainable ones (``12 * T``), summed over all ranks' partitions."""
    return p * total + 12 * trainable


def gib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / GIB, 3)
