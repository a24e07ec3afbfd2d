"""Validation across groups and the numbers derived from a composed job.

Each check raises ``ConfigError`` whose message names the override to change and how.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

from hpcllm.config.errors import ConfigError
from hpcllm.config.recipes import apply_recipe

# The stages a method may run; the method's own name is free (a user's conf/method/my_sft.yaml).
STAGES = ("lm", "reward", "dpo", "ppo", "eval")
# The data each training stage reads (method.data_kind: what the launcher prepares for it).
STAGE_DATA_KINDS = {"lm": ("pretrain", "sft"), "reward": ("preference",), "dpo": ("preference",), "ppo": ("prompt",)}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# More nodes than any Slurm cluster has: a typo (hw.nodes=1e8), not a request.
MAX_NODES = 16384
MAX_PROCESSES_PER_NODE = 64
SLURM_PORT_SPAN = 20000  # master port = cluster.port_base + job id % SLURM_PORT_SPAN (hpcllm.distributed)
# A Hugging Face hub id ("org/name" or "name"): anything else that does not exist is a wrong local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Derived:
    world_size: int
    data_parallel_size: int
    global_batch_size: int
    grad_accum_steps: int
    precision: str  # fp32 | fp16 | bf16
    tasks_per_node: int

    def to_dict(self) -> dict:
        return asdict(self)


def _one_of(value, allowed, key):
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _precision(cfg: DictConfig) -> str:
    hw, wanted = cfg.hw, cfg.train.precision
    _one_of(wanted, PRECISIONS, "train.precision")
    if hw.accelerator == "cpu":
        if wanted in ("fp16", "bf16"):
            raise ConfigError(
                f"train.precision={wanted} is not supported on hw={hw.name} (CPU ranks train in fp32): "
                "set train.precision=fp32 or auto")
        return "fp32"
    if wanted == "auto":
        return "bf16" if hw.supports_bf16 else "fp16"
    if wanted == "bf16" and not hw.supports_bf16:
        raise ConfigError(
            f"train.precision=bf16 needs Ampere or newer GPUs, but hw={hw.name} has {hw.gpu_name}: "
            "set train.precision=fp16 (or auto)")
    return wanted


def _batch(cfg: DictConfig, dp: int) -> int:
    m = cfg.method
    for key in ("micro_batch_size", "seq_len", "epochs"):
        if m[key] < 1:
            raise ConfigError(f"method.{key}={m[key]} must be at least 1")
    per_step = m.micro_batch_size * dp
    if m.global_batch_size is None:
        return per_step
    if m.global_batch_size < 1:
        raise ConfigError(f"method.global_batch_size={m.global_batch_size} must be at least 1 (or null for auto)")
    if m.global_batch_size % per_step:
        lower = max(per_step, m.global_batch_size // per_step * per_step)
        raise ConfigError(
            f"method.global_batch_size={m.global_batch_size} is not divisible by "
            f"method.micro_batch_size={m.micro_batch_size} x data-parallel size {dp} = {per_step}: "
            f"set method.global_batch_size to a multiple of {per_step} (e.g. {lower} or {lower + per_step}), "
            "or change method.micro_batch_size / hw.nodes / hw.gpus_per_node")
    return m.global_batch_size


def _compatibility(cfg: DictConfig) -> None:
    model, method, zero, train = cfg.model, cfg.method, cfg.zero, cfg.train
    _one_of(method.stage, STAGES, "method.stage")
    kinds = STAGE_DATA_KINDS.get(method.stage, (method.data_kind,))
    if method.data_kind not in kinds:
        raise ConfigError(f"method.data_kind={method.data_kind} does not fit method.stage={method.stage} "
                          f"(method={method.name}), which trains on {' or '.join(kinds)} data: "
                          f"set method.data_kind={kinds[0]}")
    if zero.stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage={zero.stage} must be 0, 1, 2 or 3")
    if (zero.offload_optimizer or zero.offload_param) and zero.stage == 0:
        raise ConfigError(f"zero={zero.name}: offload needs ZeRO stage 1 or higher")
    if zero.offload_param and zero.stage != 3:
        raise ConfigError(f"zero={zero.name}: parameter offload needs ZeRO stage 3 (use zero=stage3_offload)")
    if model.num_heads % model.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={model.num_heads} is not a multiple of model.num_kv_heads={model.num_kv_heads}")
    if method.adapter == "ptuning" and not model.supports_ptuning:
        raise ConfigError(f"method=ptuning does not apply to model={model.name}: choose method=lora or freeze")
    if method.adapter == "freeze" and not 1 <= method.freeze.trainable_layers <= model.num_layers:
        raise ConfigError(
            f"method.freeze.trainable_layers={method.freeze.trainable_layers} must be between 1 and "
            f"model.num_layers={model.num_layers}")
    if method.adapter == "lora" and method.lora.r < 1:
        raise ConfigError(f"method.lora.r={method.lora.r} must be at least 1")
    if model.position != "alibi" and method.seq_len > model.max_positions:
        raise ConfigError(
            f"method.seq_len={method.seq_len} exceeds model.max_positions={model.max_positions} of "
            f"model={model.name}: lower method.seq_len"
            + ("" if model.path else f", or raise model.max_positions={method.seq_len} (the model is built from the preset)"))
    if train.tensor_parallel < 1 or train.pipeline_parallel < 1:
        raise ConfigError("train.tensor_parallel and train.pipeline_parallel must be at least 1")
    if model.num_heads % train.tensor_parallel:
        raise ConfigError(
            f"model.num_heads={model.num_heads} is not divisible by train.tensor_parallel={train.tensor_parallel}")
    if train.pipeline_parallel > 1 and zero.stage >= 2:
        raise ConfigError(
            f"zero={zero.name} (stage {zero.stage}) cannot partition gradients across pipeline stages: "
            "with train.pipeline_parallel > 1 use zero=stage0 or stage1")
    if not train.hang_timeout_min >= 0:
        raise ConfigError(f"train.hang_timeout_min={train.hang_timeout_min} must be >= 0 (0 turns the watchdog off)")
    if train.stop_check_every < 1:
        raise ConfigError(f"train.stop_check_every={train.stop_check_every} must be at least 1 (steps)")
    if train.pipeline_parallel > 1:
        _pipeline(cfg)


def _pipeline(cfg: DictConfig) -> None:
    """What a pipeline-parallel job (train.pipeline_parallel > 1) needs: a pipelined family, a full-weight
    language-model method, a known partition and as many pipeline layers as stages."""
    from hpcllm.models.pipeline import PARTITION_METHODS, pipeline_refusal

    model, method, train = cfg.model, cfg.method, cfg.train
    refusal = pipeline_refusal(model)
    if refusal:
        raise ConfigError(refusal)
    if method.stage != "lm" or method.adapter != "none":
        raise ConfigError(f"method={method.name} cannot train with train.pipeline_parallel={train.pipeline_parallel}: "
                          "the pipeline trains all weights of a pretrain/sft model (no adapters, reward, DPO or PPO); "
                          "use method=pretrain or sft, or train.pipeline_parallel=1")
    partition = train.pipeline_partition
    if partition not in PARTITION_METHODS and not partition.startswith("type:"):
        raise ConfigError(f"train.pipeline_partition={partition!r} is not one of parameters, uniform, type:REGEX")
    layers = model.num_layers + (3 if model.tie_embeddings else 2)
    if train.pipeline_parallel > layers:
        raise ConfigError(f"train.pipeline_parallel={train.pipeline_parallel} exceeds the {layers} pipeline layers of "
                          f"model={model.name}: lower train.pipeline_parallel")
    parts = train.pipeline_parts
    if parts is not None and (len(parts) != train.pipeline_parallel or sum(parts) != layers or min(parts) < 1):
        raise ConfigError(f"train.pipeline_parts={list(parts)} must give train.pipeline_parallel="
                          f"{train.pipeline_parallel} positive layer counts summing to model={model.name}'s "
                          f"{layers} pipeline layers (embedding + {model.num_layers} decoder layers + "
                          f"{'final norm + tied head' if model.tie_embeddings else 'final norm and head'})")


def _alignment(cfg: DictConfig) -> None:
    """Reward, DPO and PPO: which adapters apply, and each model's ZeRO profile."""
    from hpcllm.config.profiles import model_zero

    method = cfg.method
    if method.stage not in ("reward", "dpo", "ppo"):
        return
    if method.adapter == "ptuning":
        raise ConfigError(f"method={method.name} trains with method.adapter=none, lora or freeze: "
                          "P-tuning's prefixes do not reach the value head's decoder-only forward")
    actor = method.ppo.actor_zero
    if method.stage == "ppo" and actor not in (None, cfg.zero.name):
        raise ConfigError(f"method.ppo.actor_zero={actor}: the actor is the job's trained model and uses the "
                          f"job's zero={cfg.zero.name}; set zero={actor} instead (and leave actor_zero=null)")
    for role in ("critic", "reference", "reward"):
        model_zero(cfg, role)  # an unknown preset name fails here, naming its key


def _at_least(value, low, key, hint=""):
    if value is None or not value >= low:  # also refuses nan
        raise ConfigError(f"{key}={value} must be at least {low}{hint}")


def _within(value, low, high, key, hint="", high_open=True):
    inside = low <= value < high if high_open else low <= value <= high
    if not inside:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{key}={value} must be in [{low}, {high}{bracket}{hint}")


def _model_numbers(cfg: DictConfig) -> None:
    model = cfg.model
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                "max_positions"):
        _at_least(model[key], 1, f"model.{key}", f" (model={model.name})")


def _optimizer(cfg: DictConfig) -> None:
    """Learning rates, schedule and regularisation: nan, negative or zero where it means nothing."""
    method = cfg.method
    if method.stage == "eval":
        return  # nothing trains
    if not (math.isfinite(method.lr) and method.lr > 0):
        raise ConfigError(f"method.lr={method.lr} must be a positive number (e.g. method.lr=1e-5)")
    _within(method.min_lr_ratio, 0, 1, "method.min_lr_ratio", " (the final lr as a share of method.lr)",
            high_open=False)
    if method.warmup_steps is not None:  # null: warmup_ratio of the run's steps
        _at_least(method.warmup_steps, 0, "method.warmup_steps", " (0 = no warmup)")
    if method.warmup_ratio is not None:
        _within(method.warmup_ratio, 0, 1, "method.warmup_ratio", " (a share of the run's optimizer steps)",
                high_open=False)
    _at_least(method.weight_decay, 0, "method.weight_decay", " (0 = none)")
    _at_least(method.grad_clip, 0, "method.grad_clip", " (0 = no clipping)")
    for key in ("adam_beta1", "adam_beta2"):
        _within(method[key], 0, 1, f"method.{key}")
    if method.stage == "ppo" and not (math.isfinite(method.ppo.critic_lr) and method.ppo.critic_lr > 0):
        raise ConfigError(f"method.ppo.critic_lr={method.ppo.critic_lr} must be a positive number")


