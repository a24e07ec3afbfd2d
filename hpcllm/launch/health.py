"""What each rank finds on its node before the model loads, and an optional all-reduce check.

Every rank records where it runs (host, local rank, visible GPUs, CPUs, free /dev/shm, free disk of
the run directory) and hands the record to the join (``hpcllm.distributed.join``), so that rank 0
knows every rank's node and a rank that never joined is named. ``cluster.health_check=true`` adds a
short all-reduce whose result is checked and timed; everything goes to ``health.json``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

GIB = 2**30
NODE_DIRS = ("TMPDIR", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "HF_MODULES_CACHE")
LOW_SHM_GB = 1.0  # NCCL and data loader workers share memory through /dev/shm


def _free_gb(path: str | Path) -> float | None:
    try:
        return round(shutil.disk_usage(path).free / GIB, 2)
    except OSError:
        return None


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _visible_gpus(accelerator: str) -> dict:
    if accelerator != "cuda":
        return {"visible_gpus": None, "gpu_count": 0}
    import torch

    return {"visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "all"), "gpu_count": torch.cuda.device_count()}


def make_node_dirs() -> None:
    """The per-job, per-node caches the Slurm setup block points at (each rank makes sure they exist)."""
    for name in NODE_DIRS:
        if os.environ.get(name) and os.environ.get("HPCLLM_NODE_TMP"):
            os.makedirs(os.environ[name], exist_ok=True)


def rank_record(rank: int, local_rank: int, accelerator: str, run_dir: str | Path) -> dict:
    env = os.environ
    return {
        "rank": rank, "local_rank": local_rank, "host": env.get("SLURMD_NODENAME", socket.gethostname()),
        "pid": os.getpid(), **_visible_gpus(accelerator), "cpus": _cpus(),
        "cpus_per_task": int(env["SLURM_CPUS_PER_TASK"]) if env.get("SLURM_CPUS_PER_TASK") else None,
        "omp_threads": int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS", "").isdigit() else None,
        "shm_free_gb": _free_gb("/dev/shm"), "run_dir_free_gb": _free_gb(run_dir),
        "node_tmp": env.get("HPCLLM_NODE_TMP"), "caches": {name: env.get(name) for name in NODE_DIRS},
    }


def warnings_for(record: dict) -> list[str]:
    """What on a rank's node will make the job slow or fail later."""
    out = []
    rank, host = record["rank"], record["host"]
    wanted = record.get("omp_threads") or record.get("cpus_per_task")
    if wanted and record["cpus"] < wanted:
        out.append(f"rank {rank} on {host} may run on {record['cpus']} CPU(s) but OMP_NUM_THREADS={wanted}: "
                   "set cluster.cpus_per_task (srun gets it) or cluster.cpu_bind=none")
    if record.get("shm_free_gb") is not None and record["shm_free_gb"] < LOW_SHM_GB:
        out.append(f"rank {rank} on {host}: only {record['shm_free_gb']} GB free in /dev/shm (NCCL and data "
                   "loaders need it); clean it or ask for a node with a larger /dev/shm")
    return out


def announce(records: list[dict], rank: int) -> None:
    """Each rank says where it joined; rank 0 lists every rank and what looks wrong."""
    own = records[rank]
    print(f"hpcllm: rank {rank} joined on host {own['host']} (local rank {own['local_rank']}, "
          f"{own['cpus']} CPUs, GPUs {own['visible_gpus'] or '-'}, /dev/shm {own['shm_free_gb']} GB free)", flush=True)
    if rank != 0:
        return
    hosts: dict[str, list[int]] = {}
    for record in records:
        hosts.setdefault(record["host"], []).append(record["rank"])
    print("hpcllm: all ranks joined: " + "; ".join(f"{host}: ranks {','.join(map(str, ranks))}"
                                                   for host, ranks in hosts.items()), flush=True)
    for record in records:
        for line in warnings_for(record):
            print(f"hpcllm: warning: {line}", flush=True)


# -- all-reduce check (cluster.health_check) -------------------------------------------------------


def all_reduce_check(world_size: int, size_mb: float = 64, iterations: int = 5) -> dict:
    """Every rank contributes rank+1: the sum must be world*(world+1)/2 everywhere (a wrong value means
    a broken link or driver); the timing gives the bus bandwidth nccl-tests would report."""
    import torch
    import torch.distributed as tdist
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().current_device_name()
    numel = int(size_mb * 2**20) // 4
    tensor = torch.full((numel,), float(tdist.get_rank() + 1), dtype=torch.float32, device=device)
    tdist.all_reduce(tensor)
    expected = world_size * (world_size + 1) / 2
    correct = bool(torch.all(tensor == expected).item())
    get_accelerator().synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        tdist.all_reduce(tensor)
    get_accelerator().synchronize()
    seconds = (time.perf_counter() - start) / iterations
    # Bus bandwidth of a ring all-reduce: each byte crosses 2 (n-1)/n links.
    bus_gbps = numel * 4 * 2 * (world_size - 1) / world_size / seconds / 1e9 if world_size > 1 else None
    flags = torch.tensor([0.0 if correct else 1.0], device=device)
    tdist.all_reduce(flags)
    return {"size_mb": size_mb, "correct": flags.item() == 0, "ranks_wrong": int(flags.item()),
            "seconds_per_all_reduce": round(seconds, 6), "bus_bandwidth_gbps": bus_gbps and round(bus_gbps, 3)}


