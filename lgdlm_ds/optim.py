"""AdamW with decay only on weight matrices, and the warmup + cosine schedule (which holds still on
the steps the skip policy drops, skip_policy.py)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .config import TrainingConfig
from .text_head import TextHead

DECAY, NO_DECAY = "decay", "no_decay"


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups. Only the weight matrices of linear maps (nn.Linear, the text head) decay:
    pulling norms, biases, token/position embeddings or the hyper-connection mixing parameters
    toward zero changes what the network computes rather than regularising it."""
    decay, no_decay, seen = [], [], set()
    for owner in module.modules():
        for name, p in owner.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            matrix = name == "weight" and isinstance(owner, (nn.Linear, TextHead))
            (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": DECAY},
            {"params": no_decay, "weight_decay": 0.0, "name": NO_DECAY}]


def build_optimizer(module: nn.Module, tr: TrainingConfig, offload: bool) -> torch.optim.Optimizer:
    """torch AdamW; DeepSpeedCPUAdam when ZeRO offloads the optimizer (DeepSpeed requires it there,
    and it is several times faster on the CPU). DeepSpeed's FusedAdam is avoided: on a machine
    without CUDA it compiles for about a minute."""
    groups = param_groups(module, tr.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=tr.lr, betas=tuple(tr.betas), eps=tr.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tuple(tr.betas), eps=tr.eps)


def lr_factor(k: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr at applied step k (0-based): linear warmup reaching 1 at step
    ``warmup - 1``, then a cosine from 1 down to ``floor`` at step ``total``, then ``floor``."""
    if k < warmup:
        return (k + 1) / warmup
    progress = min(1.0, (k - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """``lr_factor`` as a torch scheduler that DeepSpeed steps after every optimizer step. Steps
    the policy skipped pass ``skip=True`` (through ``engine.step(lr_kwargs=...)``) and do not
    advance it; DeepSpeed itself does not step it when it refuses a step."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = warmup, total, floor
        super().__init__(optimizer)

    def _lrs(self, k: int) -> list[float]:
        return [base * lr_factor(k, self.warmup, self.total, self.floor) for base in self.base_lrs]

    def get_lr(self) -> list[float]:
        return self._lrs(self.last_epoch)

    def step(self, skip: bool = False) -> None:  # noqa: D102 (signature widened for lr_kwargs)
        if not skip:
            super().step()

    def seek(self, applied_steps: int) -> None:
        """Position after a resume: the schedule follows the recipe, only the position is restored."""
        self.last_epoch = applied_steps
        self._last_lr = self._lrs(applied_steps)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr
