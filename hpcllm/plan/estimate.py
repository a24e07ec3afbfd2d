"""Pre-flight estimate of one composed job: memory per GPU and per node, time, disk, and remedies.

The formulas are in :mod:`hpcllm.plan.formulas`; this module decides which of them a job's method,
stage, ZeRO profile and hardware call for, and adds them up.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from hpcllm.config import ConfigError, Derived
from hpcllm.config.profiles import describe_extra_models, extra_models, role_key, zero_preset
from hpcllm.plan import formulas as F
from hpcllm.plan.formulas import GIB
from hpcllm.plan.quota import quota_warning, user_quota


@dataclass
class Estimate:
    """Predicted resources of one job; sizes in GiB (written ``GB`` in tables, as ``nvidia-smi`` does)."""

    gpu_mem_gb: float  # predicted peak per GPU (per CPU rank on hw=cpu)
    gpu_capacity_gb: float
    cpu_mem_gb: float  # per node
    cpu_capacity_gb: float
    fits_gpu: bool
    fits_cpu: bool
    fits_disk: bool
    breakdown: Dict[str, float]  # GiB per term, per GPU
    cpu_breakdown: Dict[str, float]  # GiB per term, per node
    max_micro_batch_size: int  # largest micro batch that fits (0: not even 1)
    total_params: int
    trainable_params: int
    flops_per_token: float
    step_time_s: float
    tokens_per_sec_per_gpu: float
    steps: Optional[int]
    job_hours: Optional[float]
    checkpoint_gb: float
    disk_needed_gb: float
    disk_free_gb: Optional[float]
    remedies: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    # Seconds per step by resource (compute, communication, the part of it not hidden, offload), what the
    # step is bound by, and the link the collectives cross.
    time_breakdown: Dict[str, float] = field(default_factory=dict)
    bound: str = "compute"
    link: str = ""

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu and self.fits_disk

    def to_dict(self) -> dict:
        return dict(asdict(self), fits=self.fits)


def count_params(model_cfg) -> int:
    """Parameters of the model from its architecture numbers (not the preset's published num_params)."""
    return F.count_params(F.arch_of(model_cfg))


@dataclass(frozen=True)
class _Trainable:
    total: int  # parameters of the trained model (with adapters)
    trainable: int
    layers_backward: int  # layers that keep activations for backward
    lora_inputs: int = 0  # adapted input features per layer (LoRA dropout copies)
    lora_matrices: int = 0


def _trainable(cfg: DictConfig, arch: F.Arch) -> _Trainable:
    method = cfg.method
    base = F.count_params(arch)
    if method.adapter == "lora":
        targets = list(method.lora.targets or cfg.model.lora_targets)
        added = F.lora_params(arch, targets, method.lora.r)
        shapes = F.linear_shapes(arch)
        fan_in = sum(c * i for t in targets for i, _, c in shapes.get(t, [(arch.hidden, arch.hidden, 1)]))
        matrices = sum(c for t in targets for _, _, c in shapes.get(t, [(0, 0, 1)]))
        extra = sum(arch.vocab * arch.hidden for name in method.lora.extra_trainable
                    if any(k in name for k in ("lm_head", "embed", "wte", "word_embeddings")))
        return _Trainable(base + added + extra, added + extra, arch.layers, fan_in, matrices)
    if method.adapter == "freeze":
        n = method.freeze.trainable_layers
        extra = 0
        for pattern in method.freeze.extra_trainable:
            if "lm_head" in pattern or "embed" in pattern:
                extra += arch.vocab * arch.hidden
            elif "norm" in pattern:
                extra += F.head_params(arch) - (0 if arch.tied else arch.vocab * arch.hidden)
        return _Trainable(base, n * F.layer_params(arch) + extra, n)
    if method.adapter == "ptuning":
        pt = method.ptuning
        added = F.prefix_params(arch, pt.num_virtual_tokens, pt.prefix_projection, pt.projection_hidden_size)
        return _Trainable(base + added, added, arch.layers)
    return _Trainable(base, base, arch.layers)


def _value_model_params(arch: F.Arch) -> int:
    """A reward model or critic: the base without the output projection, plus an ``h -> 1`` head."""
    return F.count_params(arch) - (0 if arch.tied else arch.vocab * arch.hidden) + arch.hidden


def _disk_space(run_dir: Optional[str]) -> tuple[Optional[float], Optional[str]]:
    """Free bytes where the run directory is - the user's quota left, where a quota tool answers, if
    less than the filesystem's free space - and a warning when that quota is nearly used."""
    if not run_dir:
        return None, None
    path = os.path.abspath(run_dir)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None, None
        path = parent
    free, found = shutil.disk_usage(path).free, user_quota(path)
    return (free, None) if found is None else (min(free, found.free), quota_warning(found, path))


def memory_breakdown(cfg: DictConfig, derived: Derived, micro_batch: int, zero_init: Optional[bool] = None):
    """(bytes per term per GPU, bytes per term per node) at ``micro_batch``."""
    gpu, cpu, *_ = _memory(cfg, derived, micro_batch, zero_init)
    return gpu, cpu


def _memory(cfg: DictConfig, derived: Derived, micro_batch: int, zero_init: Optional[bool] = None):
    """(per-GPU breakdown bytes, per-node CPU breakdown bytes, trainable info, notes).

    ``zero_init``: the model is built under ``deepspeed.zero.Init`` (partitioned as it is created);
    None = ``train.zero_init``. Without it ZeRO-3 jobs pay the whole-model load peak."""
    if zero_init is None:
        zero_init = cfg.train.zero_init
    model, method, zero, hw, train = cfg.model, cfg.method, cfg.zero, cfg.hw, cfg.train
    arch = F.arch_of(model)
    mixed = derived.precision in ("fp16", "bf16")
    a = p = 2 if mixed else 4
    dp, stage = derived.data_parallel_size, zero.stage
    on_cpu = hw.accelerator == "cpu"
    notes: List[str] = []
    tr = _trainable(cfg, arch)
    largest = F.largest_module_params(arch)
    if model.load_dtype not in F.LOAD_BYTES:
        raise ConfigError(f"model.load_dtype={model.load_dtype!r} is not a dtype: use one of "
                          f"{', '.join(F.LOAD_BYTES)} (auto = the training dtype)")
    load_bytes = F.LOAD_BYTES[model.load_dtype] or p
    common = dict(stage=stage, dp=dp, gpus_per_node=hw.gpus_per_node, nodes=hw.nodes, mixed=mixed,
                  offload_optimizer=zero.offload_optimizer, offload_param=zero.offload_param,
                  largest_module=largest, load_bytes=load_bytes, zero_init=zero_init)

    # Which models are resident: the trained one, and per stage the extra ones, each under its own profile.
    stage_name = method.stage
    trained_total, trained_trainable = tr.total, tr.trainable
    extra = extra_models(cfg)
    sizes = {"critic": _value_model_params(arch), "reward": _value_model_params(arch),
             "reference": F.count_params(arch)}
    seq = method.seq_len
    pairs = 1
    lm_head = True
    if stage_name == "reward":
        pairs, lm_head = 2, False
        trained_total += _value_model_params(arch) - F.count_params(arch)
        if method.adapter == "none":
            trained_trainable = trained_total
    elif stage_name == "dpo":
        pairs = 2
    elif stage_name == "ppo":
        seq = method.seq_len + method.ppo.max_new_tokens
    extra_trained = [(sizes[role], z) for role, (z, trained) in extra.items() if trained]
    frozen_totals = [(sizes[role], z) for role, (z, trained) in extra.items() if not trained]
    notes += [f"{stage_name}: {line}" for line in describe_extra_models(cfg)]

    if stage_name == "eval":
        states = F.ModelStates(parameters=F.frozen_model_bytes(trained_total, p=p, stage=stage, dp=dp,
                                                               offload_param=zero.offload_param),
                               gradients=0, optimizer=0, cpu=int(p * trained_total * hw.gpus_per_node))
        trainable_for_buckets = trained_trainable = 0
    else:
        states = F.model_states(trained_total, trained_trainable, **common)
        for n, z in extra_trained:
            s = F.model_states(n, n, **dict(common, stage=z.stage, offload_optimizer=z.offload_optimizer,
                                            offload_param=z.offload_param))
            states = F.ModelStates(states.parameters + s.parameters, states.gradients + s.gradients,
                                   states.optimizer + s.optimizer, states.cpu + s.cpu)
        trainable_for_buckets = trained_trainable
    frozen = sum(F.frozen_model_bytes(n, p=p, stage=z.stage, dp=dp, offload_param=z.offload_param)
                 for n, z in frozen_totals)

    tokens = micro_batch * seq * pairs
    attention = train.attention
    if model.position == "alibi" and attention == "sdpa":
        attention = "eager"  # transformers has no SDPA path for ALiBi (BLOOM); build falls back to eager
    per_layer = F.layer_activation_bytes_per_token(
        arch, seq, a, attention=attention,
        kv_extra=method.ptuning.num_virtual_tokens if method.adapter == "ptuning" else 0,
        lora_inputs=tr.lora_inputs, lora_r=method.lora.r * tr.lora_matrices if tr.lora_matrices else 0,
        lora_dropout=method.adapter == "lora" and method.lora.dropout > 0)
    if stage_name == "eval":
        act = tokens * per_layer  # forward only: one layer's intermediates at a time
    else:
        act = F.activation_bytes(per_layer, tokens, tr.layers_backward, a=a, hidden=arch.hidden,
                                 checkpointing=train.gradient_checkpointing)
    if stage_name == "ppo":
        rollout = method.ppo.rollout_batch_size * seq
        act = max(act, F.kv_cache_bytes(arch, rollout, a))
    logits = F.logits_bytes(tokens, arch.vocab, arch.hidden, a) if lm_head else tokens * a * arch.hidden
    buckets = 0
    if stage_name != "eval":
        buckets = F.bucket_bytes(trainable_for_buckets, p=p, reduce_bucket=zero.reduce_bucket_size,
                                 overlap_comm=zero.overlap_comm, stage=stage,
                                 contiguous_gradients=zero.contiguous_gradients, lazy=on_cpu)
    context = F.CPU_RANK_RUNTIME_BYTES if on_cpu else F.CUDA_CONTEXT_BYTES
    gathered = 0
    if stage == 3 and stage_name != "eval":
        gathered = F.zero3_gathered_bytes(trained_total, p=p, max_live=zero.stage3_max_live_parameters,
                                          largest_module=largest)
    gpu = {
        "parameters": states.parameters + frozen,
        "gathered": gathered,
        "gradients": states.gradients,
        "optimizer": states.optimizer,
        "activations": act,
        "logits": logits,
        "buckets": buckets,
        "context": context,
    }
    gpu["fragmentation"] = F.fragmentation_bytes(sum(v for k, v in gpu.items() if k != "context"))
    # Models under a ZeRO-3 profile built without zero.Init pass whole through the GPU one at a time,
    # each as its engine is created.
    loaded_whole = ([trained_total] if stage == 3 else []) + [n for n, z in extra_trained + frozen_totals
                                                              if z.stage == 3]
    if loaded_whole and not zero_init:
        # Reported as what the load peak adds above the training peak, so the terms still sum to the peak.
        load = F.zero3_load_peak_bytes(max(loaded_whole), p=load_bytes) + context
        gpu["zero3_load"] = max(0, load - sum(gpu.values()))
        if gpu["zero3_load"]:
            notes.append("zero3_load: the whole model passes through each GPU before ZeRO-3 partitions it "
                         "(train.zero_init=false); this, not training, sets the peak")
    elif stage < 3 and load_bytes > p and not on_cpu:
        # A script that moves the model to the GPU before the engine casts it holds it whole in load_dtype.
        gpu["model_load"] = max(0, load_bytes * trained_total + context - sum(gpu.values()))
    if load_bytes > p and not on_cpu:
        notes.append(f"model.load_dtype={model.load_dtype}: every GPU holds the whole model in {model.load_dtype} "
                     f"({F.gib(load_bytes * trained_total):.1f} GB) before it is cast"
                     + (" and partitioned" if stage == 3 else "")
                     + f"; load it in the training dtype ({derived.precision}) to avoid that peak")

    if on_cpu:
        # The ranks are CPU processes: their whole footprint, the model they build included, is this
        # node's RAM; offloaded states come on top.
        cpu = {"ranks": hw.gpus_per_node * sum(gpu.values()),
               "model_states": states.cpu if zero.offload_optimizer else 0}
    else:
        cpu = {"model_states": states.cpu, "runtime": hw.gpus_per_node * F.GPU_RANK_HOST_RUNTIME_BYTES}
    return gpu, cpu, tr, trained_trainable, notes


def _fits(cfg: DictConfig, gpu: dict, cpu: dict) -> tuple[bool, bool]:
    return sum(gpu.values()) <= cfg.hw.gpu_mem_gb * GIB, sum(cpu.values()) <= cfg.hw.ram_gb_per_node * GIB


def _max_micro_batch(cfg: DictConfig, derived: Derived, zero_init: bool, limit: int = 4096) -> int:
    def ok(b):
        gpu, cpu, *_ = _memory(cfg, derived, b, zero_init)
        return all(_fits(cfg, gpu, cpu))

    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _time(cfg: DictConfig, derived: Derived, arch: F.Arch, tr: _Trainable, trainable: int):
    method, train, hw = cfg.method, cfg.train, cfg.hw
    seq = method.seq_len + (method.ppo.max_new_tokens if method.stage == "ppo" else 0)
    frozen_fraction = 1.0 - min(1.0, trainable / max(tr.total, 1))
    layers_fraction = tr.layers_backward / arch.layers
    if method.stage == "eval":
        fpt = 2.0 * F.matmul_params(arch) + 4 * arch.layers * arch.hidden * seq
    else:
        fpt = F.flops_per_token(arch, seq, frozen_fraction=frozen_fraction if method.adapter != "freeze" else 0.0,
                                checkpointing=train.gradient_checkpointing,
                                backward_layers_fraction=layers_fraction)
        if method.stage == "ppo":
            fpt *= 2  # actor and critic both train on every rollout token
    pairs = 2 if method.stage in ("reward", "dpo") else 1
    if method.stage == "dpo" and not method.dpo.precompute_reference:
        fpt += 2.0 * F.matmul_params(arch)  # reference forward
    peak = (hw.peak_tflops_16bit if derived.precision in ("fp16", "bf16") else hw.peak_tflops_fp32) * 1e12
    # Data parallel: every GPU computes its own micro batches; tensor/pipeline parallel ranks share one.
    model_parallel = train.tensor_parallel * train.pipeline_parallel
    tokens_per_micro = method.micro_batch_size * seq * pairs
    compute_micro = fpt * tokens_per_micro / model_parallel / (peak * hw.mfu)
    times = _step_seconds(cfg, derived, arch, tr, trainable, compute_micro)
    tokens_per_gpu_step = tokens_per_micro * derived.grad_accum_steps
    tokens_per_s = tokens_per_gpu_step / model_parallel / times.total if times.total > 0 else 0.0
    return fpt, times, tokens_per_s


def _step_seconds(cfg: DictConfig, derived: Derived, arch: F.Arch, tr: _Trainable, trainable: int,
                  compute_micro: float) -> F.StepTime:
    """Compute, the ZeRO stage's collectives over the links of ``hw`` and offload, overlapped as DeepSpeed
    does (:func:`hpcllm.plan.formulas.step_seconds`)."""
    zero, train, hw = cfg.zero, cfg.train, cfg.hw
    p = 2 if derived.precision in ("fp16", "bf16") else 4
    dp, micro_steps = derived.data_parallel_size, derived.grad_accum_steps
    training = cfg.method.stage != "eval"
    checkpointing = bool(train.gradient_checkpointing) and training
    stage = zero.stage if dp > 1 else 0
    traffic = F.zero_traffic(stage, tr.total, trainable if training else 0, p=p, checkpointing=checkpointing)
    if not training:  # a forward pass: ZeRO-3 gathers once, nothing is reduced
        traffic = F.ZeroTraffic({"all_gather": p * tr.total} if stage == 3 else {}, {})
    gathers = 0 if stage != 3 else (1 if not training else 3 if checkpointing else 2)
    modules = 4 if (arch.fused_gate_up or not arch.gated) else 7
    offload = 0.0
    if training and zero.offload_optimizer:
        cores_per_rank = max(1, hw.cpus_per_node // hw.gpus_per_node)
        offload = F.offload_seconds(
            trainable=trainable, total=tr.total, dp=dp, p=p, micro_steps=micro_steps, host_bw=hw.host_bw_gbs * 1e9,
            offload_optimizer=True, offload_param=zero.offload_param and zero.stage == 3, gathers_per_micro=gathers,
            adam_params_per_s=cores_per_rank * F.CPU_ADAM_PARAMS_PER_CORE_S)
    return F.step_seconds(
        compute_micro=compute_micro, micro_steps=micro_steps, traffic=traffic, ranks=dp,
        link=F.collective_link(hw), overlap_comm=zero.overlap_comm, reduce_bucket=zero.reduce_bucket_size, p=p,
        gather_calls=F.gather_calls_per_micro(arch, modules, gathers) if gathers else 0,
        largest_module_bytes=p * F.largest_module_params(arch), checkpointing=checkpointing, offload=offload,
        prefetch=zero.stage3_prefetch_bucket_size > 0)


def _steps(cfg: DictConfig, derived: Derived, num_samples: Optional[int]) -> Optional[int]:
    if cfg.train.max_steps > 0:
        return int(cfg.train.max_steps)
    if num_samples:
        return cfg.method.epochs * math.ceil(num_samples / derived.global_batch_size)
    return None


def estimate(cfg: DictConfig, derived: Derived, run_dir: Optional[str] = None,
             num_samples: Optional[int] = None, *, with_remedies: bool = True,
             zero_init: Optional[bool] = None) -> Estimate:
    """Estimate memory, time and disk for a composed and derived job (see :mod:`hpcllm.plan`).

    ``num_samples``: training samples per epoch, for job hours when ``train.max_steps`` is not set.
    ``zero_init``: predict for a model built under ``deepspeed.zero.Init``; None = ``train.zero_init``.
    """
    if zero_init is None:
        zero_init = cfg.train.zero_init
    arch = F.arch_of(cfg.model)
    gpu, cpu, tr, trainable, notes = _memory(cfg, derived, cfg.method.micro_batch_size, zero_init)
    fits_gpu, fits_cpu = _fits(cfg, gpu, cpu)
    fpt, times, tps = _time(cfg, derived, arch, tr, trainable)
    step_s = times.total
    steps = _steps(cfg, derived, num_samples)
    p = 2 if derived.precision in ("fp16", "bf16") else 4
    ckpt = F.checkpoint_bytes(tr.total, trainable, p=p) if cfg.method.stage != "eval" else 0
    export = p * tr.total if cfg.train.export and cfg.method.stage != "eval" else 0
    needed = ckpt * max(cfg.train.keep_last, 1) + export
    free, quota_note = _disk_space(run_dir if run_dir is not None else cfg.get("run_dir"))
    fits_disk = free is None or needed + cfg.train.min_free_disk_gb * GIB <= free
    if free is None:
        notes.append("disk: no run directory to check free space against")
    if quota_note:
        notes.append(quota_note)
    est = Estimate(
        gpu_mem_gb=F.gib(sum(gpu.values())), gpu_capacity_gb=float(cfg.hw.gpu_mem_gb),
        cpu_mem_gb=F.gib(sum(cpu.values())), cpu_capacity_gb=float(cfg.hw.ram_gb_per_node),
        fits_gpu=fits_gpu, fits_cpu=fits_cpu, fits_disk=fits_disk,
        breakdown={k: F.gib(v) for k, v in gpu.items()}, cpu_breakdown={k: F.gib(v) for k, v in cpu.items()},
        max_micro_batch_size=(_max_micro_batch(cfg, derived, zero_init) if with_remedies
                              else cfg.method.micro_batch_size),
        total_params=tr.total, trainable_params=trainable, flops_per_token=fpt,
        step_time_s=round(step_s, 4), tokens_per_sec_per_gpu=round(tps, 1), steps=steps,
        time_breakdown={"compute": round(times.compute, 4), "communication": round(times.communication, 4),
                        "exposed_communication": round(times.exposed_communication, 4),
                        "offload": round(times.offload, 4)},
        bound=times.bound, link=F.collective_link(cfg.hw).name,
        job_hours=None if steps is None else round(steps * step_s / 3600, 3),
        checkpoint_gb=F.gib(ckpt), disk_needed_gb=F.gib(needed), disk_free_gb=F.gib(free), notes=notes,
    )
    if with_remedies and not est.fits:
        est.remedies = remedies(cfg, derived, est, zero_init)
    return est


# ---------------------------------------------------------------------------------------------
# Remedies
# ---------------------------------------------------------------------------------------------

ZERO_PROFILES = {  # preset name -> (stage, offload_optimizer, offload_param), as in conf/zero/
    "stage0": (0, False, False), "stage1": (1, False, False), "stage2": (2, False, False), "stage2_offload": (2, True, False),
    "stage3": (3, False, False), "stage3_offload": (3, True, True),
}


def _with(cfg: DictConfig, derived: Derived, override: str):
    """Apply one remedy override to a copy of the job; returns (cfg, derived)."""
    cfg = copy.deepcopy(cfg)
    key, value = override.split("=", 1)
    if key == "zero":
        stage, opt, par = ZERO_PROFILES[value]
        cfg.zero.name, cfg.zero.stage, cfg.zero.offload_optimizer, cfg.zero.offload_param = value, stage, opt, par
    elif key == "train.gradient_checkpointing":
        cfg.train.gradient_checkpointing = True
    elif key == "method.micro_batch_size":
        cfg.method.micro_batch_size = int(value)
    elif key == "hw.nodes":
        cfg.hw.nodes = int(value)
        world = cfg.hw.nodes * cfg.hw.gpus_per_node
        dp = world // (cfg.train.tensor_parallel * cfg.train.pipeline_parallel)
        derived = replace(derived, world_size=world, data_parallel_size=dp,
                          grad_accum_steps=max(1, derived.global_batch_size // (cfg.method.micro_batch_size * dp)))
    elif key == "train.keep_last":
        cfg.train.keep_last = int(value)
    elif key.endswith("_zero") or key == "model.load_dtype":  # e.g. method.ppo.reference_zero
        OmegaConf.update(cfg, key, value)
    return cfg, derived


def _candidate_micro_batch(cfg: DictConfig, derived: Derived, max_mb: int) -> Optional[int]:
    """The largest micro batch below the current one that fits and keeps the global batch whole."""
    per_rank = None
    if cfg.method.global_batch_size is not None:
        per_rank = cfg.method.global_batch_size // derived.data_parallel_size
    for b in range(min(max_mb, cfg.method.micro_batch_size - 1), 0, -1):
        if per_rank is None or per_rank % b == 0:
            return b
    return None


def remedies(cfg: DictConfig, derived: Derived, est: Estimate, zero_init: Optional[bool] = None) -> List[str]:
    """Concrete overrides that make the job fit, cheapest first: a smaller micro batch, gradient
    checkpointing, the next ZeRO stage, offload, more nodes. Each single one listed fits by itself;
    when none does, the cheapest combination that fits is listed."""
    steps: List[str] = []
    if not est.fits_disk:
        if cfg.train.keep_last > 1:
            steps.append("train.keep_last=1")
        steps.append(f"free {est.disk_needed_gb + cfg.train.min_free_disk_gb - (est.disk_free_gb or 0):.1f} GB "
                     "where the run directory lives (or set hydra.run.dir elsewhere)")
    if est.fits_gpu and est.fits_cpu:
        return steps

    candidates: List[str] = []
    if est.breakdown.get("zero3_load") or est.breakdown.get("model_load"):
        candidates.append("model.load_dtype=auto")  # load in the training dtype: costs nothing
    mb = _candidate_micro_batch(cfg, derived, est.max_micro_batch_size)
    if mb:
        candidates.append(f"method.micro_batch_size={mb}")
    if not cfg.train.gradient_checkpointing and cfg.method.stage != "eval":
        candidates.append("train.gradient_checkpointing=true")
    for role, (zero, trained) in extra_models(cfg).items():
        # A frozen model partitioned (then offloaded) costs no optimizer change to the trained ones.
        for preset in (zero_preset("stage3"), zero_preset("stage3_offload")):
            if not trained and (preset.stage, preset.offload_param) > (zero.stage, zero.offload_param):
                candidates.append(f"{role_key(cfg, role)}={preset.name}")
    current = (cfg.zero.stage, cfg.zero.offload_optimizer, cfg.zero.offload_param)
    for name, profile in ZERO_PROFILES.items():
        if profile > current and not (profile[0] >= 2 and cfg.train.pipeline_parallel > 1):
            candidates.append(f"zero={name}")
    nodes = cfg.hw.nodes
    for _ in range(6):
        nodes *= 2
        candidates.append(f"hw.nodes={nodes}")

    def fits(overrides):
        c, d = cfg, derived
        for o in overrides:
            c, d = _with(c, d, o)
        e = estimate(c, d, with_remedies=False, zero_init=zero_init)
        return e.fits_gpu and e.fits_cpu

    singles = [c for c in candidates if fits([c])]
    # Keep one node count: the smallest that fits.
    node_opts = [c for c in singles if c.startswith("hw.nodes=")]
    singles = [c for c in singles if not c.startswith("hw.nodes=")] + node_opts[:1]
    if singles:
        return steps + singles
    chosen: List[str] = []
    for c in candidates:
        if c.startswith("method.micro_batch_size"):
            continue
        if c.startswith("zero=") and any(x.startswith("zero=") for x in chosen):
            chosen = [x for x in chosen if not x.startswith("zero=")]
        if c.startswith("hw.nodes=") and any(x.startswith("hw.nodes=") for x in chosen):
            chosen = [x for x in chosen if not x.startswith("hw.nodes=")]
        chosen.append(c)
        if fits(chosen):
            return steps + [" ".join(chosen)]
        c2, d2 = cfg, derived
        for o in chosen:
            c2, d2 = _with(c2, d2, o)
        mb = _candidate_micro_batch(c2, d2, _max_micro_batch(c2, d2, zero_init))
        if mb:
            return steps + [" ".join(chosen + [f"method.micro_batch_size={mb}"])]
    hint = (" (the whole model passes through each GPU before ZeRO-3 partitions it: train.zero_init=true "
            "builds it under deepspeed.zero.Init and removes that peak)" if est.breakdown.get("zero3_load") else "")
    return steps + ["no combination of micro batch, checkpointing, ZeRO stage, offload and up to "
                    f"{nodes} nodes fits: choose a smaller model, shorter method.seq_len or larger GPUs" + hint]
