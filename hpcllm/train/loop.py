"""The one training loop. A stage supplies the model, batches and loss; this does the rest:
DeepSpeed, accumulation, schedule, clipping, precision, eval, metrics, checkpoints, export."""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from hpcllm.config import ConfigError
from hpcllm.distributed import all_reduce
from hpcllm.models.adapters import parameter_counts
from hpcllm.stages.base import Stage, StageContext
from hpcllm.train.checkpoint import COMPLETE, Checkpointer
from hpcllm.train.engines import training_engine
from hpcllm.plan.formulas import arch_of, flops_per_token
from hpcllm.train.metrics import MetricsLogger, peak_memory_gb
from hpcllm.train.schedule import lr_scheduler_factory
from hpcllm.train.stop import StopFlag


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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
                                         cfg.train.keep_best, cfg.train.min_free_disk_gb)
        self.metrics = MetricsLogger(cfg, ctx.run_dir, ctx.dist.is_main)
        self.stop = StopFlag()
        self.state = {"step": 0, "eval_loss": None, "best_eval_loss": None, "best_checkpoint": None}
        counts = [parameter_counts(engine.module) for engine in self.engines.values()]
        self.trainable_params, self.total_params = (sum(c) for c in zip(*counts))
        # Model FLOPs (6N + 12LHS, active experts only) from the architecture numbers, as the estimate uses.
        self.flops_per_token = flops_per_token(arch_of(cfg.model), cfg.method.seq_len)
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
        """Train to max_steps; returns "completed", or "stopped" after checkpointing on a stop signal."""
        self.resume()
        batches = self.stage.train_batches(self.state["step"] * self.accum)
        interactive = self.ctx.dist.is_main and sys.stdout.isatty()
        progress = tqdm(total=self.max_steps, initial=self.state["step"], unit="step", disable=not interactive)
        while self.state["step"] < self.max_steps:
            if self.stop.agreed():
                progress.close()
                self.save()
                self.metrics.close()
                return "stopped"
            metrics = self.train_step(batches)
            self.state["step"] += 1
            progress.update()
            step = self.state["step"]
            if step % self.train_cfg.log_every == 0 or step == self.max_steps:
                self.metrics.log(step, metrics)
            if self.train_cfg.eval_every and step % self.train_cfg.eval_every == 0:
                self.evaluate()
            if self.train_cfg.save_every and step % self.train_cfg.save_every == 0 and step < self.max_steps:
                self.save()
        progress.close()
        self.save()
        if self.train_cfg.export:
            self.stage.export(self.engine, self.ctx.run_dir / "final")
        self.metrics.close()
        return "completed"

    def train_step(self, batches) -> dict:
        start = time.perf_counter()
        sums, counts, tokens = defaultdict(float), defaultdict(int), 0
        for _ in range(self.accum):
            batch = to_device(next(batches), self.engine.device)
            losses, extra = self.stage.loss(self.engine, batch)
            losses = self._per_engine(losses)
            for name, loss in losses.items():
                self.engines[name].backward(loss)
                self.engines[name].step()
            for key, value in {"loss": sum(loss.item() for loss in losses.values()), **extra}.items():
                sums[key] += value
                counts[key] += 1
            tokens += self.stage.tokens(batch)
        elapsed = time.perf_counter() - start
        metrics = self._reduce_means(sums, counts)
        world = self.ctx.derived.world_size
        tokens_per_sec = all_reduce([tokens / elapsed])[0] / world
        grad_norm = self.engine.get_global_grad_norm()
        for name, engine in self.extra_engines.items():
            norm = engine.get_global_grad_norm()
            metrics.update({f"{name}_lr": float(engine.get_lr()[0]),
                            f"{name}_grad_norm": float(norm) if norm is not None else float("nan")})
        metrics.update(
            lr=float(self.engine.get_lr()[0]),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            tokens_per_sec_per_gpu=tokens_per_sec,
            samples_per_sec=self.ctx.derived.global_batch_size / elapsed,
            tflops_per_gpu=tokens_per_sec * self.flops_per_token / 1e12,
            mfu=tokens_per_sec * self.flops_per_token / self.peak_flops,
            step_time_s=elapsed,
            memory_gb=peak_memory_gb(),
            consumed_samples=(self.state["step"] + 1) * self.ctx.derived.global_batch_size,
            epoch=(self.state["step"] + 1) * self.ctx.derived.global_batch_size / self.stage.samples_per_epoch(),
        )
        return metrics

    @staticmethod
    def _per_engine(losses) -> dict:
        """A stage's loss, or its dict of losses per trained engine (see Stage.extra_trained)."""
        return losses if isinstance(losses, dict) else {"model": losses}

    @staticmethod
    def _reduce_means(sums: dict, counts: dict) -> dict:
        keys = sorted(sums)
        reduced = all_reduce([sums[k] for k in keys] + [float(counts[k]) for k in keys])
        return {k: reduced[i] / max(1.0, reduced[len(keys) + i]) for i, k in enumerate(keys)}

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        batches = self.stage.eval_batches()
        if not batches:
            return None
        self.engine.eval()
        sums, counts = defaultdict(float), defaultdict(int)
        for batch in batches:
            losses, extra = self.stage.loss(self.engine, to_device(batch, self.engine.device))
            losses = self._per_engine(losses)
            for key, value in {"loss": sum(loss.item() for loss in losses.values()), **extra}.items():
                sums[f"eval_{key}"] += value
                counts[f"eval_{key}"] += 1
        self.engine.train()
        metrics = self._reduce_means(sums, counts)
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

    def resume(self) -> None:
        mode = self.ctx.cfg.resume
        if mode == "never":
            return
        path = self.checkpointer.latest() if mode == "auto" else Path(mode)
        if path is None:
            return
        if not (path / COMPLETE).is_file():
            raise ConfigError(f"resume={path} is not a complete checkpoint (no {COMPLETE} marker): "
                              "give a checkpoints/step_* directory that finished saving, or resume=auto")
        self.state.update(self.checkpointer.load(self.engines, path))
        if self.ctx.dist.is_main:
            print(f"hpcllm: resumed from {path} at step {self.state['step']}", flush=True)
