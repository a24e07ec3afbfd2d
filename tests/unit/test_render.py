"""Rendering: ds_config.json accepted by DeepSpeed for every ZeRO profile; job.sbatch against a golden
file, its #SBATCH lines against the config, and hostile config values that stay harmless in bash."""
import json
import os
import re
import shlex
import subprocess
import uuid
from pathlib import Path

import pytest

from hpcllm.config import compose, derive
from hpcllm.render.deepspeed import render_ds_config, render_ds_configs
from hpcllm.config import ConfigError
from hpcllm.render.slurm import python_command, render_sbatch, slurm_parameters

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


SITE = ["model=llama_7b", "method=lora", "hw=a100x8", "hw.nodes=4", "zero=stage3", "cluster=site_example",
        "hw.partition=batch", "+hw.nccl_env.NCCL_IB_HCA=mlx5", "cluster.wckey=llm"]


def site_sbatch(overrides=SITE):
    cfg = compose(overrides)
    return cfg, render_sbatch(slurm_parameters(cfg, derive(cfg), "/runs/site"), "/runs/site", python_command(cfg))


@pytest.mark.parametrize("name,render", [("llama_7b_lora_a100x8_2nodes.sbatch", golden_sbatch),
                                         ("site_container_4nodes.sbatch", site_sbatch)])
def test_sbatch_matches_golden_file(name, render):
    """Regenerate after an intended change with: UPDATE_GOLDEN=1 pytest tests/unit/test_render.py"""
    _, text = render()
    path = GOLDEN / name
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
    # A whole-node GPU job: the nodes to itself and all of their memory; no wckey unless asked for.
    assert "exclusive" in flags and flags["mem"] == "0" and "wckey" not in flags
    assert "/dev/shm" in text and "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in text
    # srun does not inherit --cpus-per-task from the allocation (Slurm >= 22.05): it is passed again.
    assert re.search(r"^srun .*--cpus-per-task=16 --cpu-bind=none python -u -m submitit\.core\._submit /runs/lora-7b/slurm$",
                     text, re.M)
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}" in text


