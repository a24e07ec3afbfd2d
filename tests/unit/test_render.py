"""Rendering: ds_config.json accepted by DeepSpeed for every ZeRO profile; job.sbatch against a golden
file, its #SBATCH lines against the config, and hostile config values that stay harmless in bash."""
import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from hpcllm.config import compose, derive
from hpcllm.render.deepspeed import render_ds_config, render_ds_configs
from hpcllm.render.slurm import render_sbatch, slurm_parameters

GOLDEN = Path(__file__).parent / "golden"
ZERO_PROFILES = ["stage0", "stage1", "stage2", "stage3", "stage2_offload", "stage3_offload"]


class DataParallel:
    """What DeepSpeed asks of a model-parallel unit to learn the data-parallel size (no process group here)."""

    def __init__(self, size):
        self.size = size

    def get_data_parallel_world_size(self):
        return self.size


@pytest.fixture(scope="module")
def single_process_group():
    """DeepSpeedConfig asks deepspeed.comm for the rank: a one-process gloo group on this machine."""
    import deepspeed
    import torch.distributed as dist

    from hpcllm.distributed import free_port

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("zero", ZERO_PROFILES)
def test_deepspeed_accepts_the_config_of_every_zero_profile(zero, single_process_group):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = compose(["model=llama_7b", "method=lora", "hw=a100x8", "hw.nodes=2", f"zero={zero}",
                   "method.micro_batch_size=2", "method.global_batch_size=128"])
    derived = derive(cfg)
    rendered = render_ds_config(cfg, derived)
    ds = DeepSpeedConfig(json.loads(json.dumps(rendered)), mpu=DataParallel(derived.data_parallel_size))
    assert ds.zero_optimization_stage == cfg.zero.stage
    assert (ds.train_batch_size, ds.gradient_accumulation_steps) == (128, 4)
    assert ds.bfloat16_config.enabled and not ds.float16_config.enabled
    offload = ds.zero_config.offload_optimizer
    assert (offload is not None and offload.device == "cpu") == cfg.zero.offload_optimizer


@pytest.mark.parametrize("critic,reference,reward", [("stage3", "stage3_offload", "stage3"),
                                                     ("stage2_offload", "stage3", "stage1")])
