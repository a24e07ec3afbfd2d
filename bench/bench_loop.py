"""Overhead of hpcllm's training loop against a bare DeepSpeed loop, same model and batches, one run.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_loop.py [--steps 100] [--repeats 3]

All loops run in this process on one rank (gloo) over the demo SFT memmap: the bare loop is
forward/backward/step on the engine plus ``loss.item()`` (what a plain loop prints); the hpcllm loop is
``Trainer.train()`` at ``train.log_every=1`` (an all-reduce of the metrics, tokens/s, MFU, a
metrics.jsonl line and a console line every step) and at ``train.log_every=50`` (losses summed on the
device, one all-reduce per 50 steps, a stop-flag agreement every ``train.stop_check_every=10``).
A loop's step time is the mean wall time between the starts of consecutive steps over ``--steps``
steps after a warm-up (so whatever the loop does between steps counts); each figure is the median of
``--repeats`` interleaved runs, because a shared 2-core machine has multi-second hiccups.
"""
from __future__ import annotations

import argparse
import contextlib
import io
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
             "model.intermediate_size=704", "train.export=false", "resume=never"]
WARMUP = 10


def prepared_job(run_dir: Path, steps: int, log_every: int = 1):
    from hpcllm.config import compose
    from hpcllm.launch.datasets import ensure_memmaps
    from hpcllm.launch.job import prepare

    job = prepare(compose(OVERRIDES + [f"train.max_steps={steps}", f"train.log_every={log_every}"]), run_dir)
    ensure_memmaps(job.cfg, job.run_dir)
    return job


def context(job, dist):
    from hpcllm.data import load_tokenizer
    from hpcllm.launch.datasets import memmap_paths
    from hpcllm.stages.base import StageContext

    return StageContext(job.cfg, job.derived, job.run_dir, dist, memmap_paths(job.cfg, job.run_dir),
                        load_tokenizer("demo"))


def mean_step(stamps: list[float]) -> float:
    """Mean seconds per step from the start times of the steps, after the warm-up."""
    return (stamps[-1] - stamps[WARMUP]) / (len(stamps) - 1 - WARMUP)


def bare_loop(job, dist, steps: int) -> float:
    """Seconds per step of the plainest DeepSpeed loop over the same stage's model and batches."""
    import deepspeed

    from hpcllm.stages.lm import LM_KEYS, LMStage
    from hpcllm.train.loop import to_device

    stage = LMStage(context(job, dist))
    ds_config = json.loads((job.run_dir / "ds_config.json").read_text())
    engine, *_ = deepspeed.initialize(model=stage.model, model_parameters=stage.trainable_parameters(),
                                      config=ds_config)
    batches = stage.train_batches(0)
    stamps = []
    for _ in range(steps):
        stamps.append(time.perf_counter())
        batch = to_device(next(batches), engine.device)
        loss = engine(**{k: batch[k] for k in LM_KEYS}).loss
        engine.backward(loss)
        engine.step()
        loss.item()
    return mean_step(stamps)


def hpcllm_loop(job, dist, steps: int) -> float:
    """Seconds per step of ``Trainer.train()`` (its console lines go to a buffer, formatted all the same)."""
    from hpcllm.stages.lm import LMStage
    from hpcllm.train.loop import Trainer

    trainer = Trainer(context(job, dist), LMStage(context(job, dist)))
    stamps, train_step = [], trainer.train_step

    def timed_step(*args, **kwargs):
        stamps.append(time.perf_counter())
        return train_step(*args, **kwargs)

    trainer.train_step = timed_step
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return mean_step(stamps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100, help="measured steps (after the warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from hpcllm import distributed

    dist = distributed.from_environment()
    distributed.init(dist, "cpu")
    steps = WARMUP + args.steps + 1  # the last step's start closes the measured span
    runs = {"bare DeepSpeed loop": [], "hpcllm, log_every=1": [], "hpcllm, log_every=50": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved, so drift in machine load hits every loop alike
            runs["bare DeepSpeed loop"].append(bare_loop(prepared_job(Path(tmp) / f"bare{i}", steps), dist, steps))
            for every in (1, 50):
                job = prepared_job(Path(tmp) / f"loop{every}_{i}", steps, log_every=every)
                runs[f"hpcllm, log_every={every}"].append(hpcllm_loop(job, dist, steps))
    bare = statistics.median(runs["bare DeepSpeed loop"])
    for name, times in runs.items():
        median = statistics.median(times)
        overhead = "" if name.startswith("bare") else f"  overhead {100 * (median / bare - 1):+.1f}%"
        print(f"{name:22s}: {median * 1000:7.1f} ms/step{overhead}  (runs: {', '.join(f'{x * 1000:.1f}' for x in times)})")
    print("target: overhead under 5%")


if __name__ == "__main__":
    main()
