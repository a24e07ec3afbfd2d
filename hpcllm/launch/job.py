"""compose -> validate -> render: everything a run directory holds before anything runs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hpcllm.config import PROJECT_ROOT, ConfigError, Derived, JobConfig, derive
from hpcllm.config.recipes import bundled_demo_data
from hpcllm.config.schema import FROM_PRESET_MODEL_TYPES
from hpcllm.launch.lock import acquire
from hpcllm.launch.datasets import check_prepared_sources
from hpcllm.render.deepspeed import render_ds_configs
from hpcllm.render.slurm import python_command, render_sbatch, slurm_parameters


class RunComplete(Exception):
    """The run directory holds a finished run of this config: nothing to do, nothing touched."""


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
    check_prepared_sources(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    acquire(run_dir)  # held until this process exits; its ranks share it
    check_run_dir(cfg, run_dir)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    for name, ds_config in render_ds_configs(cfg, derived).items():
        write_text_atomic(run_dir / name, json.dumps(ds_config, indent=2) + "\n")
    params = slurm_parameters(cfg, derived, str(run_dir))
    write_text_atomic(run_dir / "job.sbatch", render_sbatch(params, str(run_dir), python_command(cfg)))
    return PreparedJob(cfg, derived, run_dir, params)


def launch_refusals(cfg: DictConfig) -> list[str]:
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


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Before anything in a run directory changes: refuse to mix an earlier run into a new one or to
    continue it with another model or data; say so when it is already complete (RunComplete)."""
    if cfg.method.stage == "eval" or not ((run_dir / "checkpoints").is_dir() or (run_dir / "final").is_dir()):
        return  # a new run directory (the checks below import torch)
    from hpcllm.launch.datasets import memmap_paths
    from hpcllm.train.checkpoint import complete_checkpoints
    from hpcllm.train.resume import check_resume, never_over

    done = complete_checkpoints(run_dir / "checkpoints")
    if not done and (run_dir / "final").is_dir():
        raise ConfigError(f"{run_dir} holds the final/ export of an earlier run but no complete checkpoint to continue "
                          f"from, so training there would overwrite it: pass another hydra.run.dir, or move "
                          f"{run_dir / 'final'} away first")
    if not done:
        return
    if cfg.resume == "never":
        raise never_over(run_dir, done[-1])
    checkpoint = done[-1] if cfg.resume == "auto" else Path(cfg.resume)
    if not (checkpoint / "state.json").is_file():
        return  # the worker names what is wrong with an explicit resume=PATH
    changes = check_resume(cfg, checkpoint, run_dir, memmap_paths(cfg, run_dir))
    if cfg.resume == "auto":
        _say_if_complete(cfg, run_dir, checkpoint, changes)


def _say_if_complete(cfg: DictConfig, run_dir: Path, checkpoint: Path, changes: dict) -> None:
    """RunComplete when the newest checkpoint is at the run's last step and final/ is there."""
    from hpcllm.train.checkpoint import read_state
    from hpcllm.train.resume import MAY_CHANGE

    state = read_state(checkpoint)
    if cfg.train.max_steps > 0:
        target = cfg.train.max_steps
    else:  # epochs: the step count the run worked out, unless the batch or epochs change it
        target = None if MAY_CHANGE & set(changes) else state.get("max_steps")
    if target is None:
        return
    if state["step"] > target:
        raise ConfigError(f"the run in {run_dir} is at step {state['step']}, past train.max_steps={target}: give "
                          f"train.max_steps > {state['step']} to continue it, or another hydra.run.dir for a new run")
    if state["step"] == target and ((run_dir / "final").is_dir() or not cfg.train.export):
        raise RunComplete(f"{run_dir} is complete: trained to step {target} ({checkpoint.name}), exported to "
                          "final/; nothing was changed. A larger train.max_steps continues it; another "
                          "hydra.run.dir starts a new run")


def load_config(run_dir: str | Path) -> DictConfig:
    """The resolved config of a run directory, checked against the schema again."""
    loaded = OmegaConf.load(Path(run_dir) / "config.yaml")
    return OmegaConf.merge(OmegaConf.structured(JobConfig), loaded)
