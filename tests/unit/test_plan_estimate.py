"""hpcllm.plan.estimate/preflight on composed jobs: fit, monotonicity, remedies, estimate.json."""
import copy
import json
import math
from collections import namedtuple

import pytest

from hpcllm.config import ConfigError, compose, derive
from hpcllm.plan import PreflightRefused, capacity_line, estimate, preflight
from hpcllm.plan.estimate import ZERO_PROFILES, memory_breakdown

GLM_V100 = ["model=chatglm_6b", "method=sft", "hw=v100x8_16gb", "hw.gpus_per_node=1", "method.seq_len=512",
            "method.micro_batch_size=1"]


@pytest.fixture(scope="module")
def jobs():
    cache = {}

    def get(*overrides):
        if overrides not in cache:
            cache[overrides] = compose(list(overrides))
        return copy.deepcopy(cache[overrides])
    return get


def _gpu(cfg, zero=None, **changes):
    if zero:  # as zero=<preset> would, without composing again
        cfg.zero.stage, cfg.zero.offload_optimizer, cfg.zero.offload_param = (0, False, False) if zero == "stage0" \
            else ZERO_PROFILES[zero]
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return estimate(cfg, derive(cfg), with_remedies=False).gpu_mem_gb


def test_default_job_fits(jobs, tmp_path):
    cfg = jobs()
    est = estimate(cfg, derive(cfg), run_dir=str(tmp_path))
    assert est.fits and est.max_micro_batch_size >= cfg.method.micro_batch_size
    assert est.breakdown["context"] < 1  # no CUDA context on hw=cpu, only the process runtime


@pytest.mark.parametrize("preset", [("model=tiny_llama",), ("model=llama3_8b", "hw=a100x8", "method=lora"),
                                    ("model=chatglm_6b", "hw=v100x8", "method=ptuning")])
