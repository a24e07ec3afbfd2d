"""config -> Slurm job text (pure).

submitit writes and submits the sbatch file itself (it needs to, for pickling and requeue), so
hpcllm renders only its own part - the #SBATCH parameters, the setup block (the site's
``cluster.setup`` lines, then ``slurm_templates/setup.sh``) and the srun arguments - and produces
the text with submitit's own renderer. ``job.sbatch`` from a dry run is therefore byte for byte
what a submission sends.

Every config value that reaches the script is checked here first: a newline in a value would end
its line of ``job.sbatch`` and run the rest as a command, and environment names are rendered
unquoted, so they must be identifiers.
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from string import Template

from omegaconf import DictConfig

from hpcllm.config import ConfigError, Derived
from hpcllm.config import PROJECT_ROOT

TEMPLATE = Path(PROJECT_ROOT) / "slurm_templates" / "setup.sh"
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SBATCH_OPTION = re.compile(r"[a-z][a-z0-9-]*")
# srun --cpu-bind: a keyword, or a map/mask of CPUs or NUMA domains (one entry per local rank).
CPU_BIND = re.compile(r"none|cores|sockets|threads|ldoms|rank|(map|mask)_(cpu|ldom):[0-9a-fA-Fx,*]+")


def check_value(key: str, value) -> None:
    """Refuse a value that would break out of its line of job.sbatch."""
    if value is not None and CONTROL_CHARACTER.search(str(value)):
        raise ConfigError(f"{key}={str(value)!r} contains a control character (newline, tab, ...): job.sbatch "
                          f"would run what follows it as a command; remove it from {key}")


def _check_env(group: str, env: dict) -> None:
    for name, value in env.items():
        if not ENV_NAME.fullmatch(str(name)):
            raise ConfigError(f"{group}.{name!r} is not an environment variable name (letters, digits and "
                              f"_, not starting with a digit): fix the key in {group}")
        check_value(f"{group}.{name}", value)


def check_rendered_values(cfg: DictConfig, run_dir: str) -> None:
    """Every config value that job.sbatch carries, named by its override path."""
    hw, cluster = cfg.hw, cfg.cluster
    check_value("hydra.run.dir", run_dir)
    for key in ("job_name", "account", "qos", "constraint", "wckey", "python", "container_image",
                "container_workdir"):
        check_value(f"cluster.{key}", cluster[key])
    check_value("hw.partition", hw.partition)
    for group in ("setup", "container_mounts", "srun_args"):
        for index, value in enumerate(cluster[group]):
            check_value(f"cluster.{group}[{index}]", value)
    for option, value in cluster.extra_sbatch.items():
        if not SBATCH_OPTION.fullmatch(str(option)):
            raise ConfigError(f"cluster.extra_sbatch.{option!r} is not an sbatch option name (e.g. mail-type): "
                              "fix the key in cluster.extra_sbatch")
        check_value(f"cluster.extra_sbatch.{option}", value)
    _check_env("hw.nccl_env", dict(hw.nccl_env))
    if not CPU_BIND.fullmatch(cluster.cpu_bind):
        raise ConfigError(f"cluster.cpu_bind={cluster.cpu_bind!r} is not an srun --cpu-bind type: use none, cores, "
                          "sockets, ldoms (NUMA domains), or map_cpu:/mask_cpu:/map_ldom:/mask_ldom:<one per local rank>")


def _exports(env: dict) -> str:
    return "\n".join(f"export {name}={shlex.quote(str(value))}" for name, value in sorted(env.items()))


def _defaults(env: dict) -> str:
    """`export X=${X:-value}`: the value applies only where the site or the user set none. Quotes in
    the word are removed by bash and export does not split the result, so any value stays one value."""
    return "\n".join(f"export {name}=${{{name}:-{shlex.quote(str(value))}}}" for name, value in sorted(env.items()))


def setup_lines(cfg: DictConfig, run_dir: str) -> list[str]:
    """The site's own lines (cluster.setup) first, then hpcllm's block."""
    hw = cfg.hw
    text = Template(TEMPLATE.read_text()).substitute(
        run_dir=shlex.quote(str(run_dir)),
        omp_threads=max(1, cpus_per_task(cfg)),
        accelerator_env=_exports({"DS_ACCELERATOR": "cpu"} if hw.accelerator == "cpu" else {}),
        nccl_env=_defaults(dict(hw.nccl_env)),
        port_base=int(cfg.cluster.port_base),
    )
    site = ["# site setup (cluster.setup)", *cfg.cluster.setup] if cfg.cluster.setup else []
    return site + [line for line in text.splitlines() if line.strip()]


def teardown_lines() -> list[str]:
    """Remove the node-local scratch on every node; the job still ends with the ranks' exit status
    (Slurm's FAILED or COMPLETED), not the clean-up's."""
    return ["ranks_status=$?",
            'srun --ntasks-per-node=1 --ntasks=$SLURM_JOB_NUM_NODES --overlap rm -rf "$HPCLLM_NODE_TMP" || true',
            "exit $ranks_status"]


def cpus_per_task(cfg: DictConfig) -> int:
    return cfg.cluster.cpus_per_task or max(1, cfg.hw.cpus_per_node // cfg.hw.gpus_per_node)


def whole_node(cfg: DictConfig) -> bool:
    """A GPU job with one task per GPU of the node: it should have the nodes to itself."""
    return cfg.hw.accelerator == "cuda"


def _memory(cfg: DictConfig) -> str:
    if cfg.cluster.mem_gb is not None:
        return f"{int(cfg.cluster.mem_gb)}G"
    # --mem=0 is all of each node's memory, whatever the preset guessed it to be.
    return "0" if whole_node(cfg) else f"{int(cfg.hw.ram_gb_per_node * 0.9)}G"


def srun_args(cfg: DictConfig, run_dir: str) -> list[str]:
    """Arguments of the srun that starts the ranks.

    Since Slurm 22.05 srun no longer inherits --cpus-per-task from the allocation: without it each
    rank would get one CPU under OMP_NUM_THREADS threads."""
    cluster = cfg.cluster
    args = ["--kill-on-bad-exit=1", f"--cpus-per-task={cpus_per_task(cfg)}", f"--cpu-bind={cluster.cpu_bind}"]
    if cluster.container_image:
        # pyxis/enroot, as NeMo's launcher renders them; the run directory is mounted at the same path
        # so that submitit's pickles and the logs resolve inside the container.
        mounts = [*cluster.container_mounts, f"{run_dir}:{run_dir}"]
        args += [f"--container-image={cluster.container_image}", f"--container-mounts={','.join(mounts)}"]
        if cluster.container_workdir:
            args.append(f"--container-workdir={cluster.container_workdir}")
    return args + list(cluster.srun_args)


def python_command(cfg: DictConfig) -> str:
    """The interpreter the ranks run: cluster.python; else "python" inside a container (the image's),
    else the submitting one (its absolute path must exist on the compute nodes)."""
    if cfg.cluster.python:
        return cfg.cluster.python
    return "python" if cfg.cluster.container_image else shlex.quote(sys.executable)


def slurm_parameters(cfg: DictConfig, derived: Derived, run_dir: str) -> dict:
    """Keyword arguments for ``submitit.SlurmExecutor.update_parameters`` (and the renderer)."""
    check_rendered_values(cfg, run_dir)
    hw, cluster = cfg.hw, cfg.cluster
    exclusive = whole_node(cfg) if cluster.exclusive is None else cluster.exclusive
    params = {
        "job_name": cluster.job_name,
        "nodes": hw.nodes,
        "ntasks_per_node": derived.tasks_per_node,
        "cpus_per_task": cpus_per_task(cfg),
        "time": cluster.time_limit_min,
        "signal_delay_s": cluster.signal_before_min * 60,
        "mem": _memory(cfg),
        "setup": setup_lines(cfg, run_dir),
        "teardown": teardown_lines(),
        # submitit requeues with `scontrol requeue`, which needs a requeueable job.
        "additional_parameters": {"requeue": True, **dict(cluster.extra_sbatch)},
        "srun_args": srun_args(cfg, run_dir),
        "stderr_to_stdout": True,
        "wckey": cluster.wckey,  # None: no --wckey line (submitit would write its own)
    }
    if hw.accelerator == "cuda":
        params["gpus_per_node"] = hw.gpus_per_node
    optional = {"partition": hw.partition, "account": cluster.account, "qos": cluster.qos,
                "constraint": cluster.constraint, "exclusive": True if exclusive else None}
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def submitit_folder(run_dir: str) -> Path:
    return Path(run_dir) / "slurm"


def render_sbatch(params: dict, run_dir: str, python: str) -> str:
    """The exact text submitit submits for these parameters (same command line as SlurmExecutor,
    which takes ``python`` as a command, unquoted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = submitit_folder(run_dir)
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **params)
