"""Validation across groups and the numbers derived from a composed job.

Each check raises ``ConfigError`` whose message names the override to change and how.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from omegaconf import DictConfig

METHODS = ("pretrain", "sft", "lora", "freeze", "ptuning", "reward", "ppo", "dpo", "eval")
STAGES = ("lm", "reward", "dpo", "ppo", "eval")
ADAPTERS = ("none", "lora", "freeze", "ptuning")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class ConfigError(ValueError):
    """A composed job that cannot run as configured."""


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
    _one_of(method.name, METHODS, "method.name")
    _one_of(method.stage, STAGES, "method.stage")
    _one_of(method.adapter, ADAPTERS, "method.adapter")
    _one_of(cfg.preflight, ("refuse", "warn", "off"), "preflight")
    _one_of(cfg.cluster.name, ("local", "slurm"), "cluster")
    _one_of(method.schedule, ("cosine", "linear", "constant"), "method.schedule")
    _one_of(method.dpo.loss, ("sigmoid", "ipo", "hinge"), "method.dpo.loss")
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
            f"model={model.name}: lower method.seq_len")
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


def derive(cfg: DictConfig) -> Derived:
    """Validate a composed job and compute the numbers every later step uses."""
    hw = cfg.hw
    if hw.nodes < 1 or hw.gpus_per_node < 1:
        raise ConfigError(f"hw.nodes={hw.nodes} and hw.gpus_per_node={hw.gpus_per_node} must be at least 1")
    _compatibility(cfg)
    _alignment(cfg)
    world = hw.nodes * hw.gpus_per_node
    model_parallel = cfg.train.tensor_parallel * cfg.train.pipeline_parallel
    if world % model_parallel:
        raise ConfigError(
            f"world size {world} (hw.nodes x hw.gpus_per_node) is not divisible by "
            f"train.tensor_parallel x train.pipeline_parallel = {model_parallel}")
    dp = world // model_parallel
    global_batch = _batch(cfg, dp)
    return Derived(
        world_size=world,
        data_parallel_size=dp,
        global_batch_size=global_batch,
        grad_accum_steps=global_batch // (cfg.method.micro_batch_size * dp),
        precision=_precision(cfg),
        tasks_per_node=hw.gpus_per_node,
    )
