"""Memory terms beyond the model states, against hand computations: the fp32 load of a whole model
(model.load_dtype), what ZeRO-3 keeps gathered, and the activations adapters keep in a frozen base."""

import pytest

from hpcllm.config import derive
from hpcllm.plan import estimate
from hpcllm.plan import formulas as F
from hpcllm.plan.estimate import memory_breakdown

GIB = 1024 ** 3
P_LLAMA2_7B = 6_738_415_616
LARGEST_LLAMA2_7B = 32000 * 4096  # the word embedding / output projection


@pytest.fixture(scope="module")
def jobs(demo_batch_jobs):
    return demo_batch_jobs


def _breakdown(cfg):
    return memory_breakdown(cfg, derive(cfg), cfg.method.micro_batch_size)[0]


def test_fp32_load_before_zero3_partitions_sets_the_peak_and_warns(jobs):
    job = ("model=llama2_7b", "hw=a100x8_40gb", "method=sft", "zero=stage3", "train.zero_init=false",
           "train.gradient_checkpointing=true", "method.seq_len=512")
    auto = _breakdown(jobs(*job))
    fp32 = _breakdown(jobs(*job, "model.load_dtype=fp32"))
    # In bf16 the whole model (13.5 GB) passes below the training peak; in fp32 (27 GB) it is the peak: the
    # term is what the load adds above training, so the terms still sum to the peak.
    assert auto["zero3_load"] == 0 and sum(auto.values()) > 2 * P_LLAMA2_7B + F.CUDA_CONTEXT_BYTES
    assert sum(fp32.values()) == pytest.approx(4 * P_LLAMA2_7B + F.CUDA_CONTEXT_BYTES, rel=1e-6)
    # On a 24 GB card training fits, the fp32 load (25.1 GiB of weights) does not.
    fits = {}
    for dtype in ("auto", "fp32"):
        cfg = jobs(*job, "hw.gpu_mem_gb=24", f"model.load_dtype={dtype}")
        est = estimate(cfg, derive(cfg))
        fits[dtype] = est.fits_gpu
    assert fits == {"auto": True, "fp32": False}
    assert est.remedies[0] == "model.load_dtype=auto"
    assert any("model.load_dtype=fp32: every GPU holds the whole model in fp32 (25.1 GB) before it is cast and "
               "partitioned" in n for n in est.notes)
    # zero.Init builds the model partitioned whatever dtype a script would load it in.
    assert "zero3_load" not in _breakdown(jobs(*job[:-3], "zero=stage3", "model.load_dtype=fp32"))


def test_unknown_load_dtype_names_the_key(jobs):
    from hpcllm.config import ConfigError

    cfg = jobs("model.load_dtype=float32")
    with pytest.raises(ConfigError, match="model.load_dtype='float32' is not a dtype: use one of auto, fp32, fp16, bf16"):
        estimate(cfg, derive(cfg))


def test_fp32_load_without_zero3_is_counted_too(jobs):
    job = ("model=llama2_7b", "hw=a100x8_40gb", "method=lora", "zero=stage2", "method.seq_len=256",
           "method.micro_batch_size=1")
    assert "model_load" not in _breakdown(jobs(*job))
    fp32 = _breakdown(jobs(*job, "model.load_dtype=fp32"))
    assert sum(fp32.values()) == pytest.approx(4 * fp32_params(jobs(*job)) + F.CUDA_CONTEXT_BYTES, rel=1e-6)


def fp32_params(cfg):
    return estimate(cfg, derive(cfg), with_remedies=False).total_params


def test_zero3_gathered_working_set_by_hand(jobs):
    """Defaults: up to stage3_max_live_parameters (1e9, which also bounds the prefetch) gathered in bf16,
    beyond the two largest modules DeepSpeed's estimator already counts."""
    cfg = jobs("model=llama2_7b", "hw=a100x8", "method=sft", "zero=stage3")
    assert _breakdown(cfg)["gathered"] == 2 * 1_000_000_000 - 4 * LARGEST_LLAMA2_7B
    cfg.zero.stage3_max_live_parameters = 300_000_000
    assert _breakdown(cfg)["gathered"] == 2 * 300_000_000 - 4 * LARGEST_LLAMA2_7B
    # A model smaller than the limits is gathered at most whole.
    assert F.zero3_gathered_bytes(1000, p=2, max_live=10**9, largest_module=100) == 2 * 1000 - 400
    assert _breakdown(jobs("model=llama2_7b", "hw=a100x8", "method=sft", "zero=stage2"))["gathered"] == 0


@pytest.mark.parametrize("method,layers", [("ptuning", 32), ("lora", 32), ("freeze", 2)])
def test_frozen_base_keeps_activations_where_trainable_parameters_sit(jobs, method, layers):
    """Prefix key/values and LoRA adapters sit in every layer, so backward runs through all of them and
    every layer keeps its activations (eager attention scores over seq + virtual tokens included); freeze
    keeps only the trained last layers' (2 in the preset)."""
    cfg = jobs("model=llama2_7b", "hw=a100x8", f"method={method}", "train.attention=eager", "method.seq_len=1024",
               "method.micro_batch_size=1", "zero=stage0", "hw.gpus_per_node=1")
    arch = F.arch_of(cfg.model)
    kv_extra = cfg.method.ptuning.num_virtual_tokens if method == "ptuning" else 0
    per_layer = F.layer_activation_bytes_per_token(arch, 1024, 2, attention="eager", kv_extra=kv_extra)
    act = _breakdown(cfg)["activations"]
    if method == "lora":
        assert act > layers * 1024 * per_layer  # plus the adapters' own inputs and rank-r intermediates
    else:
        assert act == layers * 1024 * per_layer
    # The eager softmax over seq + virtual tokens in fp32 plus its bf16 copy: 6 bytes x heads x keys per token.
    assert per_layer > 32 * (1024 + kv_extra) * 6


def test_gradient_bucket_is_allocated_whole_by_the_zero_optimizer(jobs):
    """DeepSpeed's ZeRO optimizer allocates reduce_bucket_size elements whatever the trainable count: a
    LoRA job under ZeRO-2 pays 2 x 5e8 x 2 bytes with overlap_comm, ZeRO-3 one bucket, stage 0 only what
    its gradients fill; CPU ranks only the pages the gradients touch."""
    job = ("model=llama2_7b", "hw=a100x8", "method=lora")
    trainable = estimate(jobs(*job), derive(jobs(*job)), with_remedies=False).trainable_params
    assert _breakdown(jobs(*job, "zero=stage2"))["buckets"] == 2 * 500_000_000 * 2
    assert _breakdown(jobs(*job, "zero=stage2", "zero.overlap_comm=false"))["buckets"] == 500_000_000 * 2
    assert _breakdown(jobs(*job, "zero=stage3"))["buckets"] == 500_000_000 * 2
    assert _breakdown(jobs(*job, "zero=stage0"))["buckets"] == 2 * trainable * 2
    cpu = jobs("model=tiny_llama", "hw=cpu", "zero=stage2")
    tiny = estimate(cpu, derive(cpu), with_remedies=False).trainable_params
    assert _breakdown(cpu)["buckets"] == 2 * tiny * 4
