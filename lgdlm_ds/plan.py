"""What a run's objective implies, answered in one place from its config.

Which mode trains at a step, which modes the run trains at all, the cycle terms' weights at a step
and whether they run at all (alternation), the latent prior's weight, the latent time of a T2L
pass, how many model calls and rows a micro-batch costs and in how many DeepSpeed micro-steps, and
where sampling starts for a model trained this way. Every scheduled quantity is a
lgdlm_ds.schedules.Schedule. Only facts and
small pure functions of the config and the step; the passes themselves are built and run in
lgdlm_ds.objectives.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import BASE_MODES, Config
from .schedules import Schedule, schedule_from
from .seeding import derive_seed

# Default L2T unmasking steps for a run that trained on partly masked text, and default DDIM steps
# for a run that trained T2L at more than one latent time.
ITERATIVE_DECODE_STEPS = 16
DDIM_STEPS = 10


@dataclass(frozen=True)
class LatentTime:
    """Latent time of a T2L pass: 1 (mode full) or uniform in [low(step), t_max] (mode random).

    The lower bound is the schedule ``lower``: t_min throughout, or with a curriculum it falls from
    ``cycle_latent_t_min_start`` to t_min: T2L starts near t = 1, where a model trained at t = 1
    knows its task, and the range widens. The upper bound never moves, so where T2L sampling starts
    (``largest``) does not depend on the step."""
    mode: str
    lower: Schedule
    t_max: float

    @property
    def t_min(self) -> float:
        """The lower bound once the curriculum is over."""
        return self.lower.base

    def low(self, step: int) -> float:
        """The lower bound of a random latent time at ``step``."""
        return self.lower.at(step)

    def sample(self, b: int, device, step: int) -> Tensor:
        """Latent times of ``b`` rows at (0-based) training step ``step``, float32."""
        if self.mode == "full":
            return torch.ones(b, device=device)
        low = self.low(step)
        return low + (self.t_max - low) * torch.rand(b, device=device)

    @property
    def largest(self) -> float:
        """The largest latent time a T2L pass sees."""
        return 1.0 if self.mode == "full" else self.t_max


# The ``stage`` argument of TrainStep.forward for the micro-step of the restricted cycle_text term.
RESTRICTED_STAGE = 3


@dataclass(frozen=True)
class ObjectivePlan:
    """What the objective of one run implies; build it with ``from_config``."""
    loss_type: str
    seed: int
    mode_weights: tuple[tuple[str, float], ...]  # random: (mode, weight > 0) in BASE_MODES order
    mode_schedule: tuple[tuple[str, int], ...]   # sequential: (mode, steps), cycled by step
    latent_time: LatentTime
    cycle_text: Schedule
    cycle_latent: Schedule
    stagewise: bool                              # cycle_vae's stages backpropagated one at a time
    latent_prior: Schedule = Schedule(0.0)       # weight of the latent prior regulariser
    cycle_every: int = 1                         # the cycle terms run every cycle_every-th step ...
    cycle_probability: float = 1.0               # ... and then with this probability
    cycle_text_params: tuple[str, ...] = ()      # glob patterns: cycle_text updates only these

    @classmethod
    def from_config(cls, cfg: Config) -> ObjectivePlan:
        """The plan of a validated config. Mode weights and schedule are read only for the loss
        types that use them (validation checks them only there)."""
        lo, tr = cfg.loss, cfg.training
        weights, schedule = (), ()
        if lo.loss_type == "random":
            weights = tuple((m, tr.mode_weights[m]) for m in BASE_MODES if tr.mode_weights.get(m, 0) > 0)
        if lo.loss_type == "sequential":
            schedule = tuple((s["type"], s["steps"]) for s in tr.mode_schedule)
        lower = schedule_from(lo, "latent_t_curriculum", lo.cycle_latent_t_min, lo.cycle_latent_t_min_start,
                              ramp_key="latent_t_curriculum_steps") if lo.latent_t_curriculum_steps else \
            Schedule(lo.cycle_latent_t_min)
        return cls(loss_type=lo.loss_type, seed=tr.seed, mode_weights=weights, mode_schedule=schedule,
                   latent_time=LatentTime(lo.latent_t_mode, lower, lo.cycle_latent_t_max),
                   cycle_text=schedule_from(lo, "cycle_text", lo.cycle_text_weight),
                   cycle_latent=schedule_from(lo, "cycle_latent", lo.cycle_latent_weight),
                   stagewise=lo.loss_type == "cycle_vae" and lo.cycle_stagewise,
                   latent_prior=schedule_from(lo, "latent_prior", lo.latent_prior_weight),
                   cycle_every=lo.cycle_every, cycle_probability=lo.cycle_probability,
                   cycle_text_params=tuple(lo.cycle_text_params) if lo.loss_type == "cycle_vae" else ())

    # ---- modes

    def mode_at(self, step: int) -> str:
        """The mode trained at ``step``. random draws from a generator seeded by (seed, step), so
        every rank picks the same mode; sequential cycles the schedule, in training and evaluation."""
        if self.loss_type == "random":
            modes, weights = zip(*self.mode_weights)
            return random.Random(derive_seed(self.seed, "mode", step)).choices(modes, weights)[0]
        if self.loss_type == "sequential":
            pos = step % sum(steps for _, steps in self.mode_schedule)
            for mode, steps in self.mode_schedule:
                if pos < steps:
                    return mode
                pos -= steps
        return self.loss_type

    # ---- the cycle terms

    def cycle_terms_at(self, step: int, training: bool = True) -> tuple[bool, bool]:
        """Whether cycle_text and cycle_latent run on the whole micro-batch at ``step``: when their
        weight is above 0 and the cycle runs at the step (``cycle_runs_at``; in evaluation always).
        In the stage-wise mode always (weight 0 during warm-up): stage 2's micro-step must have a
        graph for the engine's backward; with ``fixed_passes`` a term that does not run here runs
        on a stand-in row instead."""
        if self.stagewise and not self.fixed_passes:
            return True, True
        cycle = not training or self.cycle_runs_at(step)
        return cycle and self.cycle_text.at(step) > 0, cycle and self.cycle_latent.at(step) > 0

    def cycle_runs_at(self, step: int) -> bool:
        """Whether cycle_vae's cycle terms run at ``step`` (the base terms run at every step): every
        ``cycle_every``-th step from step 0, then with ``cycle_probability``, drawn from a generator
        seeded by (seed, step), so every rank makes the same draw."""
        if step % self.cycle_every:
            return False
        return self.cycle_probability >= 1.0 or \
            random.Random(derive_seed(self.seed, "cycle", step)).random() < self.cycle_probability

    @property
    def alternates(self) -> bool:
        """Some steps run the base terms only."""
        return self.cycle_every > 1 or self.cycle_probability < 1.0

    @property
    def fixed_passes(self) -> bool:
        """Every model call of a step runs the same passes, a pass that does not train at the step
        on a stand-in row that passes no gradient (objectives.py): steps that differ in their terms
        then run the same modules in the same order, which keeps ZeRO-3's prefetch trace valid."""
        return self.alternates or bool(self.cycle_text_params)

    @property
    def trained_modes(self) -> frozenset[str]:
        """The base modes (l2t, t2l, unconditional) the run trains; cycle_vae's passes are L2T and
        T2L passes."""
        if self.loss_type == "random":
            return frozenset(m for m, _ in self.mode_weights)
        if self.loss_type == "sequential":
            return frozenset(m for m, _ in self.mode_schedule)
        if self.loss_type == "cycle_vae":
            return frozenset({"l2t", "t2l"})
        return frozenset({self.loss_type})

    # ---- cost of one micro-batch

    @property
    def stages(self) -> int:
        """Dependency stages, one model call each: cycle_vae's second stage needs the first's outputs."""
        return 2 if self.loss_type == "cycle_vae" else 1

    @property
    def passes_per_stage(self) -> int:
        """Passes concatenated into one model call, at most (cycle_vae: an L2T and a T2L pass)."""
        return 2 if self.loss_type == "cycle_vae" else 1

    def rows_per_call(self, micro_batch: int) -> int:
        return self.passes_per_stage * micro_batch

    @property
    def micro_step_stages(self) -> tuple[int | None, ...]:
        """The ``stage`` argument of TrainStep.forward for each DeepSpeed micro-step (forward +
        backward) of one micro-batch: (1, 2) stage-wise, else (None,), every stage in one step.
        With ``cycle_text_params`` the cycle_text term gets a micro-step of its own after them,
        RESTRICTED_STAGE, whose backward alone updates only those parameters."""
        stages = tuple(range(1, self.stages + 1)) if self.stagewise else (None,)
        return stages + (RESTRICTED_STAGE,) if self.cycle_text_params else stages

    @property
    def micro_steps_per_batch(self) -> int:
        return len(self.micro_step_stages)

    @property
    def stages_per_micro_step(self) -> int:
        """Model calls whose graphs one backward spans (alive together in memory)."""
        return 1 if self.stagewise else self.stages

    # ---- sampling a model trained this way

    @property
    def decode_steps(self) -> int:
        """Default L2T unmasking steps. Only unconditional passes show the model partly masked
        text at 0 < t < 1; a run without them (l2t, cycle_vae, ...) saw text only all-[MASK] at
        t = 1 or clean, so its decoding predicts every token from the all-[MASK] input in one step."""
        return ITERATIVE_DECODE_STEPS if "unconditional" in self.trained_modes else 1

    @property
    def t2l_start(self) -> float:
        """Latent time T2L sampling starts from: the largest one the run trained (unconditional
        passes use t in [0, 1], T2L passes ``latent_time``)."""
        return 1.0 if "unconditional" in self.trained_modes else self.latent_time.largest

    @property
    def t2l_steps(self) -> int:
        """Default DDIM steps: 1 (the x0 prediction at t = 1) when T2L was trained only at t = 1."""
        if "unconditional" not in self.trained_modes and self.latent_time.mode == "full":
            return 1
        return DDIM_STEPS
