"""hpcllm.plan.formulas: each term on small hand-computed cases, against real models and DeepSpeed."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from hpcllm.config import PROJECT_ROOT, compose  # noqa: E402
from hpcllm.config.schema import ModelConfig  # noqa: E402
from hpcllm.models.build import hf_config_kwargs  # noqa: E402
from hpcllm.plan import count_params  # noqa: E402
from hpcllm.plan import formulas as F  # noqa: E402

TINY = ["tiny_llama", "tiny_qwen2", "tiny_mistral", "tiny_mixtral", "tiny_bloom", "tiny_gpt2"]
BIG = ["baichuan2_7b", "bloom_7b1", "chatglm2_6b", "chatglm3_6b", "glm_10b_chinese", "llama2_13b", "llama2_7b",
       "llama3_8b", "llama_13b", "llama_33b", "llama_65b", "llama_7b", "mistral_7b", "mixtral_8x7b", "pangu_13b",
       "pangu_2.6b", "pangu_350m", "qwen2_7b"]


def _model_cfg(name):
    """The model preset over its schema (what composing model=<name> gives, without a whole job)."""
    preset = OmegaConf.load(os.path.join(PROJECT_ROOT, "conf", "model", f"{name}.yaml"))
    preset.pop("defaults")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), preset)


def _hf_model(model_cfg):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_cfg.hf_model_type, **hf_config_kwargs(model_cfg))
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def tiny_models():
    return {name: (_model_cfg(name), _hf_model(_model_cfg(name))) for name in TINY}


@pytest.mark.parametrize("name", TINY)
def test_count_params_matches_transformers_exactly(tiny_models, name):
    model_cfg, model = tiny_models[name]
    real = sum(p.numel() for p in model.parameters())  # tied tensors appear once
    assert count_params(model_cfg) == real


@pytest.mark.parametrize("name", BIG)
def test_count_params_near_published(name):
    m = _model_cfg(name)
    assert count_params(m) == pytest.approx(m.num_params, rel=0.03)


def test_count_params_explains_the_two_presets_off_their_published_counts():
    # ChatGLM-6B's "6.2B" counts the 130528 x 4096 vocabulary matrix once, but its output layer is a
    # separate matrix (tie_embeddings: false): the checkpoint holds 6.71e9 parameters.
    glm = _model_cfg("chatglm_6b")
    assert count_params(glm) == pytest.approx(6.71e9, rel=0.002)
    assert count_params(glm) - glm.vocab_size * glm.hidden_size == pytest.approx(glm.num_params, rel=0.03)
    # GLM-Large's 335M is the English model (30592-token vocabulary); the Chinese one's 50048 tokens add 20M.
    large = _model_cfg("glm_350m_chinese")
    english = count_params(large) - (large.vocab_size - 30592) * large.hidden_size
    assert english == pytest.approx(large.num_params, rel=0.01)


def test_lora_params_match_peft(tiny_models):
    from peft import LoraConfig, get_peft_model

    for name in ("tiny_llama", "tiny_mixtral", "tiny_gpt2"):
        model_cfg, _ = tiny_models[name]
        targets = list(model_cfg.lora_targets)
        model = get_peft_model(_hf_model(model_cfg), LoraConfig(r=4, target_modules=targets))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert F.lora_params(F.arch_of(model_cfg), targets, 4) == trainable, name


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_params_match_peft(tiny_models, projection):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    for name in ("tiny_llama", "tiny_gpt2"):  # GQA and MHA
        model_cfg, _ = tiny_models[name]
        config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8,
                                    prefix_projection=projection, encoder_hidden_size=64)
        model = get_peft_model(_hf_model(model_cfg), config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert F.prefix_params(F.arch_of(model_cfg), 8, projection, 64) == trainable, name


def test_freeze_trains_the_last_layers(tiny_models):
    from hpcllm.models.adapters import apply_freeze

    cfg = compose(["model=tiny_llama", "method=freeze", "method.freeze.trainable_layers=2"])
    model = apply_freeze(_hf_model(cfg.model), cfg.method, cfg.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * F.layer_params(F.arch_of(cfg.model))


def test_largest_module_matches_deepspeed(tiny_models):
    from deepspeed.runtime.zero.stage3 import model_to_params

    for name in ("tiny_llama", "tiny_mixtral", "tiny_bloom"):
        model_cfg, model = tiny_models[name]
        total, largest = model_to_params(model)
        assert F.largest_module_params(F.arch_of(model_cfg)) == largest
        assert count_params(model_cfg) == total


# --- model states against DeepSpeed's own estimators ---------------------------------------------

P = 6_738_415_616  # LLaMA-7B
LARGEST = 32000 * 4096


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_match_deepspeed(gpus, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=offload)
    ours = F.model_states(P, P, stage=2, dp=gpus * nodes, gpus_per_node=gpus, nodes=nodes, mixed=True,
                          offload_optimizer=offload)
    assert ours.gpu == pytest.approx(ds_gpu, abs=4)
    if nodes == 1:  # DeepSpeed's stage-2 CPU figure counts all ranks' offload on one node
        assert ours.cpu == pytest.approx(ds_cpu, abs=4)


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("offload_optimizer,offload_param", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_match_deepspeed(gpus, nodes, offload_optimizer, offload_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        P, LARGEST, gpus, nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_param, zero_init=True)
    ours = F.model_states(P, P, stage=3, dp=gpus * nodes, gpus_per_node=gpus, nodes=nodes, mixed=True,
                          offload_optimizer=offload_optimizer, offload_param=offload_param,
                          largest_module=LARGEST, zero_init=True)
    assert ours.gpu == pytest.approx(ds_gpu, abs=4)
    assert ours.cpu == pytest.approx(ds_cpu, abs=4)


def test_model_states_zero_paper_16_bytes_and_partitioning():
    # ZeRO paper: 2 + 2 + 12 bytes per parameter replicated; stage 1 splits the 12, stage 2 the gradients.
    n, dp = 1000, 4
    s1 = F.model_states(n, n, stage=1, dp=dp, gpus_per_node=dp, nodes=1, mixed=True)
    assert (s1.parameters, s1.gradients, s1.optimizer) == (2 * n, 2 * n + 4 * n // dp, 12 * n // dp)
    fp32 = F.model_states(n, n, stage=0, dp=1, gpus_per_node=1, nodes=1, mixed=False)
    assert (fp32.parameters, fp32.gradients, fp32.optimizer) == (4 * n, 4 * n, 8 * n)  # torch AdamW on fp32


def test_adapters_shrink_gradients_and_optimizer_to_the_trainable_parameters():
    full = F.model_states(10_000, 10_000, stage=2, dp=2, gpus_per_node=2, nodes=1, mixed=True)
    lora = F.model_states(10_000, 100, stage=2, dp=2, gpus_per_node=2, nodes=1, mixed=True)
    assert lora.parameters == full.parameters
    assert (lora.gradients, lora.optimizer) == (100 * 6 // 2, 12 * 100 // 2)


# --- activations, logits, FLOPs --------------------------------------------------------------------

def _gpt(h=1024, heads=16, seq=2048, **kw):
    return F.Arch(layers=1, hidden=h, heads=heads, kv_heads=heads, intermediate=4 * h, vocab=1000,
                  max_positions=seq, tied=True, gated=False, layernorm=True, linear_bias=True, qkv_bias=False,
                  learned_positions=1, embedding_norm=False, fused_gate_up=False, **kw)


def test_activations_reproduce_korthikanti_34_plus_5as_over_h():
    h, heads, s = 1024, 16, 2048
    per_token = F.layer_activation_bytes_per_token(_gpt(h, heads, s), s, 2, attention="eager", dropout=True,
                                                   softmax_fp32=False)
    assert per_token == 34 * h + 5 * heads * s


def test_memory_efficient_attention_drops_the_quadratic_term():
    arch = _gpt()
    eager = F.layer_activation_bytes_per_token(arch, 2048, 2, attention="eager")
    sdpa = F.layer_activation_bytes_per_token(arch, 2048, 2, attention="sdpa")
    assert eager - sdpa == arch.heads * 2048 * (4 + 2) - 4 * arch.heads


def test_gqa_and_swiglu_terms():
    llama = F.Arch(layers=1, hidden=64, heads=4, kv_heads=2, intermediate=160, vocab=100, max_positions=64,
                   tied=False, gated=True, layernorm=False, linear_bias=False, qkv_bias=False,
                   learned_positions=0, embedding_norm=False, fused_gate_up=False)
    h, kv, i, a = 64, 32, 160, 2
    # RMSNorm x2 (fp32 input + normalised), QKV input, Q, K, V (not expanded with flash), o input,
    # MLP input, SwiGLU 4 x I, flash log-sum-exp.
    expected = 2 * (4 * h + a * h) + a * h + a * (h + 2 * kv) + a * h + a * h + 4 * a * i + 4 * 4
    assert F.layer_activation_bytes_per_token(llama, 64, a, attention="flash_attention_2") == expected
    # SDPA/eager keep the K and V copies repeat_kv expands to all heads.
    assert F.layer_activation_bytes_per_token(llama, 64, a, attention="sdpa") == expected + 2 * a * (h - kv)


def test_checkpointing_keeps_layer_inputs_plus_one_layer():
    assert F.activation_bytes(1000, tokens=10, layers=4, a=2, hidden=8, checkpointing=False) == 40_000
    assert F.activation_bytes(1000, tokens=10, layers=4, a=2, hidden=8, checkpointing=True) == 10 * (4 * 16 + 1000)


def test_logits_and_kv_cache():
    assert F.logits_bytes(tokens=3, vocab=10, hidden=4, a=2) == 3 * (2 * 4 + 10 * 14)
    arch = _gpt(h=8, heads=2)
    assert F.kv_cache_bytes(arch, tokens=5, a=2) == 2 * 1 * 8 * 2 * 5


def test_flops_per_token_is_6n_plus_attention():
    arch = _gpt(h=64, heads=4)
    n = F.matmul_params(arch)
    assert F.flops_per_token(arch, 128) == pytest.approx(6 * n + 12 * 64 * 128)
    assert F.flops_per_token(arch, 128, checkpointing=True) == pytest.approx(8 * n + 16 * 64 * 128)
    assert F.flops_per_token(arch, 128, frozen_fraction=1.0) == pytest.approx(4 * n + 12 * 64 * 128)


def test_moe_counts_only_active_experts_for_flops():
    m = _model_cfg("mixtral_8x7b")
    active = F.matmul_params(F.arch_of(m))
    assert active == pytest.approx(12.9e9, rel=0.03)  # Mixtral's published ~12.9B active parameters


def test_checkpoint_bytes():
    assert F.checkpoint_bytes(100, 10, p=2) == 200 + 120
