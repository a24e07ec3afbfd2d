"""compose -> validate -> render: everything a run directory holds before anything runs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hpcllm.config import PROJECT_ROOT, ConfigError, Derived, JobConfig, derive
from hpcllm.config.recipes import bundled_demo_data
from hpcllm.render.deepspeed import render_ds_configs
from hpcllm.render.slurm import render_sbatch, slurm_parameters


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
    _refuse_demo_data(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    for name, ds_config in render_ds_configs(cfg, derived).items():
        write_text_atomic(run_dir / name, json.dumps(ds_config, indent=2) + "\n")
    params = slurm_parameters(cfg, derived, str(run_dir))
    write_text_atomic(run_dir / "job.sbatch", render_sbatch(params, str(run_dir)))
    return PreparedJob(cfg, derived, run_dir, params)


def _refuse_demo_data(cfg: DictConfig) -> None:
    """A real model trained on the bundled demo data is almost always a forgotten data.train."""
    demo = bundled_demo_data(cfg, PROJECT_ROOT)
    if demo is None:
        return
    message = (f"model={cfg.model.name} would train on the bundled demo data ({demo}): set data.train=YOUR_DATA "
               "(a memmap dir or jsonl), or data.allow_demo_data=true to try it anyway")
    if not cfg.dry_run:
        raise ConfigError(message)
    print(f"[dry run] warning: {message}")


def load_config(run_dir: str | Path) -> DictConfig:
    """The resolved config of a run directory, checked against the schema again."""
    loaded = OmegaConf.load(Path(run_dir) / "config.yaml")
    return OmegaConf.merge(OmegaConf.structured(JobConfig), loaded)
