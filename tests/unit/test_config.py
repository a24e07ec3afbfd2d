"""Composition and validation: every preset composes, typos and bad combinations fail clearly."""
import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from hpcllm.config import ConfigError, compose, derive

CONF = Path(__file__).resolve().parents[2] / "conf"


def presets(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


REQUIRED_MODELS = {
    "pangu_350m", "pangu_2.6b", "pangu_13b", "glm_350m_chinese", "glm_10b_chinese", "chatglm_6b", "chatglm2_6b",
    "chatglm3_6b", "llama_7b", "llama_13b", "llama_33b", "llama_65b", "llama2_7b", "llama2_13b", "llama3_8b",
    "bloom_7b1", "baichuan2_7b", "qwen2_7b", "mistral_7b", "mixtral_8x7b"}


def test_required_presets_exist():
    assert REQUIRED_MODELS <= set(presets("model"))
    assert {"pretrain", "sft", "lora", "freeze", "ptuning", "reward", "ppo", "dpo", "eval"} <= set(presets("method"))
    assert {"v100x8", "v100x8_16gb", "a100x8", "a100x8_40gb", "a800x8", "h100x8", "a40x4", "t4x8", "cpu"} <= set(
        presets("hw"))
    assert {"stage0", "stage1", "stage2", "stage3", "stage2_offload", "stage3_offload"} <= set(presets("zero"))
    assert {"local", "slurm", "site_example"} == set(presets("cluster"))


def test_every_combination_composes_or_fails_clearly():
    """Every model x method x hw x zero derives, or fails with a ConfigError naming the override.

    Each preset is composed by Hydra once; combinations swap the group nodes (what Hydra's
    composition does for independent groups), so 12k combinations run in seconds."""
    plain = lambda node: OmegaConf.create(OmegaConf.to_container(node))  # noqa: E731  (3x faster to assign)
    groups = {g: {name: plain(compose([f"{g}={name}"])[g]) for name in presets(g)}
              for g in ("model", "method", "hw", "zero")}
    cfg = plain(compose([]))
    checked = failed = 0
    # Nested loops re-assign only the group that changes (assignment, not derive, dominates the time).
    for cfg.model in groups["model"].values():
        for cfg.method in groups["method"].values():
            for cfg.hw in groups["hw"].values():
                for cfg.zero in groups["zero"].values():
                    checked += 1
                    try:
                        derived = derive(cfg)
                    except ConfigError as err:
                        failed += 1
                        assert "=" in str(err), f"error should name the override to change: {err}"
                        continue
                    assert derived.world_size == cfg.hw.nodes * cfg.hw.gpus_per_node
                    per_step = cfg.method.micro_batch_size * derived.data_parallel_size
                    assert derived.global_batch_size % per_step == 0
    assert checked == len(COMBOS) and failed < checked


COMBOS = list(itertools.product(presets("model"), presets("method"), presets("hw"), presets("zero")))


def test_every_cluster_and_pipeline_preset_composes(tmp_path):
    """The groups outside the product above: each cluster preset derives, each pipeline prepares every stage."""
    from hpcllm.launch.job import prepare
    from hpcllm.launch.pipeline import prepare_stages

    for name in presets("cluster"):
        derive(compose([f"cluster={name}"]))
    for name in presets("pipeline"):
        stages = prepare_stages(prepare(compose([f"pipeline={name}"]), tmp_path / name), user_overrides=[])
        assert len(stages) >= 2 and all(stage.job.derived.world_size == 2 for stage in stages)


def test_published_numbers_for_a_few_models():
    llama = compose(["model=llama_7b"]).model
    assert (llama.num_layers, llama.hidden_size, llama.num_heads, llama.intermediate_size, llama.vocab_size) == (
        32, 4096, 32, 11008, 32000)
    glm2 = compose(["model=chatglm2_6b"]).model
    assert (glm2.num_kv_heads, glm2.vocab_size, glm2.trust_remote_code) == (2, 65024, True)
    mixtral = compose(["model=mixtral_8x7b"]).model
    assert (mixtral.num_experts, mixtral.experts_top_k) == (8, 2)


def test_typo_fails_at_composition_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["method.lr_typo=1"])
    assert "lr_typo" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["method.lora.r=abc"])
    cause = err.value.__cause__
    assert isinstance(cause, (ValidationError, ConfigKeyError)) and "lora.r" in str(cause)


