"""Learning-rate schedule: linear warmup, then cosine or linear decay to min_lr_ratio x lr."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR


@dataclass
class WarmupDecay:
    """Multiplier of the peak lr at optimizer step ``step`` (a picklable callable, so the
    scheduler's state is saved with DeepSpeed's checkpoint)."""

    warmup_steps: int
    total_steps: int
    kind: str = "cosine"  # cosine | linear | constant
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def warmup_steps(method, total_steps: int) -> int:
    """method.warmup_steps when set, else method.warmup_ratio of the run's optimizer steps (as HF's Trainer)."""
    if method.warmup_steps is not None:
        return method.warmup_steps
    return math.ceil((method.warmup_ratio or 0.0) * total_steps)


def lr_scheduler_factory(method, total_steps: int):
    """For ``deepspeed.initialize(lr_scheduler=...)``, which calls it with the optimizer."""
    multiplier = WarmupDecay(warmup_steps(method, total_steps), total_steps, method.schedule, method.min_lr_ratio)
    return lambda optimizer: LambdaLR(optimizer, multiplier)
