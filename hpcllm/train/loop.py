"""The one training loop. A stage supplies the model, batches and loss; this does the rest:
DeepSpeed, accumulation, schedule, clipping, precision, eval, metrics, checkpoints, export."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hpcllm.config import ConfigError
from hpcllm.models.adapters import parameter_counts
from hpcllm.plan.estimate import estimate
from hpcllm.stages.base import Stage, StageContext
from hpcllm.train import resume as resume_rules
from hpcllm.train.checkpoint import COMPLETE, Checkpointer, complete_checkpoints
from hpcllm.train.engines import training_engine
from hpcllm.train.metrics import MetricsLogger, MetricWindow, peak_memory_gb
from hpcllm.train.pipeline import is_pipeline, pipeline_parameter_counts, train_batch as pipeline_train_batch
from hpcllm.train.schedule import lr_scheduler_factory
from hpcllm.train.stop import StopFlag
from hpcllm.train.watchdog import Watchdog


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def synchronize() -> None:
    """Wait for the device's queued work (no-op on CPU), so that wall time measures it."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


@dataclass
class Throughput:
    """This rank's trained tokens and step seconds since the last log step."""
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0


class Trainer:
    def __init__(self, ctx: StageContext, stage: Stage) -> None:
        self.ctx, self.stage, cfg = ctx, stage, ctx.cfg
        self.train_cfg = cfg.train
        self.accum = ctx.derived.grad_accum_steps
        self.max_steps = self._max_steps()
        self.engine = self._engine("model", stage.model, stage.trainable_parameters())
        self.extra_engines = {name: self._engine(name, module, params)
                              for name, (module, params) in stage.extra_trained().items()}
        self.engines = {"model": self.engine, **self.extra_engines}
        stage.bind(self.engine, self.extra_engines)
        self.checkpointer = Checkpointer(ctx.run_dir / "checkpoints", ctx.dist.rank, cfg.train.keep_last,
                                         cfg.train.keep_best, cfg.train.min_free_disk_gb, self._records())
        self.metrics = MetricsLogger(cfg, ctx.run_dir, ctx.dist.is_main)
        self.window, self.throughput = MetricWindow(), Throughput()
        self.stop = StopFlag()
        self.watchdog = Watchdog(ctx.run_dir, ctx.dist.rank, ctx.derived.world_size, cfg.train.hang_timeout_min)
        self.state = {"step": 0, "eval_loss": None, "best_eval_loss": None, "best_checkpoint": None,
                      "consumed_samples": 0, "max_steps": self.max_steps}
        counts = [parameter_counts(engine.module) for engine in self.engines.values()]
        self.trainable_params, self.total_params = (sum(c) for c in zip(*counts))
        if is_pipeline(self.engine):  # each stage holds its own layers only
            self.trainable_params, self.total_params = pipeline_parameter_counts(self.engine)
        # The FLOPs the pre-flight estimate counts per token (6N + 12LHS with the frozen share, recomputation
        # under gradient checkpointing, PPO's generated tokens and critic, DPO's reference forward), so that
        # the logged MFU and the estimate's step time speak of the same work.
        self.flops_per_token = estimate(cfg, ctx.derived, ctx.run_dir, with_remedies=False).flops_per_token
        peak = cfg.hw.peak_tflops_fp32 if ctx.derived.precision == "fp32" else cfg.hw.peak_tflops_16bit
        self.peak_flops = peak * 1e12
        self._announce()

    def _engine(self, name: str, module, parameters):
        """The DeepSpeed engine of trained model ``name``: ds_config.json for the stage's model,
        ds_config_<name>.json for the others; each with the loop's LR schedule."""
        file = "ds_config.json" if name == "model" else f"ds_config_{name}.json"
        ds_config = json.loads((self.ctx.run_dir / file).read_text())
        return training_engine(module, parameters, ds_config, lr_scheduler_factory(self.ctx.cfg.method, self.max_steps))

    def _max_steps(self) -> int:
        if self.train_cfg.max_steps > 0:
            return self.train_cfg.max_steps
        per_epoch = self.stage.samples_per_epoch() // self.ctx.derived.global_batch_size
        return max(1, self.ctx.cfg.method.epochs * per_epoch)

    def _announce(self) -> None:
        if not self.ctx.dist.is_main:
            return
        share = 100.0 * self.trainable_params / max(1, self.total_params)
        info = {"trainable_params": self.trainable_params, "total_params": self.total_params,
                "trainable_percent": round(share, 4), "max_steps": self.max_steps,
                "flops_per_token": self.flops_per_token, "world_size": self.ctx.derived.world_size}
        path = self.ctx.run_dir / "run_info.json"  # beside the attempts hpcllm.launch.run_info records
        info = {**(json.loads(path.read_text()) if path.exists() else {}), **info}
        path.write_text(json.dumps(info, indent=2) + "\n")
        print(f"hpcllm: {self.ctx.cfg.method.name} on {self.ctx.cfg.model.name}: trainable params "
              f"{self.trainable_params:,} / {self.total_params:,} ({share:.2f}%), {self.max_steps} steps", flush=True)

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> str:
        """Train to max_steps; returns "completed", or "stopped" after checkpointing on a stop signal.
        The hang watchdog covers resuming, the steps, saving and export; metrics and wandb are closed
        however this returns or raises."""
        with self.metrics, self.watchdog:
            self.watchdog.progress(self.state["step"], "resuming")
            self.resume()
            if self.state["step"] >= self.max_steps:
                return self._already_complete()
            if self._steps() == "stopped":
                return "stopped"
            self.watchdog.progress(self.state["step"], "saving the final checkpoint")
            self.save()
            if self.train_cfg.export:
                self.watchdog.progress(self.state["step"], "exporting")
                self.stage.export(self.engine, self.ctx.run_dir / "final")
            return "completed"

    def _steps(self) -> str:
        """Optimizer steps up to max_steps, with logging, eval and periodic checkpoints between them; returns
        "stopped" after saving, at the first step where the ranks agree that a stop signal came."""
        batches = self.stage.train_batches(self._first_micro_step())
        interactive = self.ctx.dist.is_main and sys.stdout.isatty()
        train = self.train_cfg
        with tqdm(total=self.max_steps, initial=self.state["step"], unit="step", disable=not interactive) as bar:
            while self.state["step"] < self.max_steps:
                step = self.state["step"] + 1
                log_step = step % train.log_every == 0 or step == self.max_steps
                self.train_step(batches, sync=log_step)
                self.state["step"] = step
                self.state["consumed_samples"] += self.ctx.derived.global_batch_size
                bar.update()
                self.watchdog.progress(step)
                if self._between_steps(step, log_step):
                    return "stopped"
        return "completed"

    def _between_steps(self, step: int, log_step: bool) -> bool:
        """Log, poll for a stop, evaluate and checkpoint as due after ``step``; True once stopped and saved.
        The only collectives here: one all-reduce on log steps (the metrics and the stop flag together) and
        a one-number one every ``train.stop_check_every`` steps."""
        train = self.train_cfg
        if log_step:
            stop = self.log(step)
        else:
            stop = step % train.stop_check_every == 0 and self.stop.agreed()
        stopping = stop and step < self.max_steps  # a stop on the last step just completes
        if train.eval_every and step % train.eval_every == 0:
            self.watchdog.progress(step, "evaluating")
            self.evaluate()
        if stopping or (train.save_every and step % train.save_every == 0 and step < self.max_steps):
            self.watchdog.progress(step, "saving a checkpoint")
            self.save()
        return stopping

    def train_step(self, batches, sync: bool = True) -> None:
        """One optimizer step over ``accum`` micro batches. Losses and a stage's tensor metrics stay on the
        device, summed into the metric window; ``sync`` (log steps) waits for the device so that the
        window's seconds are the device's."""
        start = time.perf_counter()
        if is_pipeline(self.engine):  # the pipeline engine runs the step's micro batches itself
            loss, tokens = pipeline_train_batch(self, batches)
            self.window.add({"loss": loss})
            self.throughput.tokens += tokens
        for _ in range(0 if is_pipeline(self.engine) else self.accum):
            batch = next(batches)
            self.throughput.tokens += self.stage.tokens(batch)  # before the copy: memmap batches are on the host
            batch = to_device(batch, self.engine.device)
            losses, extra = self.stage.loss(self.engine, batch)
            losses = self._per_engine(losses)
            for name, loss in losses.items():
                self.engines[name].backward(loss)
                self.engines[name].step()
            self.window.add({"loss": sum(loss.detach() for loss in losses.values()), **extra})
        if sync:
            synchronize()
        self.throughput.seconds += time.perf_counter() - start
        self.throughput.steps += 1

    def log(self, step: int) -> bool:
        """Log the window's metrics (means over its micro batches and all ranks); returns whether any rank
        received a stop signal, agreed in the same all-reduce."""
        pace, world, batch = self.throughput, self.ctx.derived.world_size, self.ctx.derived.global_batch_size
        metrics, totals = self.window.reduce({"tokens_per_sec": pace.tokens / pace.seconds,
                                              "step_time_s": pace.seconds / pace.steps, "stop": self.stop.raised})
        self.throughput = Throughput()
        tokens_per_sec, step_time = totals["tokens_per_sec"] / world, totals["step_time_s"] / world
        for name, engine in self.extra_engines.items():
            metrics.update({f"{name}_lr": float(engine.get_lr()[0]), f"{name}_grad_norm": _norm(engine)})
        metrics.update(
            lr=float(self.engine.get_lr()[0]),
            grad_norm=_norm(self.engine),
            tokens_per_sec_per_gpu=tokens_per_sec,
            samples_per_sec=batch / step_time,
            tflops_per_gpu=tokens_per_sec * self.flops_per_token / 1e12,
            mfu=tokens_per_sec * self.flops_per_token / self.peak_flops,
            step_time_s=step_time,
            memory_gb=peak_memory_gb(),
            consumed_samples=self.state["consumed_samples"],
            epoch=self.state["consumed_samples"] / self.stage.samples_per_epoch(),
        )
        self.metrics.log(step, metrics)
        return totals["stop"] > 0

    @staticmethod
    def _per_engine(losses) -> dict:
        """A stage's loss, or its dict of losses per trained engine (see Stage.extra_trained)."""
        return losses if isinstance(losses, dict) else {"model": losses}

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        batches = self.stage.eval_batches()
        if not batches:
            return None
        self.engine.eval()
        window = MetricWindow()
        for batch in batches:
            losses, extra = self.stage.loss(self.engine, to_device(batch, self.engine.device))
            losses = self._per_engine(losses)
            window.add({f"eval_{k}": v for k, v in {"loss": sum(losses.values()), **extra}.items()})
        self.engine.train()
        metrics, _ = window.reduce()
        metrics.update(self.stage.eval_summary(metrics))
        self.state["eval_loss"] = metrics["eval_loss"]
        self.metrics.log(self.state["step"], metrics)
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path:
        state = self.state
        eval_loss = state["eval_loss"]
        if eval_loss is not None and (state["best_eval_loss"] is None or eval_loss <= state["best_eval_loss"]):
            state["best_eval_loss"] = eval_loss
            state["best_checkpoint"] = f"step_{state['step']:08d}"
        expected = self.total_params * 4 + self.trainable_params * 12  # weights + fp32 master and Adam moments
        return self.checkpointer.save(self.engines, dict(state), expected)

    def _records(self) -> dict:
        """What every checkpoint records of the run: the config it trains with and the data it reads."""
        config = self.ctx.run_dir / "config.yaml"
        return {resume_rules.CONFIG_RECORD: config.read_text() if config.is_file() else "",
                resume_rules.DATA_RECORD: json.dumps(resume_rules.data_record(self.ctx.data), indent=2) + "\n"}

    def resume(self) -> None:
        mode, run_dir = self.ctx.cfg.resume, self.ctx.run_dir
        if mode == "never":
            earlier = complete_checkpoints(self.checkpointer.root)
            if earlier:
                raise resume_rules.never_over(run_dir, earlier[-1])
            return
        path = self.checkpointer.latest_sound() if mode == "auto" else Path(mode)
        if path is None:
            return
        if not (path / COMPLETE).is_file():
            raise ConfigError(f"resume={path} is not a complete checkpoint (no {COMPLETE} marker): "
                              "give a checkpoints/step_* directory that finished saving, or resume=auto")
        changes = resume_rules.check_resume(self.ctx.cfg, path, run_dir, self.ctx.data)
        if mode != "auto":
            self.checkpointer.set_aside_newer(path)
        loaded = self.checkpointer.load(self.engines, path)
        loaded.setdefault("consumed_samples", loaded["step"] * self.ctx.derived.global_batch_size)  # older ones
        self.state.update(loaded, max_steps=self.max_steps)
        if self.ctx.dist.is_main:
            print(f"hpcllm: resumed from {path} at step {self.state['step']}", flush=True)
            resume_rules.log_changes(run_dir, self.state["step"], changes)

    def _first_micro_step(self) -> int:
        """Where the data continues: the samples consumed so far, in micro steps of this launch's batch
        (after a batch size change, rounded up: a few samples skipped rather than trained twice)."""
        rows = self.ctx.cfg.method.micro_batch_size * self.ctx.derived.data_parallel_size
        micro_step = math.ceil(self.state["consumed_samples"] / rows)
        if micro_step * rows != self.state["consumed_samples"] and self.ctx.dist.is_main:
            print(f"hpcllm: the new batch size continues at sample {micro_step * rows} (skipping "
                  f"{micro_step * rows - self.state['consumed_samples']} to align, none trained twice)", flush=True)
        self.state["consumed_samples"] = micro_step * rows
        return micro_step

    def _already_complete(self) -> str:
        """A finished run relaunched: nothing is trained, saved or rewritten (final/ is exported if missing)."""
        step, final = self.state["step"], self.ctx.run_dir / "final"
        if step > self.max_steps:
            raise ConfigError(f"the run in {self.ctx.run_dir} is at step {step}, past train.max_steps="
                              f"{self.max_steps}: give train.max_steps > {step} to continue it, or another "
                              "hydra.run.dir for a new run")
        if self.train_cfg.export and not final.is_dir():
            self.stage.export(self.engine, final)
        if self.ctx.dist.is_main:
            print(f"hpcllm: {self.ctx.run_dir} is complete (step {step} of {self.max_steps}); nothing to train "
                  "(a larger train.max_steps continues it)", flush=True)
        return "completed"


def _norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