def _loop(cfg: DictConfig) -> None:
    """train.*: what would divide by zero, train nothing or delete every checkpoint in the workers."""
    train = cfg.train
    if train.max_steps == 0 or train.max_steps < -1:
        raise ConfigError(f"train.max_steps={train.max_steps} trains nothing: give a positive number of steps, "
                          "or -1 for method.epochs x the steps of one epoch")
    _at_least(train.log_every, 1, "train.log_every", " (log every N steps)")
    _at_least(train.save_every, 0, "train.save_every", " (0 = save only at the end and on stop signals)")
    _at_least(train.eval_every, 0, "train.eval_every", " (0 = no periodic eval)")
    _at_least(train.eval_batches, 1, "train.eval_batches")
    _at_least(train.keep_last, 0, "train.keep_last", " (the number of recent checkpoints kept)")
    _at_least(train.min_free_disk_gb, 0, "train.min_free_disk_gb")


def _hardware(cfg: DictConfig) -> None:
    hw = cfg.hw
    if not 1 <= hw.nodes <= MAX_NODES:
        raise ConfigError(f"hw.nodes={hw.nodes} must be between 1 and {MAX_NODES}")
    if not 1 <= hw.gpus_per_node <= MAX_PROCESSES_PER_NODE:
        raise ConfigError(f"hw.gpus_per_node={hw.gpus_per_node} must be between 1 and {MAX_PROCESSES_PER_NODE} "
                          "(processes per node)")
    for key in ("gpu_mem_gb", "cpus_per_node", "ram_gb_per_node"):
        if not hw[key] > 0:
            raise ConfigError(f"hw.{key}={hw[key]} must be positive (hw={hw.name})")


