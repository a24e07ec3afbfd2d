"""Overhead of hpcllm's training loop against a bare DeepSpeed loop, same model and batches, one run.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_loop.py [--steps 40] [--repeats 2]

Both loops run in this process on one rank (gloo) over the demo SFT memmap. The bare loop is
forward/backward/step on the engine and nothing else; the hpcllm loop is ``Trainer.train()``
with its per-step metrics (all-reduce, tokens/s, MFU, metrics.jsonl) and stop-signal check.
A step of the hpcllm loop is the wall time between two consecutive metric records (everything
the loop does per step); medians, because a shared 2-core machine has multi-second hiccups.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

OVERRIDES = ["hw.gpus_per_node=1", "method.seq_len=128", "method.micro_batch_size=4", "model.hidden_size=256",
             "model.intermediate_size=704", "train.export=false", "train.log_every=1", "resume=never"]


def prepared_job(run_dir: Path, steps: int):
    from hpcllm.config import compose
    from hpcllm.launch.datasets import ensure_memmaps
    from hpcllm.launch.job import prepare

    job = prepare(compose(OVERRIDES + [f"train.max_steps={steps}"]), run_dir)
    ensure_memmaps(job.cfg, job.run_dir)
    return job


def context(job, dist):
    from hpcllm.data import load_tokenizer
    from hpcllm.launch.datasets import memmap_paths
    from hpcllm.stages.base import StageContext

    return StageContext(job.cfg, job.derived, job.run_dir, dist, memmap_paths(job.cfg, job.run_dir),
                        load_tokenizer("demo"))


def bare_loop(job, dist, steps: int) -> float:
    """Median seconds per step of the plainest DeepSpeed loop over the same stage's model and batches."""
    import deepspeed

    from hpcllm.stages.lm import LM_KEYS, LMStage
    from hpcllm.train.loop import to_device

    stage = LMStage(context(job, dist))
    ds_config = json.loads((job.run_dir / "ds_config.json").read_text())
    engine, *_ = deepspeed.initialize(model=stage.model, model_parameters=stage.trainable_parameters(),
                                      config=ds_config)
    batches = stage.train_batches(0)
    stamps = [time.perf_counter()]
    for _ in range(steps):
        batch = to_device(next(batches), engine.device)
        loss = engine(**{k: batch[k] for k in LM_KEYS}).loss
        engine.backward(loss)
        engine.step()
        loss.item()
        stamps.append(time.perf_counter())
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def hpcllm_loop(job, dist, steps: int) -> float:
    from hpcllm.stages.lm import LMStage
    from hpcllm.train.loop import Trainer

    trainer = Trainer(context(job, dist), LMStage(context(job, dist)))
    stamps, log = [], trainer.metrics.log

    def timed_log(step, metrics, console=True):
        log(step, metrics, console)
        stamps.append(time.perf_counter())

    trainer.metrics.log = timed_log
    trainer.train()
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from hpcllm import distributed

    dist = distributed.from_environment()
    distributed.init(dist, "cpu")
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            bare.append(bare_loop(prepared_job(Path(tmp) / f"bare{i}", args.steps), dist, args.steps))
            ours.append(hpcllm_loop(prepared_job(Path(tmp) / f"loop{i}", args.steps), dist, args.steps))
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"bare DeepSpeed loop : {b * 1000:8.1f} ms/step  (runs: {', '.join(f'{x * 1000:.1f}' for x in bare)})")
    print(f"hpcllm Trainer      : {o * 1000:8.1f} ms/step  (runs: {', '.join(f'{x * 1000:.1f}' for x in ours)})")
    print(f"overhead            : {100 * (o / b - 1):+.1f}%  (target: under 5%)")


if __name__ == "__main__":
    main()