def write_health(run_dir: str | Path, records: list[dict], check: dict | None, transport: str | None) -> Path:
    path = Path(run_dir) / "health.json"
    report = {"ranks": records, "all_reduce": check, "nccl_transport": transport,
              "warnings": [line for record in records for line in warnings_for(record)]}
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


# -- which transport NCCL chose ---------------------------------------------------------------------


def nccl_log_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / "logs" / "nccl" / f"rank{rank}.log"


def capture_nccl_init(run_dir: str | Path, rank: int) -> None:
    """Unless the user asked for NCCL's own debug output, have NCCL write its INIT/NET lines for this rank
    to logs/nccl/ so that the transport it chose can be reported (warnings land there too)."""
    env = os.environ
    if env.get("NCCL_DEBUG_FILE") or env.get("NCCL_DEBUG", "WARN").upper() not in ("WARN", ""):
        return
    path = nccl_log_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS=env.get("NCCL_DEBUG_SUBSYS", "INIT,NET"), NCCL_DEBUG_FILE=str(path))


def nccl_transport(log: str) -> str | None:
    """One line from NCCL's INFO output: the network between nodes and the paths within one.

    e.g. "network IB (mlx5_0:1/IB, mlx5_1:1/RoCE); channels via NET/IB, P2P/IPC" or "network Socket (eth0)"."""
    network = re.search(r"Using network (\S+)", log)
    devices = re.search(r"NET/(\w+) ?: Using (.+?)(?: ;|$)", log, re.M)
    paths = sorted(set(re.findall(r" via (P2P/\S+|SHM\S*|NET/\S+?)(?:/\d+)?(?:\s|$)", log)))
    if not (network or devices or paths):
        return None
    name = network.group(1) if network else devices.group(1)
    parts = [f"network {name}"]
    if devices:
        found = re.findall(r"\[\d+\](\S+)", devices.group(2))
        parts[0] += f" ({', '.join(d.split('<')[0] for d in found)})" if found else ""
    if paths:
        parts.append("channels via " + ", ".join(paths))
    return "; ".join(parts)


def report_transport(run_dir: str | Path, rank: int) -> str | None:
    """After the first NCCL collective: which transport this rank's communicator uses (logged)."""
    path = nccl_log_path(run_dir, rank)
    line = nccl_transport(path.read_text(errors="replace")) if path.exists() else None
    if line:
        print(f"hpcllm: rank {rank} NCCL {line} (details: {path})", flush=True)
    return line


# -- the sequence every task runs before its stage ----------------------------------------------


def join_checked(cfg, run_dir: str | Path, dist) -> list[dict]:
    """Record this rank, join the process group (failing fast, with names, when a rank is missing),
    say who joined where, optionally check the all-reduce, record the attempt in run_info.json."""
    from hpcllm import distributed
    from hpcllm.launch.run_info import record_attempt

    accelerator = cfg.hw.accelerator
    make_node_dirs()
    (Path(run_dir) / "logs").mkdir(exist_ok=True)  # the NCCL flight recorder dumps there on a timeout
    if accelerator == "cuda":
        capture_nccl_init(run_dir, dist.rank)
    record = rank_record(dist.rank, dist.local_rank, accelerator, run_dir)
    records = distributed.init(dist, accelerator, cfg.cluster.dist_timeout_min, record)
    announce(records, dist.rank)
    check = all_reduce_check(dist.world_size) if cfg.cluster.health_check else None
    transport = None
    if accelerator == "cuda":
        if check is None:
            distributed.all_reduce([0.0])  # NCCL builds its communicator (and picks a transport) lazily
        transport = report_transport(run_dir, dist.rank)
    if dist.is_main:
        record_attempt(run_dir, records)
        if check is not None:
            path = write_health(run_dir, records, check, transport)
            print(f"hpcllm: health check: all-reduce of {check['size_mb']} MB {'correct' if check['correct'] else 'WRONG'}"
                  f", bus bandwidth {check['bus_bandwidth_gbps']} GB/s ({path})", flush=True)
    if check is not None and not check["correct"]:
        raise RuntimeError(f"health check: the all-reduce gave wrong values on {check['ranks_wrong']} rank(s); "
                           f"see {Path(run_dir) / 'health.json'} for the ranks' hosts")
    return records