def test_monotonic_in_micro_batch_and_sequence(jobs, preset):
    sizes = [_gpu(jobs(*preset), method__micro_batch_size=b) for b in (1, 2, 4, 8)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    lengths = [_gpu(jobs(*preset), method__seq_len=s) for s in (64, 128, 256, 512)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


@pytest.mark.parametrize("preset", [("model=tiny_llama",), ("model=llama2_7b", "hw=a100x8"),
                                    ("model=qwen2_7b", "hw=a100x8", "method=lora"),
                                    ("model=mixtral_8x7b", "hw=a100x8", "method=dpo", "train.zero_init=false")])
def test_checkpointing_and_higher_zero_stages_never_increase(jobs, preset):
    assert _gpu(jobs(*preset), train__gradient_checkpointing=True) <= _gpu(jobs(*preset))
    for chain in (["stage0", "stage1", "stage2", "stage3"], ["stage2", "stage2_offload"], ["stage3", "stage3_offload"]):
        # With a small gradient bucket: DeepSpeed's ZeRO optimizer allocates reduce_bucket_size elements
        # whole, so with the default stages 1-2 even cost more than 0 for an adapter (a 2 GB bucket for a
        # few MB of gradients; tests/unit/test_plan_memory.py has the term).
        sizes = [_gpu(jobs(*preset), zero=z, zero__reduce_bucket_size=1000) for z in chain]
        assert sizes == sorted(sizes, reverse=True), (chain, sizes)


@pytest.mark.parametrize("method,extra", [("lora", ()), ("freeze", ()), ("ptuning", ()),
                                          ("lora", ("method.lora.r=64",))])
def test_adapters_shrink_gradients_and_optimizer_to_trainable(jobs, method, extra):
    full = jobs("model=llama2_7b", "hw=a100x8")
    adapted = jobs("model=llama2_7b", "hw=a100x8", f"method={method}", *extra)
    d = derive(adapted)
    est = estimate(adapted, d, with_remedies=False)
    gpu, _ = memory_breakdown(adapted, d, adapted.method.micro_batch_size)
    assert 0 < est.trainable_params < 0.2 * est.total_params
    # ZeRO-2, bf16: 2 + 4 bytes of gradients and 12 of Adam per trainable parameter, split over 8 ranks.
    assert gpu["optimizer"] == 12 * est.trainable_params // 8
    assert gpu["gradients"] == pytest.approx(6 * est.trainable_params / 8, abs=2)
    full_gpu, _ = memory_breakdown(full, derive(full), adapted.method.micro_batch_size)
    assert gpu["optimizer"] < full_gpu["optimizer"] and gpu["gradients"] < full_gpu["gradients"]


def test_stages_add_their_models(jobs):
    def params(*o):
        cfg = jobs("model=llama2_7b", "hw=a100x8", *o)
        return memory_breakdown(cfg, derive(cfg), 1)[0]["parameters"]
    sft, dpo = params("method=sft"), params("method=dpo")
    rollout = "method.ppo.rollout_batch_size=32"  # splits over 8 ranks x micro batch 4
    ppo = params("method=ppo", rollout, "method.ppo.reward_model=/rm")
    assert dpo == pytest.approx(2 * sft, rel=0.01)  # policy + reference
    assert ppo == pytest.approx(4 * sft, rel=0.02)  # actor, critic, reference, reward
    assert params("method=ppo", rollout) == pytest.approx(3 * sft, rel=0.02)  # the toy reward needs no model
    assert params("method=dpo", "method.dpo.precompute_reference=true") == sft


def test_each_alignment_model_is_estimated_under_its_own_profile(jobs):
    def breakdown(*o):
        cfg = jobs("model=llama2_7b", "hw=a100x8", "zero=stage2", "method=ppo", "method.ppo.reward_model=/rm",
                   "method.ppo.rollout_batch_size=32", *o)  # a rollout splits over 8 ranks x micro batch 4
        gpu, cpu = memory_breakdown(cfg, derive(cfg), 1)
        return gpu, cpu, estimate(cfg, derive(cfg))
    replicas, _, _ = breakdown()
    sharded, _, est = breakdown("method.ppo.reference_zero=stage3", "method.ppo.reward_zero=stage3_offload")
    reference = 2 * 6.74e9  # bf16 weights of a replica
    # The reference shrinks to 1/8 per GPU, the offloaded reward model leaves the GPU.
    assert replicas["parameters"] - sharded["parameters"] == pytest.approx(reference * 7 / 8 + reference, rel=0.02)
    assert any("reward: zero=stage3_offload, frozen, parameters partitioned over ranks, offloaded to CPU memory" in n
               for n in est.notes)
    _, offload_cpu, _ = breakdown("method.ppo.critic_zero=stage2_offload")
    critic_adam = 16 * 6.74e9 / 1  # fp32 master + Adam moments + gradient, offloaded (one node)
    assert offload_cpu["model_states"] >= critic_adam * 0.95


def test_oom_job_is_refused_with_concrete_remedies(jobs, tmp_path):
    cfg = jobs(*GLM_V100, "zero=stage2_offload")
    with pytest.raises(PreflightRefused) as err:
        preflight(cfg, derive(cfg), tmp_path)
    assert isinstance(err.value, ConfigError)
    message = str(err.value)
    assert "zero=stage3_offload" in message and "parameters" in message
    saved = json.loads((tmp_path / "estimate.json").read_text())
    assert saved["fits"] is False and saved["remedies"]
    # Every remedy is a real override that makes the job fit.
    for remedy in (r for r in saved["remedies"] if not r.startswith(("train.keep_last", "free "))):
        fixed = compose(GLM_V100 + ["zero=stage2_offload"] + remedy.split())
        assert estimate(fixed, derive(fixed), with_remedies=False).fits_gpu, remedy


def test_remedies_cheapest_first(jobs):
    # A global batch of 48 per rank: every micro batch up to the largest that fits divides it.
    cfg = jobs("model=llama2_7b", "hw=a100x8", "method=lora", "method.seq_len=2048", "method.micro_batch_size=16",
               "method.global_batch_size=384")
    est = estimate(cfg, derive(cfg))
    assert not est.fits
    assert est.remedies[0] == f"method.micro_batch_size={est.max_micro_batch_size}"
    assert est.remedies[1] == "train.gradient_checkpointing=true"


def test_global_batch_keeps_micro_batch_remedy_a_divisor(jobs):
    cfg = jobs("model=llama2_7b", "hw=a100x8", "method=lora", "method.seq_len=2048", "method.micro_batch_size=16",
               "method.global_batch_size=128")
    est = estimate(cfg, derive(cfg))
    mb = int(est.remedies[0].split("=")[1])
    assert mb <= est.max_micro_batch_size and 16 % mb == 0


def test_preflight_modes(jobs, tmp_path):
    cfg = jobs(*GLM_V100, "zero=stage2_offload", "preflight=warn")
    assert not preflight(cfg, derive(cfg), tmp_path / "warn").fits
    assert (tmp_path / "warn" / "estimate.json").exists()
    cfg.preflight = "off"
    assert preflight(cfg, derive(cfg), tmp_path / "off") is None
    assert not (tmp_path / "off").exists()


def test_estimate_json_fields(jobs, tmp_path, capsys):
    cfg = jobs()
    preflight(cfg, derive(cfg), tmp_path)
    assert "pre-flight estimate" in capsys.readouterr().out
    saved = json.loads((tmp_path / "estimate.json").read_text())
    for key in ("gpu_mem_gb", "fits", "cpu_mem_gb", "breakdown", "max_micro_batch_size", "step_time_s",
                "tokens_per_sec_per_gpu", "job_hours", "checkpoint_gb", "flops_per_token", "trainable_params",
                "total_params", "remedies", "time_breakdown", "bound", "link"):
        assert key in saved
    assert set(saved["breakdown"]) >= {"parameters", "gradients", "optimizer", "activations", "logits"}
    assert saved["job_hours"] is None  # no max_steps, no data size


def test_job_hours(jobs):
    cfg = jobs("train.max_steps=100")
    d = derive(cfg)
    est = estimate(cfg, d, with_remedies=False)
    assert est.steps == 100 and est.job_hours == pytest.approx(100 * est.step_time_s / 3600, rel=0.01)
    cfg.train.max_steps = -1
    est = estimate(cfg, d, num_samples=1000, with_remedies=False)
    assert est.steps == cfg.method.epochs * -(-1000 // d.global_batch_size)
    assert est.tokens_per_sec_per_gpu == pytest.approx(
        cfg.method.micro_batch_size * cfg.method.seq_len * d.grad_accum_steps / est.step_time_s, rel=0.01)


def test_step_time_from_flops_and_mfu(jobs):
    cfg = jobs("model=llama2_7b", "hw=a100x8", "method.seq_len=2048", "method.micro_batch_size=1",
               "method.global_batch_size=8")
    est = estimate(cfg, derive(cfg), with_remedies=False)
    expected = est.flops_per_token * 2048 / (312e12 * 0.4)
    assert est.time_breakdown["compute"] == pytest.approx(expected, rel=0.01)
    # ZeRO-2 over NVSwitch: the gradient reduce-scatter hides behind backward, the all-gather of the
    # updated parameters after the optimizer step does not (tests/unit/test_plan_time.py has the terms).
    assert expected < est.step_time_s < 1.1 * expected and est.bound == "compute"
    assert est.flops_per_token == pytest.approx(6 * 6.74e9, rel=0.1)


def test_full_disk_is_refused(jobs, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(10**12, 10**12, 10**6))
    cfg = jobs()
    est = estimate(cfg, derive(cfg), run_dir=str(tmp_path / "not" / "yet"))
    assert est.fits_gpu and not est.fits_disk and not est.fits
    assert "train.keep_last=1" in est.remedies


def test_cpu_oom_under_offload(jobs):
    cfg = jobs("model=llama_65b", "hw=v100x8", "zero=stage3_offload", "method.micro_batch_size=1", "method.seq_len=128",
               "train.gradient_checkpointing=true")
    est = estimate(cfg, derive(cfg), zero_init=True)
    assert est.fits_gpu and not est.fits_cpu  # 18 bytes x 65e9 x 1.5 does not fit 384 GB of RAM
    assert est.remedies == ["hw.nodes=8"]


def test_zero3_without_zero_init_pays_the_whole_model_load(jobs):
    cfg = jobs("model=llama_65b", "hw=v100x8", "zero=stage3_offload", "method.micro_batch_size=1", "method.seq_len=128",
               "train.zero_init=false")
    est = estimate(cfg, derive(cfg))
    assert not est.fits_gpu and est.breakdown["zero3_load"] > 100
    assert "train.zero_init=true" in est.remedies[-1]


def test_capacity_line_is_one_line(jobs):
    lines = []
    for mb in (1, 2, 4, 8):
        cfg = jobs(*GLM_V100, "zero=stage3_offload", f"method.micro_batch_size={mb}")
        lines.append(capacity_line(cfg, estimate(cfg, derive(cfg), with_remedies=False)))
    assert all("\n" not in line and f"mb={mb}" in line and line.endswith("-bound")
               for line, mb in zip(lines, (1, 2, 4, 8)))
    assert lines[0].startswith("fits")


def test_a_ppo_job_that_fits_once_its_frozen_models_are_partitioned_is_told_so(jobs):
    """LLaMA-2-7B PPO on 8 x A100-80GB under ZeRO-2: four resident models do not fit, and partitioning the
    frozen reference (or reward model) alone is enough, before touching the trained models' ZeRO stage."""
    job = ("model=llama2_7b", "hw=a100x8", "method=ppo", "method.ppo.reward_model=/rm", "zero=stage2",
           "method.micro_batch_size=1", "method.global_batch_size=8", "method.ppo.rollout_batch_size=8",
           "method.seq_len=64", "method.ppo.max_new_tokens=16")
    cfg = jobs(*job)
    est = estimate(cfg, derive(cfg))
    assert not est.fits_gpu
    assert est.remedies[0] == "method.ppo.reference_zero=stage3"
    assert est.remedies.index("method.ppo.reward_zero=stage3") < est.remedies.index("zero=stage3")
    fixed = jobs(*job, "method.ppo.reference_zero=stage3")
    assert estimate(fixed, derive(fixed)).fits_gpu


def test_a_slurm_job_longer_than_its_requeues_allow_is_warned(jobs):
    from hpcllm.plan.report import format_table

    def table(*o):
        cfg = jobs("cluster=slurm", "hw=cpu", "cluster.time_limit_min=60", "cluster.signal_before_min=5", *o)
        return cfg, estimate(cfg, derive(cfg))
    cfg, est = table("train.max_steps=1000000")
    runs = math.ceil(est.job_hours * 60 / 55)
    assert runs > 4
    assert (f"about {runs} runs of cluster.time_limit_min=60, but at most 4 (1 + cluster.max_requeue=3): the job "
            f"would stop unfinished; set cluster.max_requeue={runs - 1}") in format_table(cfg, est)
    cfg, est = table(f"train.max_steps={int(2.5 * 55 * 60 / est.step_time_s)}")
    assert "about 3 runs of cluster.time_limit_min=60 (requeued 2 times of at most cluster.max_requeue=3)" \
        in format_table(cfg, est)
    cfg, est = table("train.max_steps=10")
    assert "time limit" not in format_table(cfg, est)
    local = jobs("hw=cpu", "train.max_steps=1000000")
    assert "time limit" not in format_table(local, estimate(local, derive(local)))
