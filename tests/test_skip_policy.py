"""The skip policy without an engine (a world of one): the gate, the decision, the streak limit.
test_trainer.py checks it on two ranks under ZeRO-0/2/3."""
from pathlib import Path

import pytest
import torch

from lgdlm_ds.optim import WarmupCosine
from lgdlm_ds.skip_policy import SkipPolicy, StepGate
from engine_utils import OneRank


def test_gate_blocks_the_optimizer_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    gate = StepGate()
    gate.attach(opt)
    WarmupCosine(opt, 0, 10, 0.0)  # torch's scheduler re-wraps step(); the gate must survive it
    p.grad = torch.ones(3)
    gate.open = False
    opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state
    gate.open = True
    opt.step()
    assert (p < 1).all()


class _Engine:
    """What the skip policy asks of a DeepSpeed engine. ``wrapped``: DeepSpeed put its own
    optimizer around ours (ZeRO, bf16) and checks the norm itself; ``refuses``: it found it non-finite."""

    def __init__(self, optimizer, module, wrapped=False, refuses=False):
        self.optimizer = object() if wrapped else optimizer
        self.inner, self.module, self.refuses = optimizer, module, refuses

    def step(self, lr_kwargs):
        if not self.refuses:
            self.inner.step()
        self.schedule_skip = lr_kwargs["skip"]

    def was_step_applied(self):
        return not self.refuses

    def get_global_grad_norm(self):
        return float("nan") if self.refuses else 2.0


def _policy(grad, max_consecutive=1, **engine):
    layer = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    policy = SkipPolicy(opt, max_consecutive, OneRank)
    for p in layer.parameters():
        p.grad = torch.full_like(p, grad)
    return policy, _Engine(opt, layer, **engine), layer


@pytest.mark.parametrize("grad, bad_loss, engine, reason", [
    (1.0, False, {}, None),
    (1.0, True, {}, "loss"),
    (float("nan"), False, {}, "grad_norm"),  # plain fp32 ZeRO-0: the policy's own norm
    (1.0, False, {"wrapped": True, "refuses": True}, "grad_norm"),  # DeepSpeed's norm
])
def test_skip_policy_decides_and_gates_the_update(grad, bad_loss, engine, reason):
    policy, eng, layer = _policy(grad, **engine)
    before = [p.detach().clone() for p in layer.parameters()]
    assert policy.step(eng, torch.tensor(bad_loss))[0] == reason
    unchanged = all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert unchanged == (reason is not None) and policy.gate.open
    assert eng.schedule_skip == (reason is not None and not eng.refuses)  # DeepSpeed holds it when it refuses


def test_skip_streak_stops_the_run_naming_step_and_checkpoint():
    policy, eng, _ = _policy(1.0, max_consecutive=1)
    for bad in (True, False, True):  # a good step ends a streak
        policy.step(eng, torch.tensor(bad))
    assert policy.streak_error(3, None) is None
    policy.step(eng, torch.tensor(True))
    error = policy.streak_error(4, Path("run/checkpoints/global_step2"))
    assert error.startswith("step 4: 2 consecutive steps skipped (last reason: non-finite loss), more than "
                            "training.max_consecutive_skips=1; the parameters are those after step 2; "
                            "the last good checkpoint is run/checkpoints/global_step2")
    assert "no checkpoint was saved yet" in policy.streak_error(4, None)
