"""Overhead of hpcllm's training loop against a bare DeepSpeed loop, same model and batches, one run.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_loop.py [--steps 100] [--repeats 3]

All loops run in this process on one rank (gloo) over the demo SFT memmap: the bare loop is
forward/backward/step on the engine plus ``loss.item()`` (what a plain loop prints); the hpcllm loop is
``Trainer.train()`` at ``train.log_every=1`` (an all-reduce of the metrics, tokens/s, MFU, a
metrics.jsonl line and a console line every step) and at ``train.log_every=50`` (losses summed on the
device, one all-reduce per 50 steps, a stop-flag agreement every ``train.stop_check_every=10``).
A loop's step time is the mean time between the starts of consecutive steps over ``--steps`` steps
after a warm-up (so whatever the loop does between steps counts), as wall time and as this process's
CPU time; each figure is the best of ``--repeats`` interleaved runs (as ``timeit`` does): on a shared
machine other processes only ever add time, and CPU time is the figure they disturb least.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
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


def stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def mean_step(stamps: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean (wall, CPU) seconds per step from the start times of the steps, after the warm-up."""
    steps = len(stamps) - 1 - WARMUP
    return tuple((end - begin) / steps for begin, end in zip(stamps[WARMUP], stamps[-1]))


def bare_loop(job, dist, steps: int) -> tuple[float, float]:
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
        stamps.append(stamp())
        batch = to_device(next(batches), engine.device)
        loss = engine(**{k: batch[k] for k in LM_KEYS}).loss
        engine.backward(loss)
        engine.step()
        loss.item()
    return mean_step(stamps)


def hpcllm_loop(job, dist, steps: int) -> tuple[float, float]:
    """Seconds per step of ``Trainer.train()`` (its console lines go to a buffer, formatted all the same)."""
    from hpcllm.stages.lm import LMStage
    from hpcllm.train.loop import Trainer

    trainer = Trainer(context(job, dist), LMStage(context(job, dist)))
    stamps, train_step = [], trainer.train_step

    def timed_step(*args, **kwargs):
        stamps.append(stamp())
        return train_step(*args, **kwargs)

    trainer.train_step = timed_step
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return mean_step(stamps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100, help="measured steps (after the warm-up)")
    parser.add_argument("--repeats", type=int, default=5)
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
    best = {name: [min(run[i] for run in times) for i in (0, 1)] for name, times in runs.items()}
    bare = best["bare DeepSpeed loop"]
    print(f"{'best of ' + str(args.repeats):22s}   wall ms/step (overhead)   CPU ms/step (overhead)   all wall times")
    for name, (wall, cpu) in best.items():
        print(f"{name:22s}: {wall * 1000:8.1f} ({100 * (wall / bare[0] - 1):+5.1f}%)      {cpu * 1000:8.1f} "
              f"({100 * (cpu / bare[1] - 1):+5.1f}%)      {', '.join(f'{w * 1000:.0f}' for w, _ in runs[name])}")
    print("target: overhead under 5%")

if __name__ == "__main__":
    main()
