"""Rank, world size and rendezvous from whoever started this process - in one place.

Three starters are understood, in this order:
1. torchrun / ``deepspeed`` / hpcllm's local launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* set;
2. submitit (``SUBMITIT_EXECUTOR`` set): its ``TorchDistributedEnvironment`` reads the job;
3. a bare ``srun``: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, master = first host of the
   node list, port = port_base + job id % 20000 so jobs sharing a node never collide.
Otherwise a single process.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def slurm_port(job_id: str, port_base: int = 20000) -> int:
    return port_base + int(job_id.split("_")[0]) % 20000


def from_environment(port_base: int = 20000) -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SUBMITIT_EXECUTOR" in env:
        from submitit.helpers import TorchDistributedEnvironment

        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            env["MASTER_PORT"] = str(slurm_port(env["SLURM_JOB_ID"], port_base))
        tde = TorchDistributedEnvironment()
        return DistEnv(tde.rank, tde.local_rank, tde.world_size, tde.master_addr, tde.master_port)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        master = env.get("MASTER_ADDR") or _first_slurm_host(env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT") or slurm_port(env["SLURM_JOB_ID"], port_base))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                       master, port)
    return DistEnv(0, 0, 1, "127.0.0.1", free_port())


def export(dist: DistEnv) -> None:
    """Set the env:// variables torch.distributed and DeepSpeed read."""
    os.environ.update(
        RANK=str(dist.rank), LOCAL_RANK=str(dist.local_rank), WORLD_SIZE=str(dist.world_size),
        MASTER_ADDR=dist.master_addr, MASTER_PORT=str(dist.master_port),
    )


def init(dist: DistEnv, accelerator: str) -> None:
    """Start the process group DeepSpeed will use (gloo on CPU, NCCL on GPUs)."""
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    export(dist)
    import deepspeed
    import torch

    if accelerator == "cuda":
        torch.cuda.set_device(dist.local_rank)
    deepspeed.init_distributed(dist_backend="gloo" if accelerator == "cpu" else "nccl")


def _device():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def all_reduce(values: list, op: str = "sum") -> list[float]:
    """Reduce a few numbers across ranks in one collective (on the device the backend needs). The values
    may be Python floats or 0-d tensors still on the device: reading the result is the only host sync."""
    import torch
    import torch.distributed as tdist

    if not values:
        return []
    device = _device()
    tensor = torch.stack([torch.as_tensor(v, device=device).detach().to(torch.float64).reshape(()) for v in values])
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
    return tensor.tolist()


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def shutdown() -> None:
    """Leave the process group once every rank is done. Left to the interpreter's exit, gloo's worker
    threads can still hold work whose teardown aborts the process ("terminate called without an active
    exception", pytorch/pytorch#190489): a job that succeeded would exit with SIGABRT."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
