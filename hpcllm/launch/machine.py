"""cluster=local: does this machine have what the job's ``hw`` preset plans for?

Checked before any rank starts, so that a GPU preset on a machine without those GPUs ends in one
sentence naming the setting to change, not in a traceback on every rank. The GPUs are counted as
the ranks will see them: by torch, in a child process (so this launcher holds no CUDA context),
under the same ``CUDA_VISIBLE_DEVICES``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig

from hpcllm.config import ConfigError, Derived

# Vendors sell "80 GB" that the driver reports as 79.2 GiB: a little less still counts as the preset's GPU.
MEMORY_TOLERANCE = 0.9
_PROBE = """
import json, torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append([p.name, p.total_memory / 2**30])
print(json.dumps({"gpus": gpus, "cuda_build": torch.version.cuda}))
"""


@dataclass
class LocalMachine:
    cpus: int
    gpus: list[tuple[str, float]] = field(default_factory=list)  # (name, GiB) as torch sees them
    cuda_build: str | None = None  # torch's CUDA version; None for a CPU-only build of torch


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def detect(with_gpus: bool) -> LocalMachine:
    """This machine's CPUs and, when asked (it starts torch in a child process), its GPUs."""
    if not with_gpus:
        return LocalMachine(usable_cpus())
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise ConfigError(f"could not ask torch for this machine's GPUs: {out.stderr.strip()[-500:]}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    return LocalMachine(usable_cpus(), [(name, mem) for name, mem in found["gpus"]], found["cuda_build"])


def check_local_machine(cfg: DictConfig, derived: Derived, machine: LocalMachine | None = None) -> list[str]:
    """Refuse (ConfigError) what cannot run here; return warnings for what runs slower than planned."""
    hw = cfg.hw
    cuda = hw.accelerator == "cuda"
    machine = machine or detect(with_gpus=cuda)
    if cuda:
        _check_gpus(hw, derived.world_size, machine)
    warnings = []
    if machine.cpus < hw.cpus_per_node:
        warnings.append(f"hw={hw.name} plans for hw.cpus_per_node={hw.cpus_per_node} CPU cores, this machine has "
                        f"{machine.cpus}: data loading and CPU offload may be slower than the estimate")
    return warnings


def _check_gpus(hw: DictConfig, ranks: int, machine: LocalMachine) -> None:
    where = (f"cluster=local starts all {ranks} ranks of hw={hw.name} (hw.nodes={hw.nodes} x "
             f"hw.gpus_per_node={hw.gpus_per_node}) on this machine")
    if not machine.gpus:
        why = "torch here is a CPU-only build" if machine.cuda_build is None else "torch.cuda.is_available() is False"
        raise ConfigError(f"{where}, but it has no GPU that torch can use ({why}): use hw=cpu to train on this "
                          f"machine's CPU, or cluster=slurm to submit to {hw.gpu_name} nodes")
    if len(machine.gpus) < ranks:
        raise ConfigError(f"{where}, but it has {len(machine.gpus)} GPU(s) ({machine.gpus[0][0]}): set "
                          f"hw.nodes=1 hw.gpus_per_node={len(machine.gpus)}, or use cluster=slurm")
    name, smallest = min(machine.gpus[:ranks], key=lambda gpu: gpu[1])
    if smallest < MEMORY_TOLERANCE * hw.gpu_mem_gb:
        raise ConfigError(f"hw={hw.name} plans for {hw.gpu_mem_gb:g} GB per GPU, but this machine's {name} has "
                          f"{smallest:.1f} GiB: set hw.gpu_mem_gb={int(smallest)} (the pre-flight estimate then "
                          "checks the job against it) or pick the hw preset of these GPUs")
