"""Stopping on a signal: SIGUSR1 or SIGTERM asks a run to stop after the current step with a
complete checkpoint; ``python -m lgdlm_ds.train`` then exits with status 3 (cli.STOPPED_AFTER_SAVE),
and the same command resumes.

SLURM sends SIGUSR1 before a job's time limit (``--signal=B:USR1@300``: launch/slurm_job.sh passes
it on to the ranks) and SIGTERM on preemption and ``scancel``; on one node, a user sends either to
the ranks (README, "Stopping and resuming"). A handler can run between any two bytecodes of a rank,
in the middle of a step or a checkpoint save, so it only records the signal. The signal may reach
one rank only, or the ranks during different steps: the trainer asks ``requested`` once per step,
and the answer rides on the skip policy's all-reduce (skip_policy.py), so that every rank learns
whether any rank was asked, and all stop after the same step.

For tests, ``LGDLM_SIGNAL_AT=STEP[:RANK]`` makes that rank (default 0) send itself SIGUSR1 during
step STEP (1-based, as logged): the run stops after that step, whatever the timing.
"""
from __future__ import annotations

import os
import re
import signal

from .config import ConfigError

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
HOOK = "LGDLM_SIGNAL_AT"


def _parse_hook(value: str) -> tuple[int, int] | None:
    if not value:
        return None
    m = re.fullmatch(r"(\d+)(?::(\d+))?", value)
    if not m:
        raise ConfigError(f"{HOOK}={value!r}: expected STEP or STEP:RANK (e.g. 3 or 3:1), or unset it.")
    return int(m.group(1)), int(m.group(2) or 0)


class StopSignal:
    """Records ``signals`` from construction on (construct it in the main thread); the process's
    handlers stay replaced. ``StopSignal(())`` catches nothing: a run that no signal stops."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.received: signal.Signals | None = None
        self.hook = _parse_hook(os.environ.get(HOOK, "")) if signal.SIGUSR1 in signals else None
        for s in signals:
            signal.signal(s, self._record)

    def _record(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def requested(self, step: int) -> bool:
        """Whether this rank was sent a stop signal; ``step`` (1-based) is the step running now."""
        if self.hook == (step, int(os.environ.get("RANK", "0"))):
            signal.raise_signal(signal.SIGUSR1)  # its handler runs before raise_signal returns
        return self.received is not None
