"""The skip policy: a step that would corrupt the weights is dropped by every rank together.

A step is skipped when
- the loss is non-finite on any rank: the ranks all-reduce a flag before the update;
- the gradient norm is non-finite: with ZeRO or bf16, DeepSpeed computes the global norm and refuses
  the step itself (``was_step_applied``; bf16 JSONs must say ``check_grad_overflow: true``); with
  plain fp32 ZeRO-0 nothing wraps the optimizer, so the policy computes the norm of the already
  all-reduced gradients, identical on every rank, and adds it to the flag.

A skipped step consumes its data and its step number and leaves parameters, optimizer state and
the learning-rate schedule untouched: the ``StepGate`` makes the inner optimizer's ``step`` do
nothing (DeepSpeed still runs its whole step: reductions, clipping, zeroing the gradients), and the
schedule is told ``skip``. More than ``training.max_consecutive_skips`` in a row stop the run.

The same all-reduce carries each rank's stop request (preemption.py): every rank learns whether
any rank was asked to stop, at no extra collective per step.
"""
from __future__ import annotations

import types
from pathlib import Path

import torch


class StepGate:
    """Open: optimizer steps apply. Closed (for one step the skip policy rejected): they do nothing."""

    def __init__(self) -> None:
        self.open = True

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Patch the instance, not the class: under ZeRO, DeepSpeed accepts only the exact optimizer
        classes it knows. A bound method, because torch's LR scheduler re-wraps ``step`` through
        ``step.__func__``."""
        inner = optimizer.step

        def step(_self, *args, **kwargs):
            return inner(*args, **kwargs) if self.open else None

        optimizer.step = types.MethodType(step, optimizer)


class SkipPolicy:
    """Built around the optimizer before ``deepspeed.initialize`` wraps it; ``dist`` is
    ``deepspeed.comm`` (or anything with ``all_reduce`` and ``ReduceOp.MAX``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_consecutive: int, dist):
        self.optimizer, self.max_consecutive, self.dist = optimizer, max_consecutive, dist
        self.gate = StepGate()
        self.gate.attach(optimizer)
        self.streak, self.reason = 0, None

    def step(self, engine, bad_loss: torch.Tensor,
             stop_requested: bool = False) -> tuple[str | None, float | None, bool]:
        """DeepSpeed's step of the last micro-step, applied or skipped on every rank alike.
        ``bad_loss``: this rank's non-finite-loss flag; ``stop_requested``: whether this rank was
        asked to stop. Returns (skip reason or None, gradient norm or None where no norm is known,
        whether any rank was asked to stop)."""
        reason, grad_norm, stop = self._collective_reason(engine, bad_loss, stop_requested)
        self.gate.open = reason is None
        engine.step(lr_kwargs={"skip": reason is not None})
        self.gate.open = True
        if reason is None and not engine.was_step_applied():
            reason = "grad_norm"  # DeepSpeed refused it: its global norm was not finite
        if grad_norm is None and engine.get_global_grad_norm() is not None:
            grad_norm = float(engine.get_global_grad_norm())
        self.streak, self.reason = (0, None) if reason is None else (self.streak + 1, reason)
        return reason, grad_norm, stop

    def _collective_reason(self, engine, bad_loss: torch.Tensor,
                           stop_requested: bool) -> tuple[str | None, float | None, bool]:
        norm = None
        bad_norm = torch.zeros((), device=bad_loss.device)
        if engine.optimizer is self.optimizer:  # plain fp32 ZeRO-0: nobody else checks the norm
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            bad_norm = (~torch.isfinite(norm)).float()
        flags = torch.stack([bad_loss.float(), bad_norm, torch.full_like(bad_norm, float(stop_requested))])
        self.dist.all_reduce(flags, op=self.dist.ReduceOp.MAX)
        bad_loss_any, bad_norm_any, stop_any = flags.tolist()
        reason = "loss" if bad_loss_any else "grad_norm" if bad_norm_any else None
        return reason, None if norm is None else float(norm), bool(stop_any)

    def streak_error(self, step: int, last_checkpoint: Path | None) -> str | None:
        """The message that stops the run after ``step`` (1-based), or None while the streak is allowed."""
        if self.streak <= self.max_consecutive:
            return None
        back = (f"the last good checkpoint is {last_checkpoint} (resume from it with "
                f"training.resume={last_checkpoint}, e.g. with a lower training.lr)"
                if last_checkpoint else "no checkpoint was saved yet")
        return (f"step {step}: {self.streak} consecutive steps skipped (last reason: non-finite {self.reason}), more "
                f"than training.max_consecutive_skips={self.max_consecutive}; the parameters "
                f"are those after step {step - self.streak}; {back}.")
