"""Typed schemas for every config group.

YAML presets in ``conf/`` extend these (``defaults: [base_<group>, _self_]``), so a
misspelt key or a value of the wrong type fails at composition time with OmegaConf's
message naming the key, before anything is rendered or submitted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# hf_model_type values hpcllm builds from a preset's numbers (random weights); others need model.path.
FROM_PRESET_MODEL_TYPES = ("llama", "qwen2", "mistral", "mixtral", "bloom", "gpt2")


class Choice(str, Enum):
    """A string option of a closed list: OmegaConf refuses any other value at composition, naming
    the key and the valid values. Members equal, hash, print and serialize as their plain strings,
    so YAML, config.yaml and code comparing with "..." see no difference."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def _choices(name: str, values: str) -> type:
    return Choice(name, [(v, v) for v in values.split()], module=__name__)


Activation = _choices("Activation", "swiglu gelu")  # gelu: a plain two-matrix MLP
Position = _choices("Position", "rope alibi learned")
DpoLoss = _choices("DpoLoss", "sigmoid ipo hinge")
Adapter = _choices("Adapter", "none lora freeze ptuning")
DataKind = _choices("DataKind", "pretrain sft preference prompt")
Schedule = _choices("Schedule", "cosine linear constant")
Accelerator = _choices("Accelerator", "cuda cpu")
Interconnect = _choices("Interconnect", "ib roce ethernet none")
ClusterName = _choices("ClusterName", "local slurm")
Precision = _choices("Precision", "auto fp32 fp16 bf16")
Attention = _choices("Attention", "sdpa eager flash_attention_2")
DataMode = _choices("DataMode", "pack truncate split")
Benchmark = _choices("Benchmark", "ceval mmlu afqmc cmnli ocnli tnews iflytek csl cmrc2018 generation perplexity")
WandbMode = _choices("WandbMode", "offline online")
Preflight = _choices("Preflight", "refuse warn off")


@dataclass
class ModelConfig:
    """One model family member: published architecture numbers plus family facts."""

    name: str = MISSING
    family: str = MISSING  # llama, pangu, glm, chatglm, chatglm2, chatglm3, bloom, baichuan, baichuan2, qwen, qwen2, mistral, mixtral
    # Hugging Face model_type used to build from config (random weights) when it is native
    # to transformers; remote-code families need `path` pointing at their files.
    hf_model_type: str = MISSING
    hf_architecture: str = MISSING
    trust_remote_code: bool = False
    path: Optional[str] = None  # local Hugging Face directory or hub name; None = random weights
    tokenizer: Optional[str] = None  # path/hub name; "demo" = the bundled tiny tokenizer; None = path
    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: int = MISSING
    intermediate_size: int = MISSING
    vocab_size: int = MISSING
    max_positions: int = MISSING
    num_params: float = MISSING  # published parameter count, e.g. 6.74e9
    tie_embeddings: bool = False
    activation: Activation = Activation.swiglu  # swiglu | gelu (a plain two-matrix MLP)
    position: Position = Position.rope  # rope | alibi | learned
    num_experts: int = 0  # MoE experts per layer (0 = dense)
    experts_top_k: int = 0
    lora_targets: List[str] = field(default_factory=list)
    # Format string with {i}: the parameter-name prefix of transformer layer i (for freezing).
    layer_pattern: str = MISSING
    supports_ptuning: bool = True
    prompt_format: str = MISSING  # id in hpcllm.data.prompts
    special_tokens: Dict[str, str] = field(default_factory=dict)
    # Extra keyword arguments for the Hugging Face config when building from scratch.
    hf_config_overrides: Dict[str, Any] = field(default_factory=dict)
    # Which hyper-parameters a method gets when its method.* values are null: published (recipes for
    # the model's size, with sources) or demo (tiny test models on the bundled demo data).
    recipe: str = "published"
    # The dtype the weights are loaded in before the engine casts them: "auto" = the training dtype
    # (hpcllm's loader); "fp32" models a script that loads without torch_dtype, so each GPU holds the
    # whole model in fp32 before ZeRO-3 partitions it (the pre-flight counts and warns about that peak).
    load_dtype: str = "auto"  # auto | fp32 | fp16 | bf16


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: Optional[List[str]] = None  # None = the model family's lora_targets
    extra_trainable: List[str] = field(default_factory=list)  # modules_to_save, e.g. lm_head


