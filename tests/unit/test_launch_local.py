"""cluster=local: a pipeline's stages run here one after the other (and a dry run shows each stage's
job and what it waits for); a GPU preset is checked against this machine before any rank starts."""
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.config import ConfigError, compose, derive
from hpcllm.launch.job import prepare
from hpcllm.launch.machine import LocalMachine, check_local_machine, detect
from hpcllm.launch.pipeline import prepare_stages, run_in_order

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = sorted(p.stem for p in (ROOT / "conf" / "pipeline").glob("*.yaml"))


def launch(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_preset_prepares_each_stage_reading_the_one_before(tmp_path, name):
    job = prepare(compose([f"pipeline={name}"]), tmp_path)
    stages = prepare_stages(job, user_overrides=["train.max_steps=3", "pipeline.name=ignored"])
    assert [s.name for s in stages] == [s.name for s in job.cfg.pipeline.stages]
    assert [s.after for s in stages] == [None] + [s.name for s in stages[:-1]]
    for number, stage in enumerate(stages):
        assert stage.job.run_dir == tmp_path / stage.name and (stage.job.run_dir / "job.sbatch").is_file()
        assert stage.job.cfg.train.max_steps == 3  # the user's overrides reach every stage
        if number:  # a later stage starts from an earlier stage's export
            assert Path(stage.job.cfg.model.path) in {s.job.run_dir / "final" for s in stages[:number]}


def test_pipeline_stages_run_in_order_and_stop_at_the_first_failure(tmp_path, capsys):
    stages = prepare_stages(prepare(compose(["pipeline=rlhf"]), tmp_path), user_overrides=[])
    ran = []
    assert run_in_order(stages, lambda job: ran.append(job.run_dir.name) or 0) == 0
    assert ran == ["sft", "reward", "ppo"]
    ran.clear()
    assert run_in_order(stages, lambda job: ran.append(job.run_dir.name) or (1 if job.run_dir.name == "reward" else 0)) == 1
    assert ran == ["sft", "reward"]
    assert "pipeline stage reward ended with exit code 1; not run: ppo" in capsys.readouterr().err


@pytest.mark.parametrize("cluster,wait", [("slurm", "waits for sft: --dependency=afterok:<job id of sft>"),
                                          ("local", "runs here once sft has completed")])
def test_a_pipeline_dry_run_shows_every_stage_and_what_it_waits_for(tmp_path, cluster, wait):
    out = launch("pipeline=rlhf", f"cluster={cluster}", "dry_run=true", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert "pipeline rlhf: 3 stages" in out.stdout
    assert f"stage 2/3 reward: method=reward model=tiny_llama model.path={tmp_path}/sft/final; {wait}" in out.stdout
    assert (f"stage 3/3 ppo: method=ppo model=tiny_llama model.path={tmp_path}/sft/final "
            f"method.ppo.reward_model={tmp_path}/reward/final") in out.stdout
    for stage in ("sft", "reward", "ppo"):
        assert f"{tmp_path}/{stage}/job.sbatch" in out.stdout and (tmp_path / stage / "estimate.json").is_file()
    assert not (tmp_path / "sft" / "data").exists()  # a dry run prepares nothing


# -- this machine against hw ---------------------------------------------------------------------------
# The GPUs below are stand-ins (this machine has none); the last tests ask torch about the real machine.

A100 = ("NVIDIA A100-SXM4-80GB", 79.2)


def job(*overrides):
    cfg = compose(["cluster=local", *overrides])
    return cfg, derive(cfg)


@pytest.mark.parametrize("gpus,cuda,message", [
    ([], None, r"starts all 8 ranks of hw=a100x8 .* but it has no GPU that torch can use \(torch here is a CPU-only "
               r"build\): use hw=cpu .* or cluster=slurm to submit to A100-SXM4-80GB nodes"),
    ([], "12.4", r"but it has no GPU that torch can use \(torch.cuda.is_available\(\) is False\)"),
    ([A100], "12.4", r"but it has 1 GPU\(s\) \(NVIDIA A100-SXM4-80GB\): set hw.nodes=1 hw.gpus_per_node=1"),
    ([("NVIDIA A100-SXM4-40GB", 39.4)] * 8, "12.4",
     r"hw=a100x8 plans for 80 GB per GPU, but this machine's NVIDIA A100-SXM4-40GB has 39.4 GiB: "
     r"set hw.gpu_mem_gb=39"),
])
def test_a_gpu_preset_is_refused_where_the_gpus_are_missing(gpus, cuda, message):
    cfg, derived = job("hw=a100x8")
    with pytest.raises(ConfigError, match=message):
        check_local_machine(cfg, derived, LocalMachine(cpus=128, gpus=gpus, cuda_build=cuda))


def test_the_gpus_the_preset_plans_for_are_accepted_and_fewer_cpus_are_a_warning():
    cfg, derived = job("hw=a100x8")
    assert check_local_machine(cfg, derived, LocalMachine(128, [A100] * 8, "12.4")) == []
    cfg, derived = job("hw=a100x8", "hw.gpus_per_node=2")
    warnings = check_local_machine(cfg, derived, LocalMachine(16, [A100] * 2, "12.4"))
    assert len(warnings) == 1 and "hw.cpus_per_node=128 CPU cores, this machine has 16" in warnings[0]
    cfg, derived = job("hw=cpu")  # CPU ranks: no GPU asked for, nothing started to count them
    assert check_local_machine(cfg, derived, LocalMachine(cpus=2)) == []


def test_this_machine_is_asked_through_torch():
    import torch

    machine = detect(with_gpus=True)
    assert len(machine.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert machine.cpus >= 1


def test_launch_refuses_a_gpu_preset_this_machine_lacks_but_dry_runs_it(tmp_path):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 8:
        pytest.skip("this machine has the 8 GPUs of hw=a100x8")
    out = launch("hw=a100x8", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "hpcllm: cluster=local starts all 8 ranks of hw=a100x8" in out.stderr
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "logs").exists()
    dry = launch("hw=a100x8", "dry_run=true", f"hydra.run.dir={tmp_path / 'dry'}")
    assert dry.returncode == 0 and (tmp_path / "dry" / "job.sbatch").is_file()
