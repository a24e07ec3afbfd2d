"""config -> Slurm job text (pure).

submitit writes and submits the sbatch file itself (it needs to, for pickling and requeue), so
hpcllm renders only its own part - the #SBATCH parameters, the setup block from
``slurm_templates/setup.sh`` and the srun arguments - and produces the text with submitit's own
renderer. ``job.sbatch`` from a dry run is therefore byte for byte what a submission sends.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from string import Template

from omegaconf import DictConfig
from submitit.slurm.slurm import _make_sbatch_string

from hpcllm.config import Derived
from hpcllm.config import PROJECT_ROOT

TEMPLATE = Path(PROJECT_ROOT) / "slurm_templates" / "setup.sh"


def _exports(env: dict) -> str:
    return "\n".join(f"export {name}={shlex.quote(str(value))}" for name, value in sorted(env.items()))


def setup_lines(cfg: DictConfig, run_dir: str) -> list[str]:
    hw = cfg.hw
    text = Template(TEMPLATE.read_text()).substitute(
        run_dir=shlex.quote(str(run_dir)),
        omp_threads=max(1, _cpus_per_task(cfg)),
        accelerator_env=_exports({"DS_ACCELERATOR": "cpu"} if hw.accelerator == "cpu" else {}),
        nccl_env=_exports(dict(hw.nccl_env)),
        port_base=int(cfg.cluster.port_base),
    )
    return [line for line in text.splitlines() if line.strip()]


def _cpus_per_task(cfg: DictConfig) -> int:
    return cfg.cluster.cpus_per_task or max(1, cfg.hw.cpus_per_node // cfg.hw.gpus_per_node)


def slurm_parameters(cfg: DictConfig, derived: Derived, run_dir: str) -> dict:
    """Keyword arguments for ``submitit.SlurmExecutor.update_parameters`` (and the renderer)."""
    hw, cluster = cfg.hw, cfg.cluster
    mem_gb = cluster.mem_gb if cluster.mem_gb is not None else int(hw.ram_gb_per_node * 0.9)
    params = {
        "job_name": cluster.job_name,
        "nodes": hw.nodes,
        "ntasks_per_node": derived.tasks_per_node,
        "cpus_per_task": _cpus_per_task(cfg),
        "time": cluster.time_limit_min,
        "signal_delay_s": cluster.signal_before_min * 60,
        "mem": f"{int(mem_gb)}G",
        "setup": setup_lines(cfg, run_dir),
        # submitit requeues with `scontrol requeue`, which needs a requeueable job.
        "additional_parameters": {"requeue": True, **dict(cluster.extra_sbatch)},
        "srun_args": ["--kill-on-bad-exit=1", "--cpu-bind=none"],
        "stderr_to_stdout": True,
    }
    if hw.accelerator == "cuda":
        params["gpus_per_node"] = hw.gpus_per_node
    optional = {"partition": hw.partition, "account": cluster.account, "qos": cluster.qos,
                "constraint": cluster.constraint, "exclusive": True if cluster.exclusive else None}
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def submitit_folder(run_dir: str) -> Path:
    return Path(run_dir) / "slurm"


def render_sbatch(params: dict, run_dir: str, python: str | None = None) -> str:
    """The exact text submitit submits for these parameters (same command line as SlurmExecutor)."""
    folder = submitit_folder(run_dir)
    python = python or shlex.quote(sys.executable)
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **params)
