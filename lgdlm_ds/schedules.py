"""Scheduled quantities: one shape for every value that changes with the training step.

A ``Schedule`` holds ``start`` for ``warmup_steps`` steps, then moves from ``start`` to ``base``
over ``ramp_steps`` steps along a shape, and stays at ``base``:

  linear  straight line;
  cosine  half a cosine (slow at both ends, so the value neither jumps off ``start`` nor
          overshoots into ``base``);
  step    ``stairs`` equal stairs, the last one reaching ``base`` at the end of the ramp.

The cycle weights, the latent prior weight, the t-range curriculum of random latent times and the
Gumbel temperature are all schedules. In a config section a schedule named ``<prefix>`` is read
from the keys ``<prefix>_warmup_steps``, ``<prefix>_ramp_steps``, ``<prefix>_shape`` and
``<prefix>_stairs`` (``schedule_from``); ``schedule_problems`` is what config validation checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = ("linear", "cosine", "step")


@dataclass(frozen=True)
class Schedule:
    """``start`` before ``warmup_steps``, then to ``base`` over ``ramp_steps`` (0: at once) along ``shape``."""
    base: float
    warmup_steps: int = 0
    ramp_steps: int = 0
    shape: str = "linear"
    start: float = 0.0
    stairs: int = 4  # step shape only

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"Schedule shape '{self.shape}' is not one of {', '.join(SHAPES)}.")
        if self.warmup_steps < 0 or self.ramp_steps < 0 or self.stairs < 1:
            raise ValueError(f"Schedule needs warmup_steps >= 0, ramp_steps >= 0 and stairs >= 1, got "
                             f"{self.warmup_steps}, {self.ramp_steps} and {self.stairs}.")

    def progress(self, step: int) -> float:
        """How far along the ramp ``step`` is, shaped: 0 through the warmup, 1 from ``end`` on."""
        if step < self.warmup_steps:
            return 0.0
        if self.ramp_steps == 0:
            return 1.0
        p = min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        if self.shape == "cosine":
            return 0.5 - 0.5 * math.cos(math.pi * p)
        if self.shape == "step":
            return math.floor(p * self.stairs) / self.stairs
        return p

    def at(self, step: int) -> float:
        """The value at (0-based) training step ``step``."""
        return self.start + (self.base - self.start) * self.progress(step)

    @property
    def end(self) -> int:
        """The first step at ``base``."""
        return self.warmup_steps + self.ramp_steps


def schedule_keys(prefix: str, ramp_key: str | None = None) -> tuple[str, str, str, str]:
    """The config keys of the schedule named ``prefix``: warmup, ramp, shape, stairs. ``ramp_key``
    names a ramp key that predates this naming (``latent_t_curriculum_steps``)."""
    warmup, ramp, shape, stairs = (f"{prefix}_{k}" for k in ("warmup_steps", "ramp_steps", "shape", "stairs"))
    return warmup, ramp_key or ramp, shape, stairs


def schedule_from(section, prefix: str, base: float, start: float = 0.0, ramp_key: str | None = None) -> Schedule:
    """The schedule named ``prefix`` in a config section (a dataclass holding its four keys)."""
    warmup, ramp, shape, stairs = (getattr(section, k) for k in schedule_keys(prefix, ramp_key))
    return Schedule(base, warmup, ramp, shape, start, stairs)


def schedule_problems(section, prefix: str, ramp_key: str | None = None) -> list[tuple[str, str]]:
    """(key, problem) for each bad key of the schedule named ``prefix``; empty when it is valid."""
    warmup, ramp, shape, stairs = schedule_keys(prefix, ramp_key)
    problems = [(k, f"must be an integer >= 0, got {getattr(section, k)!r}.") for k in (warmup, ramp)
                if not isinstance(getattr(section, k), int) or getattr(section, k) < 0]
    if getattr(section, shape) not in SHAPES:
        problems.append((shape, f"'{getattr(section, shape)}' is not one of {', '.join(SHAPES)}."))
    if not isinstance(getattr(section, stairs), int) or getattr(section, stairs) < 1:
        problems.append((stairs, f"must be an integer >= 1 (the stairs of the step shape), got "
                                 f"{getattr(section, stairs)!r}."))
    return problems