def test_each_ppo_model_gets_the_deepspeed_config_of_its_profile(critic, reference, reward, single_process_group):
    """The critic trains under its own profile; frozen models get an optimizer-less ZeRO-3 config (partitioned,
    parameters offloaded with stage3_offload) or, under stages 0-2, none at all: they are replicas."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = compose(["model=llama_7b", "method=ppo", "hw=a100x8", "zero=stage2", f"method.ppo.critic_zero={critic}",
                   f"method.ppo.reference_zero={reference}", f"method.ppo.reward_zero={reward}",
                   "method.ppo.reward_model=/rm", "method.ppo.rollout_batch_size=32"])  # 8 ranks x micro batch 4
    derived = derive(cfg)
    configs = render_ds_configs(cfg, derived)
    expected = {"ds_config.json", "ds_config_critic.json", "ds_config_reference.json"} | (
        {"ds_config_reward.json"} if reward == "stage3" else set())
    assert set(configs) == expected
    parsed = {name: DeepSpeedConfig(json.loads(json.dumps(c)), mpu=DataParallel(derived.data_parallel_size))
              for name, c in configs.items()}
    assert parsed["ds_config.json"].zero_optimization_stage == 2
    assert parsed["ds_config_critic.json"].zero_optimization_stage == int(critic[5])
    assert (parsed["ds_config_critic.json"].zero_config.offload_optimizer is not None) == critic.endswith("offload")
    assert configs["ds_config_critic.json"]["optimizer"] == configs["ds_config.json"]["optimizer"]
    for role, profile in (("reference", reference), ("reward", reward)):
        if f"ds_config_{role}.json" in configs:
            frozen = configs[f"ds_config_{role}.json"]
            assert "optimizer" not in frozen and "offload_optimizer" not in frozen["zero_optimization"]
            assert parsed[f"ds_config_{role}.json"].zero_optimization_stage == 3
            offload = parsed[f"ds_config_{role}.json"].zero_config.offload_param
            assert (offload is not None and offload.device == "cpu") == (profile == "stage3_offload")


def test_fp16_on_v100_and_torch_adam_on_cpu():
    v100 = compose(["hw=v100x8"])
    assert render_ds_config(v100, derive(v100))["fp16"]["enabled"]
    cpu = compose([])
    assert render_ds_config(cpu, derive(cpu))["optimizer"]["params"]["torch_adam"] is True


def golden_sbatch():
    cfg = compose(["model=llama_7b", "method=lora", "hw=a100x8", "hw.nodes=2", "zero=stage3_offload",
                   "cluster=slurm", "cluster.account=llm", "cluster.qos=high"])
    return cfg, render_sbatch(slurm_parameters(cfg, derive(cfg), "/runs/lora-7b"), "/runs/lora-7b", python="python")


def test_sbatch_matches_golden_file():
    """Regenerate after an intended change with: UPDATE_GOLDEN=1 pytest tests/unit/test_render.py"""
    _, text = golden_sbatch()
    path = GOLDEN / "llama_7b_lora_a100x8_2nodes.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_sbatch_lines_match_the_config():
    cfg, text = golden_sbatch()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, re.M))
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "8" and flags["gpus-per-node"] == "8"
    assert flags["cpus-per-task"] == str(cfg.hw.cpus_per_node // 8)
    assert flags["time"] == str(cfg.cluster.time_limit_min) and flags["partition"] == "gpu"
    assert flags["signal"] == f"USR2@{cfg.cluster.signal_before_min * 60}"
    assert flags["account"] == "llm" and flags["qos"] == "high" and "requeue" in flags
    assert flags["job-name"] == "hpcllm" and flags["output"].startswith("/runs/lora-7b/slurm/")
    for name, value in cfg.hw.nccl_env.items():
        assert re.search(rf"^export {name}='?{re.escape(value)}'?$", text, re.M), name
    assert "/dev/shm" in text and "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in text
    assert re.search(r"^srun .*submitit\.core\._submit /runs/lora-7b/slurm$", text, re.M)


def test_hostile_values_render_harmless(tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    evil = f"x$(touch {marker}); rm -rf /tmp/nothing-{uuid.uuid4().hex}; `touch {marker}`"
    run_dir = tmp_path / f"run 'dir' $(touch {marker})"
    cfg = compose(["cluster=slurm", "hw=a100x8"])
    cfg.cluster.job_name = evil
    cfg.hw.partition = f"gpu;touch {marker}"
    cfg.hw.nccl_env = {"NCCL_SOCKET_IFNAME": f"$(touch {marker})"}
    text = render_sbatch(slurm_parameters(cfg, derive(cfg), str(run_dir)), str(run_dir))
    preamble = text.split("# command")[0]
    # Slurm's tools are stubbed: the point is what bash makes of the rendered text itself.
    stubs = 'scontrol() { echo node1; }; srun() { :; }; export SLURM_JOB_ID=42 SLURM_JOB_NODELIST=node1 SLURM_JOB_NUM_NODES=1\n'
    out = subprocess.run(["bash", "-c", stubs + preamble + '\necho "ENV:$NCCL_SOCKET_IFNAME|$HPCLLM_RUN_DIR"'],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not marker.exists()
    assert f"ENV:$(touch {marker})|{run_dir}" in out.stdout
    assert f"#SBATCH --job-name='{evil}'" in text


def test_secrets_never_reach_rendered_files(tmp_path, monkeypatch):
    from hpcllm.launch.job import prepare

    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    job = prepare(compose(["cluster=slurm", "wandb.enabled=true", "wandb.mode=online"]), tmp_path)
    for name in ("config.yaml", "ds_config.json", "job.sbatch"):
        assert "secret-key-123" not in (job.run_dir / name).read_text()