def _cluster(cfg: DictConfig) -> None:
    """Values that reach the Slurm job: each wrong one is read by Slurm as something else."""
    cluster = cfg.cluster
    if cluster.time_limit_min < 1:
        raise ConfigError(f"cluster.time_limit_min={cluster.time_limit_min} must be at least 1 minute "
                          "(Slurm reads --time=0 as no limit at all)")
    if not 1 <= cluster.signal_before_min < cluster.time_limit_min:
        raise ConfigError(
            f"cluster.signal_before_min={cluster.signal_before_min} must be at least 1 and below "
            f"cluster.time_limit_min={cluster.time_limit_min}: the job checkpoints that many minutes before its limit")
    if cluster.mem_gb == 0:
        raise ConfigError("cluster.mem_gb=0 would render --mem=0, which Slurm reads as all of each node's memory: "
                          "give the GB per node, or leave cluster.mem_gb=null for hw.ram_gb_per_node minus headroom")
    if cluster.mem_gb is not None and not cluster.mem_gb >= 1:
        raise ConfigError(f"cluster.mem_gb={cluster.mem_gb} must be at least 1 (whole GB per node, --mem=<N>G), "
                          "or null for hw.ram_gb_per_node minus headroom")
    if cluster.cpus_per_task is not None:
        _at_least(cluster.cpus_per_task, 1, "cluster.cpus_per_task", " (or null for cpus_per_node / gpus_per_node)")
    _at_least(cluster.max_requeue, 0, "cluster.max_requeue")
    _at_least(cluster.array_parallelism, 1, "cluster.array_parallelism")
    highest = 65535 - SLURM_PORT_SPAN
    if not 1024 <= cluster.port_base <= highest:
        raise ConfigError(f"cluster.port_base={cluster.port_base} must be between 1024 and {highest}: the master "
                          f"port is cluster.port_base + job id % {SLURM_PORT_SPAN} and must be a valid, "
                          "unprivileged port")


def _data(cfg: DictConfig) -> None:
    data = cfg.data
    if cfg.method.stage != "eval" and data.train is None:
        raise ConfigError(f"data.train is not set: method={cfg.method.name} needs {cfg.method.data_kind} data, "
                          "a jsonl file/directory or a memmap_gen output")
    _within(data.eval_fraction, 0, 1, "data.eval_fraction", " (the share of data.train held out for eval)")
    _within(data.pretrain_ratio, 0, 1, "data.pretrain_ratio",
            " (the share of micro batches drawn from data.pretrain; e.g. 0.25)")
    if data.pretrain_ratio > 0:
        if cfg.method.stage != "lm":
            raise ConfigError(f"data.pretrain_ratio={data.pretrain_ratio} mixes pretraining text into pretrain/SFT "
                              f"stages only, not method={cfg.method.name}: set data.pretrain_ratio=0"
                              + (" (PPO mixes it in with method.ppo.ptx_coef)" if cfg.method.stage == "ppo" else ""))
        if data.pretrain is None:
            raise ConfigError(f"data.pretrain_ratio={data.pretrain_ratio} needs data.pretrain (pretraining text to "
                              "mix in): set data.pretrain=PATH or data.pretrain_ratio=0")


