"""What every stage gives the one training loop: a model, batches and a loss (plus how to export)."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig

from hpcllm.config import Derived
from hpcllm.distributed import DistEnv, barrier
from hpcllm.models.build import base_model_dir, building_under


@dataclass
class StageContext:
    cfg: DictConfig
    derived: Derived
    run_dir: Path
    dist: DistEnv
    data: dict  # split -> memmap dir or None (see hpcllm.launch.datasets.memmap_paths)
    tokenizer: object
    zero3_init: object = None  # kept alive: transformers builds under deepspeed.zero.Init while it exists


class Stage:
    """Subclasses set ``self.model`` (the module DeepSpeed wraps) and implement the methods below."""

    model: torch.nn.Module

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def bind(self, engine, extra_engines: dict | None = None) -> None:
        """Called once the DeepSpeed engines exist (stages that generate with them keep them)."""
        self.engine, self.extra_engines = engine, extra_engines or {}

    def trainable_parameters(self) -> list:
        """Parameters (or param-group dicts with their own lr) the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def extra_trained(self) -> dict:
        """name -> (module, parameters) of models trained beside ``model``, each in a DeepSpeed engine of
        its own configured by ``run_dir/ds_config_<name>.json`` (PPO's critic). ``loss`` then returns a
        dict of losses, one per engine ("model" for the main one)."""
        return {}

    def frozen_model(self, role: str, build: Callable[[], torch.nn.Module]):
        """A forward-only model (reference, reward): ``build()`` under ``role``'s ZeRO profile, partitioned
        in an optimizer-less engine where that profile is stage 3 (see hpcllm/render/deepspeed.py)."""
        from hpcllm.train.engines import frozen_engine

        with self.building(role):
            model = build()
        return frozen_engine(model, self._ds_config(role), name=role)

    def building(self, role: str):
        """The context to build extra model ``role`` in: under ``deepspeed.zero.Init`` of its own ZeRO-3
        profile (with train.zero_init), else plainly, whatever the job's own profile."""
        ds_config = self._ds_config(role)
        partitioned = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
        return building_under(ds_config if partitioned and self.ctx.cfg.train.zero_init else None)

    def _ds_config(self, role: str) -> dict | None:
        """``run_dir/ds_config_<role>.json`` as rendered (None: a frozen replica has no engine)."""
        path = self.ctx.run_dir / f"ds_config_{role}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def samples_per_epoch(self) -> int:
        raise NotImplementedError

    def train_batches(self, micro_step: int) -> Iterator[dict]:
        """This rank's micro batches, starting at the job's ``micro_step``-th micro batch."""
        raise NotImplementedError

    def eval_batches(self) -> list[dict] | None:
        return None

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        """The scalar loss to backpropagate and extra metrics to average and log: floats, or 0-d tensors
        left on the device (the loop sums those there, without waiting for the GPU each micro batch)."""
        raise NotImplementedError

    def tokens(self, batch: dict) -> int:
        """Tokens this batch trains on (for tokens/s and MFU)."""
        return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))

    def eval_summary(self, metrics: dict) -> dict:
        """Derived eval metrics (e.g. perplexity) from the averaged eval metrics."""
        return {"eval_ppl": math.exp(min(metrics["eval_loss"], 50.0))} if "eval_loss" in metrics else {}

    def export(self, engine, out_dir: Path) -> None:
        """Write a Hugging Face directory (gathered weights under ZeRO-3), atomically."""
        module, state_dict = engine.module, self.gathered_state_dict(engine)

        def write(tmp: Path) -> None:
            base = base_model_dir(self.ctx.run_dir)
            if hasattr(module, "peft_config") and base.is_dir():
                # An adapter over random base weights: ship the base inside the export and point at it.
                shutil.copytree(base, tmp / "base")
                for config in module.peft_config.values():
                    config.base_model_name_or_path = str(out_dir / "base")
            module.save_pretrained(tmp, state_dict=state_dict)

        self.write_export(out_dir, write)

    def gathered_state_dict(self, engine) -> dict | None:
        """The whole model's state dict on the main rank (gathered from every rank under ZeRO-3; collective)."""
        if engine.zero_optimization_partition_weights():
            return engine._zero3_consolidated_16bit_state_dict()
        return engine.module.state_dict() if self.ctx.dist.is_main else None

    def write_export(self, out_dir: Path, write: Callable[[Path], None]) -> None:
        """Main rank: ``write(tmp)``, the run's tokenizer/config beside it, then rename to ``out_dir``."""
        if self.ctx.dist.is_main:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write(tmp)
            self.save_extras(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)
        barrier()

    def save_extras(self, out_dir: Path) -> None:
        """Tokenizer, resolved config and rendered job beside the weights, so the export reproduces."""
        if self.ctx.tokenizer is not None:
            self.ctx.tokenizer.save_pretrained(out_dir)
        for src in [self.ctx.run_dir / "config.yaml", self.ctx.run_dir / "job.sbatch",
                    *sorted(self.ctx.run_dir.glob("ds_config*.json"))]:
            if src.exists():
                shutil.copy(src, out_dir / f"hpcllm_{src.name}")
