"""Pipelines (``conf/pipeline``): stages that each run as a job of their own in ``RUN_DIR/<stage>``,
each starting when the one before it has completed and reading its export. On Slurm a stage waits
for the one before with ``afterok``; with ``cluster=local`` the stages run one after the other."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from string import Template
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig

from hpcllm.launch.job import PreparedJob, prepare


@dataclass
class StageJob:
    name: str
    job: PreparedJob
    after: Optional[str]  # the stage this one waits for; None for the first


def _key(override: str) -> str:
    return override.split("=")[0].lstrip("+~")


def _compose(overrides: list[str]) -> DictConfig:
    """Compose inside the running Hydra app (launch.py), else from the project's conf/ (tests, tools)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if GlobalHydra.instance().is_initialized() and HydraConfig.initialized():
        from hydra import compose

        return compose(config_name=HydraConfig.get().job.config_name, overrides=overrides)
    from hpcllm.config import compose

    return compose(overrides)


def prepare_stages(job: PreparedJob, user_overrides: Optional[Sequence[str]] = None) -> list[StageJob]:
    """Compose and prepare every stage of ``job.cfg.pipeline`` in ``run_dir/<stage>``.

    A stage is the user's own overrides (launch.py's command line unless given) plus the stage's,
    which win; ``$name`` in a stage's overrides is the run directory of the earlier stage ``name``
    (e.g. ``model.path=$sft/final``)."""
    if user_overrides is None:
        from hydra.core.hydra_config import HydraConfig

        user_overrides = HydraConfig.get().overrides.task
    user = [o for o in user_overrides if not _key(o).startswith("pipeline")]
    dirs: dict[str, str] = {}
    stages: list[StageJob] = []
    for stage in job.cfg.pipeline.stages:
        run_dir = job.run_dir / stage.name
        dirs[stage.name] = str(run_dir)
        own = [Template(o).substitute(dirs) for o in stage.overrides]
        own_keys = {_key(o) for o in own}
        overrides = [o for o in user if _key(o) not in own_keys] + own
        after = stages[-1].name if stages else None
        stages.append(StageJob(stage.name, prepare(_compose(overrides), run_dir), after))
    return stages


def describe(stages: list[StageJob], cluster: str) -> list[str]:
    """Each stage's job and what it waits for (dry runs)."""
    lines = []
    for number, stage in enumerate(stages, 1):
        cfg = stage.job.cfg
        if stage.after is None:
            wait = "starts first"
        elif cluster == "slurm":
            wait = f"waits for {stage.after}: --dependency=afterok:<job id of {stage.after}>"
        else:
            wait = f"runs here once {stage.after} has completed"
        reads = [f"{key}={value}" for key, value in (("model.path", cfg.model.path),
                                                     ("method.ppo.reward_model", cfg.method.ppo.reward_model)) if value]
        lines.append(f"stage {number}/{len(stages)} {stage.name}: method={cfg.method.name} model={cfg.model.name}"
                     f"{' ' + ' '.join(reads) if reads else ''}; {wait}")
        lines.append(f"  {stage.job.run_dir / 'job.sbatch'}")
    return lines


def run_in_order(stages: list[StageJob], run_one: Callable[[PreparedJob], int]) -> int:
    """Run the stages one after the other on this machine; stop at the first that does not complete."""
    for number, stage in enumerate(stages, 1):
        print(f"hpcllm: pipeline stage {number}/{len(stages)} {stage.name}: {stage.job.run_dir}", flush=True)
        code = run_one(stage.job)
        if code:
            rest = ", ".join(s.name for s in stages[number:])
            print(f"hpcllm: pipeline stage {stage.name} ended with exit code {code}"
                  + (f"; not run: {rest}" if rest else ""), file=sys.stderr, flush=True)
            return code
    return 0
