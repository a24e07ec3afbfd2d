"""compose -> validate -> render: everything a run directory holds before anything runs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hpcllm.config import Derived, JobConfig, derive
from hpcllm.render.deepspeed import render_ds_configs
from hpcllm.render.slurm import python_command, render_sbatch, slurm_parameters


@dataclass
class PreparedJob:
    cfg: DictConfig
    derived: Derived
    run_dir: Path
    slurm_params: dict


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def prepare(cfg: DictConfig, run_dir: str | Path) -> PreparedJob:
    """Validate the composed job and write config.yaml, ds_config*.json and job.sbatch into run_dir."""
    run_dir = Path(run_dir).resolve()
    cfg.run_dir = str(run_dir)
    derived = derive(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    for name, ds_config in render_ds_configs(cfg, derived).items():
        write_text_atomic(run_dir / name, json.dumps(ds_config, indent=2) + "\n")
    params = slurm_parameters(cfg, derived, str(run_dir))
    write_text_atomic(run_dir / "job.sbatch", render_sbatch(params, str(run_dir), python_command(cfg)))
    return PreparedJob(cfg, derived, run_dir, params)


def load_config(run_dir: str | Path) -> DictConfig:
    """The resolved config of a run directory, checked against the schema again."""
    loaded = OmegaConf.load(Path(run_dir) / "config.yaml")
    return OmegaConf.merge(OmegaConf.structured(JobConfig), loaded)