def _ppo(cfg: DictConfig, dp: int, grad_accum: int) -> None:
    """PPO's sizes: a rollout must split evenly over the ranks and into whole optimizer steps."""
    method = cfg.method
    if method.stage != "ppo":
        return
    ppo, m = method.ppo, method.micro_batch_size
    for key in ("ppo_epochs", "rollout_batch_size", "max_new_tokens"):
        _at_least(ppo[key], 1, f"method.ppo.{key}")
    for key in ("kl_coef", "ptx_coef", "top_k"):
        _at_least(ppo[key], 0, f"method.ppo.{key}")
    if not ppo.temperature > 0:
        raise ConfigError(f"method.ppo.temperature={ppo.temperature} must be positive")
    for key in ("gamma", "lam"):
        _within(ppo[key], 0, 1, f"method.ppo.{key}", high_open=False)
    if ppo.rollout_batch_size % (dp * m):
        raise ConfigError(f"method.ppo.rollout_batch_size={ppo.rollout_batch_size} is not divisible by "
                          f"method.micro_batch_size={m} x data-parallel size {dp}: set it to a multiple of {dp * m}")
    micro_per_rollout = ppo.ppo_epochs * (ppo.rollout_batch_size // (dp * m))
    if micro_per_rollout % grad_accum:
        raise ConfigError(
            f"a rollout gives method.ppo.ppo_epochs={ppo.ppo_epochs} x {micro_per_rollout // ppo.ppo_epochs} micro "
            f"batches per rank, not a whole number of optimizer steps of {grad_accum} micro batches: make "
            "ppo_epochs x rollout_batch_size a multiple of method.global_batch_size")
    if ppo.ptx_coef > 0 and cfg.data.pretrain is None:
        raise ConfigError(f"method.ppo.ptx_coef={ppo.ptx_coef} needs data.pretrain (text for the pretraining loss): "
                          "set data.pretrain=PATH or method.ppo.ptx_coef=0")


def _evaluation(cfg: DictConfig) -> None:
    if cfg.method.stage != "eval":
        return
    _at_least(cfg.eval.batch_size, 1, "eval.batch_size")
    _at_least(cfg.eval.shots, 0, "eval.shots", " (0 = zero-shot)")
    if cfg.eval.benchmark == "perplexity" and cfg.data.eval is None and cfg.data.train is None:
        raise ConfigError("eval.benchmark=perplexity needs data.eval or data.train: a memmap_gen output or jsonl")


def _produced_later(path: Path) -> bool:
    """``RUN/final[/...]`` of a prepared hpcllm run that has not exported yet: an earlier pipeline stage's
    output, written before this stage starts (its job waits for that one)."""
    for parent in path.parents:
        if (parent / "config.yaml").is_file() and (parent / "job.sbatch").is_file():
            final = parent / "final"
            return (path == final or final in path.parents) and not final.exists()
    return False


def _model_files(path: str, key: str, wanted: tuple[str, ...], what: str) -> None:
    """A local directory must hold a model; anything that is neither a directory nor a hub id is a typo."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not any((local / name).is_file() for name in wanted):
            raise ConfigError(f"{key}={path} holds no {what} (no {' or '.join(wanted)}): give the directory that "
                              "save_pretrained wrote (e.g. a run's final/)")
    elif local.exists():
        raise ConfigError(f"{key}={path} is a file: give the directory that holds the {what}")
    elif not _produced_later(local.absolute()) and (not HUB_ID.match(path) or local.is_absolute() or
                                                    path.startswith(".")):
        raise ConfigError(f"{key}={path} does not exist: give a local Hugging Face directory (with {wanted[0]}) "
                          "or a hub id such as org/name")


def _paths(cfg: DictConfig) -> None:
    """Model and tokenizer locations, checked before anything is prepared or queued."""
    model = cfg.model
    if model.path:
        _model_files(model.path, "model.path", ("config.json", "adapter_config.json"), "model")
    if model.tokenizer and model.tokenizer != "demo":
        _model_files(model.tokenizer, "model.tokenizer", ("tokenizer_config.json", "tokenizer.json",
                                                            "tokenizer.model", "vocab.json"), "tokenizer")


def derive(cfg: DictConfig) -> Derived:
    """Validate a composed job and compute the numbers every later step uses."""
    hw = cfg.hw
    _hardware(cfg)
    parallel = max(1, cfg.train.tensor_parallel) * max(1, cfg.train.pipeline_parallel)
    apply_recipe(cfg, max(1, hw.nodes * hw.gpus_per_node // parallel))  # before any check reads method.*
    _model_numbers(cfg)
    _compatibility(cfg)
    _alignment(cfg)
    _optimizer(cfg)
    _loop(cfg)
    _cluster(cfg)
    _data(cfg)
    _evaluation(cfg)
    _paths(cfg)
    world = hw.nodes * hw.gpus_per_node
    model_parallel = cfg.train.tensor_parallel * cfg.train.pipeline_parallel
    if world % model_parallel:
        raise ConfigError(
            f"world size {world} (hw.nodes x hw.gpus_per_node) is not divisible by "
            f"train.tensor_parallel x train.pipeline_parallel = {model_parallel}")
    dp = world // model_parallel
    global_batch = _batch(cfg, dp)
    grad_accum = global_batch // (cfg.method.micro_batch_size * dp)
    _ppo(cfg, dp, grad_accum)
    return Derived(
        world_size=world,
        data_parallel_size=dp,
        global_batch_size=global_batch,
        grad_accum_steps=grad_accum,
        precision=_precision(cfg),
        tasks_per_node=hw.gpus_per_node,
    )
