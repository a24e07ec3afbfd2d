"""Rank, world size and rendezvous from whoever started this process - in one place.

Three starters are understood, in this order:
1. torchrun / ``deepspeed`` / hpcllm's local launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* set;
2. submitit (``SUBMITIT_EXECUTOR`` set): its ``TorchDistributedEnvironment`` reads the job;
3. a bare ``srun``: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, master = first host of the
   node list, port = port_base + job id % 20000 so jobs sharing a node never collide.
Otherwise a single process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta


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


class JoinTimeout(RuntimeError):
    """Not every rank joined the process group within cluster.dist_timeout_min."""


def _expected_hosts() -> list[str] | None:
    """Where Slurm placed each rank (block distribution, the default), to name ranks that never joined."""
    env = os.environ
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                               text=True, check=True, timeout=30).stdout.split()
        per_node = int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])
    except (KeyError, ValueError, OSError, subprocess.SubprocessError):
        return None
    return [host for host in hosts for _ in range(per_node)]


def _store(dist: DistEnv, timeout: timedelta):
    from torch.distributed import TCPStore

    # Under torchrun its agent already serves a store at MASTER_PORT: every rank is a client of it.
    serve = dist.is_main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        return TCPStore(dist.master_addr, dist.master_port, dist.world_size, is_master=serve,
                        timeout=timeout, wait_for_workers=False)
    except Exception as err:  # a worker that cannot reach rank 0 (DistNetworkError, RuntimeError, ...)
        if dist.is_main:
            raise
        raise JoinTimeout(f"rank {dist.rank} on host {socket.gethostname()} could not reach rank 0 at "
                          f"{dist.master_addr}:{dist.master_port} within {timeout}: rank 0 did not start or "
                          f"the port is blocked ({err})") from err


def join(dist: DistEnv, timeout_min: float, record: dict):
    """Every rank announces itself (its ``record``: host, GPUs, ...) in rank 0's TCP store; rank 0 waits
    for all and gives its verdict to the others. Returns every rank's record and the store. A rank
    missing after ``timeout_min`` fails the job at once on every rank that joined, naming the ranks
    and hosts that joined and those that did not, instead of a silent hang until the time limit."""
    from torch.distributed import PrefixStore

    timeout = timedelta(minutes=timeout_min)
    # A restarted torchrun worker group meets in the same agent store: keys of this attempt only.
    store = PrefixStore(f"hpcllm{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", _store(dist, timeout))
    store.set(f"hpcllm/joined/{dist.rank}", json.dumps(record))
    keys = [f"hpcllm/joined/{rank}" for rank in range(dist.world_size)]
    verdict = _verdict(store, keys, timeout_min) if dist.is_main else _await_verdict(store, dist, timeout)
    if verdict:
        raise JoinTimeout(verdict)
    return [json.loads(store.get(key)) for key in keys], store


def _verdict(store, keys: list[str], timeout_min: float) -> str:
    """Rank 0: "" when every rank joined in time, else who did and who did not (also told to the others)."""
    try:
        store.wait(keys, timedelta(minutes=timeout_min))
        verdict = ""
    except Exception:  # torch raises DistStoreError (a RuntimeError) on timeout
        joined = {rank: json.loads(store.get(key)).get("host", "?") for rank, key in enumerate(keys)
                  if store.check([key])}
        verdict = missing_ranks(joined, len(keys), timeout_min, _expected_hosts() or [])
    store.set("hpcllm/verdict", verdict)
    if verdict:  # keep the store up until the ranks that joined have read it
        acks = [f"hpcllm/read/{rank}" for rank in range(1, len(keys)) if store.check([keys[rank]])]
        try:
            store.wait(acks, timedelta(seconds=30))
        except Exception:
            pass
    return verdict


def missing_ranks(joined: dict[int, str], world_size: int, timeout_min: float, expected: list[str]) -> str:
    """"2 of 3 ranks joined ...: joined rank 0 on node1, ...; never joined rank 2 (expected on node2)"."""
    def where(rank: int) -> str:
        return f" (expected on {expected[rank]})" if rank < len(expected) else ""

    missing = [f"rank {rank}{where(rank)}" for rank in range(world_size) if rank not in joined]
    return (f"{len(joined)} of {world_size} ranks joined within {timeout_min:g} min (cluster.dist_timeout_min): "
            f"joined {', '.join(f'rank {r} on {h}' for r, h in sorted(joined.items()))}; "
            f"never joined {', '.join(missing)}. Look at those ranks' logs: a node that cannot start Python "
            "or reach rank 0's host is the usual cause")


def _await_verdict(store, dist: DistEnv, timeout: timedelta) -> str:
    try:
        store.wait(["hpcllm/verdict"], timeout + timedelta(minutes=1))
        verdict = store.get("hpcllm/verdict").decode()
    except Exception as err:
        raise JoinTimeout(f"rank {dist.rank} on host {socket.gethostname()} heard nothing from rank 0 "
                          f"({dist.master_addr}:{dist.master_port}) within {timeout}: see rank 0's log") from err
    if verdict:
        store.set(f"hpcllm/read/{dist.rank}", "1")
    return verdict


def init(dist: DistEnv, accelerator: str, timeout_min: float = 10.0, record: dict | None = None) -> list[dict]:
    """Join (see :func:`join`), then start the process group DeepSpeed will use (gloo on CPU, NCCL
    on GPUs) on the same store, with ``timeout_min`` for every collective; returns the ranks' records."""
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    export(dist)
    import deepspeed
    import torch
    import torch.distributed as tdist

    if accelerator == "cuda":
        torch.cuda.set_device(dist.local_rank)
    records, store = join(dist, timeout_min, record or {"rank": dist.rank, "host": socket.gethostname()})
    backend = "gloo" if accelerator == "cpu" else "nccl"
    timeout = timedelta(minutes=timeout_min)
    tdist.init_process_group(backend, store=store, rank=dist.rank, world_size=dist.world_size, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group started above
    return records


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
