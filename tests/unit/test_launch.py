"""launch.py as users call it: dry runs of the README commands, sweeps into N run directories,
refusals with the key to change. (Dry runs only: the real runs are in tests/e2e and tests/slurm.)"""
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def launch(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_readme_dry_runs_render_every_file(tmp_path):
    for name, args in {
        "pangu": ["model=pangu_2.6b", "method=sft", "hw=a100x8"],
        "llama": ["model=llama_7b", "method=lora", "hw=a100x8", "hw.nodes=2", "zero=stage3_offload"],
    }.items():
        run_dir = tmp_path / name
        out = launch(*args, "dry_run=true", f"hydra.run.dir={run_dir}")
        assert out.returncode == 0, out.stderr
        for file in ("config.yaml", "ds_config.json", "job.sbatch", "estimate.json"):
            assert (run_dir / file).is_file(), file
            assert str(run_dir / file) in out.stdout
        assert not (run_dir / "data").exists()  # a dry run prepares nothing
    config = yaml.safe_load((tmp_path / "llama" / "config.yaml").read_text())
    assert config["hw"]["nodes"] == 2 and config["zero"]["name"] == "stage3_offload"
    assert "#SBATCH --nodes=2" in (tmp_path / "llama" / "job.sbatch").read_text()


def test_sweeps_render_one_job_per_point(tmp_path):
    out = launch("-m", "method=lora", "method.lora.r=8,16,64", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'r'}")
    assert out.returncode == 0, out.stderr
    ranks = sorted(yaml.safe_load((d / "config.yaml").read_text())["method"]["lora"]["r"]
                   for d in (tmp_path / "r").iterdir() if (d / "job.sbatch").is_file())
    assert ranks == [8, 16, 64]
    out = launch("-m", "model=llama_7b", "hw=a100x8", "zero=stage2,stage3", "dry_run=true",
                 f"hydra.sweep.dir={tmp_path / 'z'}")
    assert out.returncode == 0, out.stderr
    stages = sorted(json.loads((d / "ds_config.json").read_text())["zero_optimization"]["stage"]
                    for d in (tmp_path / "z").iterdir() if d.is_dir() and (d / "ds_config.json").is_file())
    assert stages == [2, 3]
    capacity = re.findall(r"^\s+\d+\s+(?:fits|OOM|DISK|CPU).*zero=stage\d", out.stdout, re.M)
    assert len(capacity) == 2  # one capacity line per point, also for points that would be refused


def test_bad_batch_fails_before_anything_runs(tmp_path):
    out = launch("hw=a100x8", "method.global_batch_size=100", "dry_run=true", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert "method.global_batch_size=100" in out.stderr and "multiple of 16" in out.stderr


def test_preflight_refuses_an_oom_with_remedies(tmp_path):
    """ChatGLM-6B full fine-tuning on one 16 GB V100 with ZeRO-2 offload: OOM (published)."""
    args = ["model=chatglm_6b", "hw=v100x8_16gb", "hw.gpus_per_node=1", "zero=stage2_offload", "method=sft",
            "method.micro_batch_size=1", "method.seq_len=512", f"hydra.run.dir={tmp_path}"]
    out = launch(*args)  # a real run: refused before anything starts
    assert out.returncode != 0 and "predicted not to fit" in out.stderr
    assert "zero=stage3" in out.stderr or "hw.nodes=" in out.stderr
    estimate = json.loads((tmp_path / "estimate.json").read_text())
    assert estimate["fits"] is False and estimate["gpu_mem_gb"] > 16
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics.jsonl").exists()
    dry = launch(*args, "dry_run=true")  # a dry run says so and still shows what it rendered
    assert dry.returncode == 0 and "would be refused" in dry.stdout and "job.sbatch" in dry.stdout
