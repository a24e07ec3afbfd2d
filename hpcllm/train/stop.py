"""Stop signals: Slurm's pre-time-limit signal, preemption (SIGTERM), Ctrl-C on a local run.

The handler only sets a flag; the loop checks it at a step boundary, where every rank agrees
(all-reduce) to save a checkpoint and return, so no rank is left waiting in a collective. Agreeing
costs a collective, so the loop does it at log steps (in the metrics' all-reduce) and every
``train.stop_check_every`` steps, not every step.
"""
from __future__ import annotations

import signal

from hpcllm.distributed import all_reduce

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal = signum

    @property
    def raised(self) -> float:
        """1.0 once this rank received a stop signal: summed over ranks, non-zero means stop."""
        return 0.0 if self.signal is None else 1.0

    def agreed(self) -> bool:
        """True on every rank once any rank has received a stop signal (collective)."""
        return all_reduce([self.raised], op="max")[0] > 0