@dataclass
class FreezeConfig:
    trainable_layers: int = 4  # the last N transformer layers train
    # Extra parameter-name regexes that also train (e.g. "lm_head", "norm").
    extra_trainable: List[str] = field(default_factory=list)


@dataclass
class PtuningConfig:
    num_virtual_tokens: Optional[int] = None  # null = from the recipe
    prefix_projection: bool = False
    projection_hidden_size: int = 128


@dataclass
class DpoConfig:
    beta: float = 0.1
    loss: DpoLoss = DpoLoss.sigmoid  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0
    precompute_reference: bool = False
    reference_zero: Optional[str] = None  # conf/zero preset of the frozen reference; None = the job's zero


@dataclass
class PpoConfig:
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    ppo_epochs: int = 2
    rollout_batch_size: int = 8
    max_new_tokens: Optional[int] = None  # null = from the recipe
    temperature: float = 1.0
    top_k: int = 0
    ptx_coef: float = 0.0
    critic_lr: Optional[float] = None  # null = from the recipe
    reward_model: Optional[str] = None  # exported reward model dir; None = reward from the toy target
    target_token: Optional[str] = None  # toy reward: fraction of generated tokens equal to this token
    # Per-model conf/zero preset names; None = the job's zero. The actor is the job's trained model:
    # its profile is the job's zero= (actor_zero may only repeat it).
    actor_zero: Optional[str] = None
    critic_zero: Optional[str] = None
    reference_zero: Optional[str] = None
    reward_zero: Optional[str] = None


@dataclass
class MethodConfig:
    """A training method: what trains and its hyper-parameters."""

    name: str = MISSING  # pretrain, sft, ... or a user's own preset name (any name: the stage says what runs)
    stage: str = MISSING  # lm | reward | dpo | ppo | eval: the stage module that runs it (checked against
    # the registered stages in derive(), an open list: a new stage registers itself)
    adapter: Adapter = Adapter.none  # none | lora | freeze | ptuning
    data_kind: DataKind = DataKind.sft  # pretrain | sft | preference | prompt: what memmap_gen produces
    # Hyper-parameters: null = from the recipe for the model's size (hpcllm/config/recipes.py, with sources).
    lr: Optional[float] = None
    min_lr_ratio: float = 0.1
    schedule: Schedule = Schedule.cosine  # cosine | linear | constant
    warmup_steps: Optional[int] = None  # null = warmup_ratio x the run's optimizer steps
    warmup_ratio: Optional[float] = None
    weight_decay: Optional[float] = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    epochs: Optional[int] = None
    seq_len: Optional[int] = None  # null = the recipe's length, at most model.max_positions
    micro_batch_size: Optional[int] = None
    # null = the recipe's global batch (rounded to a multiple of micro batch x data-parallel size);
    # the demo recipe has none: micro_batch_size x data-parallel size (no accumulation)
    global_batch_size: Optional[int] = None
    # Filled at composition: which value came from which recipe and source (read-only record).
    recipe_sources: Dict[str, str] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    ptuning: PtuningConfig = field(default_factory=PtuningConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    ppo: PpoConfig = field(default_factory=PpoConfig)


@dataclass
class HwConfig:
    """A hardware profile: one node type of a cluster."""

    name: str = MISSING
    accelerator: Accelerator = Accelerator.cuda  # cuda | cpu
    gpu_name: str = MISSING
    gpus_per_node: int = MISSING  # processes per node on cpu
    gpu_mem_gb: float = MISSING
    cpus_per_node: int = MISSING
    ram_gb_per_node: float = MISSING
    nodes: int = 1
    interconnect: Interconnect = Interconnect.ib  # ib | roce | ethernet | none
    partition: Optional[str] = None
    supports_bf16: bool = True
    peak_tflops_16bit: float = MISSING  # dense fp16/bf16 tensor-core peak per GPU
    peak_tflops_fp32: float = MISSING
    mfu: float = 0.4  # assumed model-FLOPs utilisation for time estimates
    nccl_env: Dict[str, str] = field(default_factory=dict)
    # Links for the communication time of the pre-flight (NCCL bus bandwidth of large collectives, as
    # nccl-tests report it, GB/s per GPU; latency per ring step in microseconds).
    intra_node_link: str = "pcie"  # nvswitch | nvlink | pcie | none: what GPUs of one node talk over
    intra_node_bw_gbs: float = 20.0
    intra_node_latency_us: float = 10.0
    # Between nodes, per node with all its NICs together; None = typical for hw.interconnect (ib: 4 x HDR
    # 200 Gb/s, roce: 4 x 100 GbE, ethernet: one 25 GbE link; see hpcllm.plan.formulas.INTERCONNECTS).
    inter_node_bw_gbs: Optional[float] = None
    inter_node_latency_us: Optional[float] = None
    host_bw_gbs: float = 12.0  # CPU <-> GPU per GPU (PCIe), for offloaded optimizer states and parameters


@dataclass
class ZeroConfig:
    name: str = MISSING
    stage: int = MISSING
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    round_robin_gradients: bool = False
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = True
    pin_memory: bool = True


@dataclass
class ClusterConfig:
    name: ClusterName = MISSING  # local | slurm
    time_limit_min: int = 60
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: Optional[bool] = None  # None = whole-node GPU jobs get the nodes to themselves (--exclusive)
    mem_gb: Optional[float] = None  # per node; None = all of it on GPU nodes (--mem=0), else 90% of hw.ram_gb_per_node
    cpus_per_task: Optional[int] = None  # None = cpus_per_node / gpus_per_node
    extra_sbatch: Dict[str, str] = field(default_factory=dict)
    signal_before_min: int = 5  # Slurm sends USR2 this long before the time limit (the loop checkpoints)
    max_requeue: int = 3
    array_parallelism: int = 16
    job_name: str = "hpcllm"
    port_base: int = 20000  # master port = port_base + job_id % 20000
    # -- the site: what a shared cluster needs beyond the #SBATCH request (README "Running on your cluster")
    # srun --cpu-bind: none | cores | sockets | ldoms (NUMA) | map_cpu:/mask_cpu:/map_ldom:/mask_ldom:<list>
    cpu_bind: str = "none"
    setup: List[str] = field(default_factory=list)  # shell lines run first: module load, venv/conda, exports
    # The ranks' interpreter; None = the submitting one ("python" inside a container), "python" = first on PATH
    python: Optional[str] = None
    container_image: Optional[str] = None  # pyxis/enroot --container-image, e.g. nvcr.io#nvidia/pytorch:24.05-py3
    container_mounts: List[str] = field(default_factory=list)  # SRC:DST[:ro]; the run directory is added
    container_workdir: Optional[str] = None
    srun_args: List[str] = field(default_factory=list)  # any other srun flag, e.g. ["--gpu-bind=closest"]
    wckey: Optional[str] = None
    test_only: bool = True  # pre-flight: `sbatch --test-only` the rendered job, refuse what the site rejects
    runs_root: Optional[str] = None  # where run directories go (a scratch filesystem); else env HPCLLM_RUNS
    # Joining the process group and every collective; a rank missing this long fails the job, named.
    dist_timeout_min: float = 10.0
    health_check: bool = False  # before the model loads: all-reduce correctness and bandwidth, written to health.json


@dataclass
class TrainConfig:
    max_steps: int = -1  # -1 = epochs x steps per epoch
    log_every: int = 1
    eval_every: int = 0  # 0 = no periodic eval
    eval_batches: int = 8
    save_every: int = 0  # 0 = only at the end and on stop signals
    keep_last: int = 2
    keep_best: bool = True
    precision: Precision = Precision.auto  # auto | fp32 | fp16 | bf16
    gradient_checkpointing: bool = False
    # ZeRO-3: build the model under deepspeed.zero.Init, partitioned as it is created, so no rank
    # ever holds the whole model. Random weights then come from rank 0's init (not the same values
    # as an unpartitioned build with the same seed).
    zero_init: bool = True
    attention: Attention = Attention.sdpa  # sdpa | eager | flash_attention_2
    # Planned by the estimate (dry runs); a real launch with tensor_parallel > 1 is refused (the loop has no TP).
    tensor_parallel: int = 1
    # Pipeline stages (DeepSpeed PipelineModule, llama/qwen2/mistral); data parallel = world / stages.
    pipeline_parallel: int = 1
    # How the pipeline's layers (embedding, each decoder layer, final norm + head) split over the stages:
    # parameters (balanced parameter counts) | uniform (equal layer counts) | type:REGEX (balance layers
    # whose class matches, e.g. type:DecoderPipe).
    pipeline_partition: str = "parameters"
    # Explicit layers per stage overriding pipeline_partition, e.g. [5, 4, 4, 4, 4, 4, 4, 5] for llama-7b's
    # 34 pipeline layers on 8 stages; must sum to num_layers + 2 (+3 with tied embeddings).
    pipeline_parts: Optional[List[int]] = None
    min_free_disk_gb: float = 1.0
    export: bool = True
    # Hang watchdog: no training step for this many minutes (a stuck collective, a stopped rank) and
    # every rank dumps its Python stacks to its log, the job exits with code 124 naming the ranks that
    # stopped progressing. Fractions are fine (0.5 = 30 s); 0 turns it off.
    hang_timeout_min: float = 30.0
    # Stop signals (Slurm's pre-limit USR2, SIGTERM, Ctrl-C) are agreed between the ranks at log steps
    # and every this many steps: each check is an all-reduce, a host sync on a GPU.
    stop_check_every: int = 10


@dataclass
class DataConfig:
    train: Optional[str] = None  # memmap dir, or jsonl file/dir prepared into the run dir first
    eval: Optional[str] = None
    pretrain: Optional[str] = None  # mixed mode: pretraining data trained beside `train`
    pretrain_ratio: float = 0.0  # fraction of each batch step's samples drawn from `pretrain`
    mode: DataMode = DataMode.pack  # pack | truncate | split, when preparing jsonl
    eval_fraction: float = 0.0  # hold out this share of `train` when no `eval` is given
    dynamic_padding: bool = True
    # A model that is not a tiny demo model refuses to train on the bundled demo data unless this is set.
    allow_demo_data: bool = False
    max_prompt_len: Optional[int] = None  # cap on a sample's prompt tokens (cut from the left, system kept)


@dataclass
class EvalConfig:
    # ceval | mmlu (multiple choice) | afqmc | cmnli | ocnli | tnews | iflytek | csl (CLUE, label-word perplexity) |
    # cmrc2018 | generation (an SFT test set; both by greedy generation, F1/EM) | perplexity
    benchmark: Benchmark = Benchmark.ceval
    data_dir: Optional[str] = None  # None = the bundled sample; generation: a jsonl file or folder
    shots: int = 5
    split: Optional[str] = None  # None = the published default: ceval val (test answers hidden), mmlu test, CLUE dev
    chat_format: bool = False
    batch_size: int = 4
    subjects: Optional[List[str]] = None
    # how an answer letter is scored: auto | space_letter (" A" one token) | bare_letter ("A") |
    # continuation (summed log-probs of all its tokens, as lm-eval); auto = the benchmark's answer as one
    # token where every letter is one, else continuation (warned, recorded in results.json/results.md)
    letter_scoring: str = "auto"
    # a k-shot prompt longer than the context: drop_shots (fewest dropped; results marked not comparable) |
    # truncate_left (cut its first tokens, as lm-eval does) | fail
    on_overflow: str = "drop_shots"
    template: str = "official"  # official (C-Eval's answer-only prompt, MMLU's) | lm_eval (its ceval-valid task)
    max_new_tokens: int = 64  # greedy generation's longest answer (cmrc2018, generation)


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: WandbMode = WandbMode.offline  # offline | online (online needs WANDB_API_KEY in the environment)
    project: str = "hpcllm"
    entity: Optional[str] = None


@dataclass
class PipelineStage:
    name: str = MISSING  # also the stage's run directory: RUN_DIR/<name>
    # launch.py overrides on top of the command line's; $name = run dir of earlier stage `name`
    overrides: List[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    """Stages submitted as Slurm jobs, each starting when the one before completed (afterok)."""
    name: str = MISSING
    stages: List[PipelineStage] = field(default_factory=list)


@dataclass
class JobConfig:
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    hw: HwConfig = MISSING
    zero: ZeroConfig = MISSING
    cluster: ClusterConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    dry_run: bool = False
    preflight: Preflight = Preflight.refuse  # refuse | warn | off
    resume: str = "auto"  # auto | never | PATH to a checkpoint
    seed: int = 1234
    wait: bool = False  # cluster=slurm: block until the job(s) end and exit non-zero if one failed
    pipeline: Optional[PipelineConfig] = None  # conf/pipeline/<name>.yaml (cluster=slurm)
    run_dir: Optional[str] = None  # filled from hydra.run.dir
    # "manual": run the layout as composed; "auto": the pre-flight ranks ZeRO stage/offload, micro batch and
    # gradient checkpointing by predicted step time among those predicted to fit, and runs the fastest.
    layout: str = "manual"  # manual | auto


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "method": MethodConfig,
    "hw": HwConfig,
    "zero": ZeroConfig,
    "cluster": ClusterConfig,
    "pipeline": PipelineConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=JobConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
