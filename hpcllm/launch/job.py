"""compose -> validate -> render: everything a run directory holds before anything runs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hpcllm.config import PROJECT_ROOT, ConfigError, Derived, JobConfig, derive
from hpcllm.config.recipes import bundled_demo_data
from hpcllm.config.schema import FROM_PRESET_MODEL_TYPES
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
    _refuse_at_launch(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    for name, ds_config in render_ds_configs(cfg, derived).items():
        write_text_atomic(run_dir / name, json.dumps(ds_config, indent=2) + "\n")
    params = slurm_parameters(cfg, derived, str(run_dir))
    write_text_atomic(run_dir / "job.sbatch", render_sbatch(params, str(run_dir)))
    return PreparedJob(cfg, derived, run_dir, params)


def _launch_refusals(cfg: DictConfig) -> list[str]:
    """What stops a real run but not a dry run (which plans a model without its weights or data)."""
    refusals = []
    demo = bundled_demo_data(cfg, PROJECT_ROOT)
    if demo is not None:  # a real model trained on the bundled demo data: a forgotten data.train
        refusals.append(f"model={cfg.model.name} would train on the bundled demo data ({demo}): set "
                        "data.train=YOUR_DATA (a memmap dir or jsonl), or data.allow_demo_data=true to try it anyway")
    model = cfg.model
    if not model.path and model.hf_model_type not in FROM_PRESET_MODEL_TYPES:
        refusals.append(f"model={model.name} ({model.hf_model_type}) ships its own code, which hpcllm cannot "
                        "build from the preset's numbers: set model.path=DIR to its local weights and code")
    if cfg.train.tensor_parallel > 1:  # planned by the estimate only: never start and crash
        refusals.append(f"train.tensor_parallel={cfg.train.tensor_parallel}: the training loop has no tensor "
                        "parallelism, so train.tensor_parallel > 1 is planned by the pre-flight but cannot train: "
                        "set it to 1 and use train.pipeline_parallel=N (llama/qwen2/mistral) or zero=stage3 "
                        "(or stage3_offload) to split a model that does not fit one GPU")
    return refusals


def _refuse_at_launch(cfg: DictConfig) -> None:
    for message in _launch_refusals(cfg):
        if not cfg.dry_run:
            raise ConfigError(message)
        print(f"[dry run] would be refused: {message}")


def load_config(run_dir: str | Path) -> DictConfig:
    """The resolved config of a run directory, checked against the schema again."""
    loaded = OmegaConf.load(Path(run_dir) / "config.yaml")
    return OmegaConf.merge(OmegaConf.structured(JobConfig), loaded)