def test_derived_batch_numbers():
    cfg = compose(["hw=a100x8", "hw.nodes=2", "method.micro_batch_size=4", "method.global_batch_size=256"])
    d = derive(cfg)
    assert (d.world_size, d.data_parallel_size, d.grad_accum_steps, d.precision) == (16, 16, 4, "bf16")
    auto = derive(compose(["hw=a100x8", "method.micro_batch_size=2"]))
    assert (auto.global_batch_size, auto.grad_accum_steps) == (16, 1)


def test_indivisible_global_batch_names_the_fix():
    with pytest.raises(ConfigError, match=r"method.global_batch_size=100 .* multiple of 32"):
        derive(compose(["hw=a100x8", "method.micro_batch_size=4", "method.global_batch_size=100"]))


@pytest.mark.parametrize("hw", ["v100x8", "t4x8"])
def test_no_bf16_before_ampere(hw):
    assert derive(compose([f"hw={hw}"])).precision == "fp16"
    with pytest.raises(ConfigError, match="train.precision=bf16"):
        derive(compose([f"hw={hw}", "train.precision=bf16"]))


def test_compatibility_rules():
    # ZeRO-3 with LoRA is allowed; ZeRO-2/3 with pipeline parallelism is not.
    derive(compose(["method=lora", "zero=stage3", "hw=a100x8"]))
    with pytest.raises(ConfigError, match="pipeline"):
        derive(compose(["zero=stage3", "hw=a100x8", "train.pipeline_parallel=2"]))
    with pytest.raises(ConfigError, match="train.tensor_parallel"):
        derive(compose(["model=llama_33b", "hw=a100x8", "train.tensor_parallel=8"]))  # 52 heads
    with pytest.raises(ConfigError, match="method.seq_len"):
        derive(compose(["model=llama_7b", "method.seq_len=4096"]))
    with pytest.raises(ConfigError, match="freeze.trainable_layers"):
        derive(compose(["model=tiny_llama", "method=freeze", "method.freeze.trainable_layers=9"]))
    with pytest.raises(ConfigError, match="hw=cpu"):
        derive(compose(["train.precision=bf16"]))


def test_ptuning_only_where_it_applies():
    with pytest.raises(ConfigError, match="ptuning"):
        derive(compose(["method=ptuning", "model.supports_ptuning=false"]))


def test_alignment_rules_fail_at_composition():
    with pytest.raises(ConfigError, match="method.adapter=none, lora or freeze"):
        derive(compose(["method=dpo", "method.adapter=ptuning"]))
    derive(compose(["method=ppo", "zero=stage3"]))  # every model built under zero.Init of its own profile
    derive(compose(["method=dpo", "zero=stage3", "method.adapter=lora"]))


def test_each_alignment_model_names_its_own_zero_profile():
    from hpcllm.config.profiles import extra_models

    cfg = compose(["method=ppo", "zero=stage2", "method.ppo.critic_zero=stage3", "method.ppo.reward_model=/rm",
                   "method.ppo.reference_zero=stage3_offload", "method.ppo.reward_zero=stage0"])
    derive(cfg)
    models = {role: (zero.name, zero.stage, zero.offload_param, trained)
              for role, (zero, trained) in extra_models(cfg).items()}
    assert models == {"critic": ("stage3", 3, False, True), "reference": ("stage3_offload", 3, True, False),
                      "reward": ("stage0", 0, False, False)}
    cfg = compose(["method=dpo", "zero=stage2", "method.dpo.reference_zero=stage3"])
    assert {r: z.name for r, (z, _) in extra_models(cfg).items()} == {"reference": "stage3"}
    # LoRA's reference is the adapter-disabled policy; without a reward model the reward is the toy one.
    assert set(extra_models(compose(["method=ppo", "method.adapter=lora"]))) == {"critic"}


@pytest.mark.parametrize("override,key", [("method.ppo.critic_zero=stage9", "method.ppo.critic_zero"),
                                          ("method.ppo.reward_zero=zero3", "method.ppo.reward_zero")])
def test_an_unknown_model_profile_names_its_key(override, key):
    with pytest.raises(ConfigError, match=f"{key}=.* is not a ZeRO preset: use one of .*stage3_offload"):
        derive(compose(["method=ppo", override]))


def test_the_actor_profile_is_the_jobs_zero():
    derive(compose(["method=ppo", "zero=stage2", "method.ppo.actor_zero=stage2"]))
    with pytest.raises(ConfigError, match="set zero=stage3 instead"):
        derive(compose(["method=ppo", "zero=stage2", "method.ppo.actor_zero=stage3"]))
