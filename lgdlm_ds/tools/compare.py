"""Comparing two runs of the same step: their parameter gradients, and how far apart they are."""
from __future__ import annotations

import torch
from torch import nn


def param_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter gradient present, by parameter name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest per-tensor relative error ||a - b|| / ||b||. Tensors whose gradient norm is under
    1e-4 of the largest are compared against that floor: their values are cancellation residues
    (e.g. hyper-connection mixing parameters), where a relative comparison would measure only the
    order of summation."""
    floor = 1e-4 * max(g.norm().item() for g in b.values())
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(floor)).item() for k in b)