def test_site_setup_container_and_srun_flags_render_as_asked():
    cfg, text = site_sbatch()
    setup = text.split("# setup\n")[1]
    # The site's lines run first, before hpcllm's own block.
    assert setup.startswith("# site setup (cluster.setup)\nmodule load cuda/12.4 nccl\nexport HF_HOME=/lustre/$USER/hf_cache\n"
                            "# hpcllm setup")
    srun = shlex.split(re.search(r"^srun --unbuffered .*$", text, re.M).group(0))
    for flag in ("--cpus-per-task=16", "--cpu-bind=cores", "--container-image=nvcr.io#nvidia/pytorch:24.05-py3",
                 "--container-mounts=/lustre:/lustre,/runs/site:/runs/site", "--container-workdir=/workspace",
                 "--gpu-bind=closest"):
        assert flag in srun, flag
    # Inside the container the image's python runs, not the submitting host's interpreter.
    assert srun[-5:] == ["python", "-u", "-m", "submitit.core._submit", "/runs/site/slurm"]
    assert "#SBATCH --partition=batch" in text and "#SBATCH --wckey=llm" in text
    assert "export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}" in text
    # Per-node scratch for compiled extensions, Triton, remote code and temporary files; removed at the end.
    for name in ("TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "HF_MODULES_CACHE", "TMPDIR"):
        assert re.search(rf"^export {name}=\$HPCLLM_NODE_TMP/", text, re.M), name
    assert 'rm -rf "$HPCLLM_NODE_TMP"' in text.split("# teardown")[1]


def test_the_job_ends_with_the_ranks_exit_status_after_its_clean_up(tmp_path):
    """The teardown removes the node-local scratch, but a failed srun of the ranks must still fail the
    job (Slurm's FAILED state, afterok dependencies): the script exits with the ranks' status."""
    _, text = site_sbatch(["cluster=slurm"])
    failing = 'srun() { case "$*" in *submitit*) return 3;; *rm*) echo CLEANED;; esac; }\n'
    out = _run_script(failing + text, tmp_path, "echo ENDED")
    assert out.returncode == 3 and out.stdout.index("CLEANED") < out.stdout.index("ENDED")


def test_python_follows_cluster_python(tmp_path):
    import sys

    _, text = site_sbatch(["cluster=slurm", "cluster.python=python3"])
    assert re.search(r"^srun .* python3 -u -m submitit", text, re.M)
    _, text = site_sbatch(["cluster=slurm"])
    assert f" {sys.executable} -u -m submitit" in text
    with pytest.raises(ConfigError, match="cluster.cpu_bind"):
        site_sbatch(["cluster=slurm", "cluster.cpu_bind=everything"])


def test_nodes_shared_when_asked():
    _, text = site_sbatch(["cluster=slurm", "hw=a100x8", "cluster.exclusive=false", "cluster.mem_gb=500"])
    assert "--exclusive" not in text and "#SBATCH --mem=500G" in text
    _, text = site_sbatch(["cluster=slurm"])  # CPU ranks: a share of the node
    assert "--exclusive" not in text and "#SBATCH --mem=21G" in text


def test_hostile_values_render_harmless(tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    evil = f"x$(touch {marker}); rm -rf /tmp/nothing-{uuid.uuid4().hex}; `touch {marker}`"
    run_dir = tmp_path / f"run 'dir' $(touch {marker})"
    cfg = compose(["cluster=slurm", "hw=a100x8"])
    cfg.cluster.job_name = evil
    cfg.hw.partition = f"gpu;touch {marker}"
    cfg.hw.nccl_env = {"NCCL_SOCKET_IFNAME": f"$(touch {marker})"}
    cfg.cluster.extra_sbatch = {"comment": evil}
    cfg.cluster.container_image = f"img;touch {marker}"
    cfg.cluster.container_mounts = [f"/data:/data $(touch {marker})"]
    text = render_sbatch(slurm_parameters(cfg, derive(cfg), str(run_dir)), str(run_dir), python="python")
    out = _run_script(text, tmp_path, 'echo "ENV:$NCCL_SOCKET_IFNAME|$HPCLLM_RUN_DIR"')
    assert out.returncode == 0, out.stderr
    assert not marker.exists()
    assert f"ENV:$(touch {marker})|{run_dir}" in out.stdout
    assert f"#SBATCH --job-name='{evil}'" in text


def _run_script(text: str, cwd: Path, then: str) -> subprocess.CompletedProcess:
    """Run job.sbatch through bash with Slurm's tools stubbed (srun runs nothing): the point is what
    bash makes of the rendered text itself. ``then`` runs when the script exits (it ends with `exit`)."""
    stubs = 'scontrol() { echo node1; }; srun() { :; }; export SLURM_JOB_ID=42 SLURM_JOB_NODELIST=node1 SLURM_JOB_NUM_NODES=1\n'
    trap = f"trap {shlex.quote(then)} EXIT\n"
    return subprocess.run(["bash", "-c", stubs + trap + text], capture_output=True, text=True, cwd=cwd)


def _line_breaks(marker):
    """(override path, value or {key: value}) pairs each ending a line of job.sbatch without the check."""
    run = f"touch {marker}"
    return [("cluster.job_name", f"x\n{run}"), ("hw.partition", f"gpu\r\n{run}"),
            ("cluster.account", f"llm\n{run}"), ("cluster.qos", f"high\n{run}"),
            ("cluster.extra_sbatch", {"comment": f"c\n{run}"}), ("cluster.extra_sbatch", {f"comment\n{run}\n#": "c"}),
            ("cluster.setup", [f"module load x\n{run}"]), ("cluster.srun_args", [f"--x\n{run}"]),
            ("cluster.container_image", f"img\n{run}"), ("cluster.python", f"python\n{run}"),
            ("hw.nccl_env", {"NCCL_IB_HCA": f"mlx5\n{run}"}), ("hw.nccl_env", {f"A=1; {run}; B": "1"}),
            ("hw.nccl_env", {"1NCCL": "1"}), ("run_dir", f"/runs/x\n{run}\n")]


@pytest.mark.parametrize("case", range(14))
def test_line_breaks_and_bad_names_are_refused_naming_the_key(case, tmp_path):
    """Issue 13 item 8: each of these ran `touch` when job.sbatch was executed; now it does not render."""
    marker = tmp_path / "pwned"
    key, value = _line_breaks(marker)[case]
    assert len(_line_breaks(marker)) == 14
    cfg = compose(["cluster=slurm", "hw=a100x8"])
    run_dir = str(tmp_path / "run")
    if key == "run_dir":
        run_dir = value
    else:
        group, name = key.split(".")
        cfg[group][name] = value
    with pytest.raises(ConfigError) as err:
        slurm_parameters(cfg, derive(cfg), run_dir)
    named = "hydra.run.dir" if key == "run_dir" else key
    assert named in str(err.value)
    # Without the check the same values would have run the command: prove the danger is real.
    if key == "cluster.job_name":
        text = f"#SBATCH --job-name={value}\n"
        assert _run_script(text, tmp_path, "true").returncode == 0 and marker.exists()


def test_nccl_defaults_defer_to_the_site(tmp_path):
    """hw.nccl_env renders `export X=${X:-value}`: a value the site or user exported wins."""
    cfg = compose(["cluster=slurm", "hw=a100x8"])
    cfg.hw.nccl_env = {"NCCL_SOCKET_IFNAME": "^lo,docker", "NCCL_IB_HCA": "mlx5 $(x) 'q' }"}
    text = render_sbatch(slurm_parameters(cfg, derive(cfg), str(tmp_path)), str(tmp_path), python="python")
    assert "export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-'^lo,docker'}" in text
    shown = 'echo "[$NCCL_SOCKET_IFNAME][$NCCL_IB_HCA]"'
    assert "[^lo,docker][mlx5 $(x) 'q' }]" in _run_script(text, tmp_path, shown).stdout
    site = _run_script("export NCCL_SOCKET_IFNAME=ib0\n" + text, tmp_path, shown)
    assert "[ib0][mlx5 $(x) 'q' }]" in site.stdout


def test_secrets_never_reach_rendered_files(tmp_path, monkeypatch):
    from hpcllm.launch.job import prepare

    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    job = prepare(compose(["cluster=slurm", "wandb.enabled=true", "wandb.mode=online"]), tmp_path)
    for name in ("config.yaml", "ds_config.json", "job.sbatch"):
        assert "secret-key-123" not in (job.run_dir / name).read_text()
