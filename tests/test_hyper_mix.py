"""The fused hyper-connections (lgdlm_ds/hyper_mix.py) against the hyper-connections package: the
closed-form Sinkhorn and its gradient at fp64 precision, one module's outputs and gradients, a whole
training step's loss and gradients within fp32 rounding (measured against fp64), and the op count."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from hyper_connections.mHCv2 import ManifoldConstrainedHyperConnections, sinkhorn_knopps

from lgdlm_ds.hyper_mix import (FusedHyperConnections, _basis, _sinkhorn_2x2, _sinkhorn_2x2_backward,
                                fuse_hyper_connections)
from lgdlm_ds.model import build_model
from lgdlm_ds.tools import op_count
from lgdlm_ds.tools.compare import max_rel_diff
from core_utils import fp64_reference, loss_and_grads, tiny_batch, tiny_config, tiny_step
from precision import assert_fp32_agree, fp64_throughout

FP64_AGREE = 1e-12


def _closed_form_and_grad(l: torch.Tensor, grad: torch.Tensor, iterations: int):
    """``_sinkhorn_2x2`` of l [n, 2, 2] and the gradient of <grad, it> w.r.t. l (its backward)."""
    logits = torch.cat([torch.zeros(l.shape[0], 2, 2, dtype=l.dtype), l], -1)  # [beta, pre] columns unused
    basis, back = _basis(l.device, l.dtype, iterations - 1)
    mixing, saved = _sinkhorn_2x2(logits, logits[..., 2:], basis, iterations - 1)
    grad_l, grad_coords = _sinkhorn_2x2_backward(grad, *saved)
    total = grad_l + (grad_coords @ back).view(-1, 2, 4)[..., 2:]
    return mixing, total


def _package_and_grad(l: torch.Tensor, grad: torch.Tensor, iterations: int):
    l = l.clone().requires_grad_()
    with fp64_throughout():  # the package casts to fp32 with .float()
        out = sinkhorn_knopps(l, iterations)
    (g,) = torch.autograd.grad(out, l, grad)
    return out.detach(), g


@pytest.mark.parametrize("iterations", [1, 2, 7, 20])
@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_closed_form_sinkhorn_equals_the_iterations_in_fp64(iterations, scale):
    torch.manual_seed(iterations)
    l = torch.randn(500, 2, 2, dtype=torch.float64) * scale
    grad = torch.randn_like(l)
    ours, ours_grad = _closed_form_and_grad(l, grad, iterations)
    theirs, theirs_grad = _package_and_grad(l, grad, iterations)
    assert (ours - theirs).abs().max() < FP64_AGREE
    assert (ours_grad - theirs_grad).abs().max() < FP64_AGREE * max(1.0, theirs_grad.abs().max().item())


def test_closed_form_sinkhorn_at_its_edges():
    # delta = 0 (the iterations keep each row's scale), tiny and huge delta: finite, and equal to the
    # package where its 1e-12 floor is not reached.
    l = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [3.0, 4.0]], [[1e-9, 0.0], [0.0, 0.0]],
                      [[30.0, 0.0], [0.0, 30.0]], [[200.0, 0.0], [0.0, 200.0]]], dtype=torch.float64)
    grad = torch.randn_like(l)
    ours, ours_grad = _closed_form_and_grad(l, grad, 20)
    assert torch.isfinite(ours).all() and torch.isfinite(ours_grad).all()
    theirs, theirs_grad = _package_and_grad(l[:3], grad[:3], 20)
    assert (ours[:3] - theirs).abs().max() < FP64_AGREE and (ours_grad[:3] - theirs_grad).abs().max() < FP64_AGREE
    assert torch.allclose(ours[3:], torch.eye(2, dtype=torch.float64).expand(2, 2, 2), atol=1e-12)


def _module_pair(seed: int = 0):
    """A package hyper-connection with perturbed parameters, and the same module fused."""
    torch.manual_seed(seed)
    plain = ManifoldConstrainedHyperConnections(2, dim=16)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    fused = copy.deepcopy(plain)
    assert fuse_hyper_connections(fused) == 1
    return plain, fused


def _module_step(module, x, y, dtype):
    """Width connection of streams x [..., 2, d], a branch, depth connection, a loss; (output,
    gradients by name)."""
    module = copy.deepcopy(module).to(dtype)
    x, y = x.to(dtype, copy=True).requires_grad_(), y.to(dtype, copy=True).requires_grad_()
    branch, add_residual = module(x)
    out = add_residual(torch.tanh(branch) + y)
    weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
    ((out * weights).sum() + branch.square().sum()).backward()
    grads = {n: p.grad for n, p in module.named_parameters()} | {"x": x.grad, "y": y.grad}
    return out.detach(), grads


def test_fused_module_equals_the_package_module():
    plain, fused = _module_pair()
    x, y = torch.randn(3, 5, 2, 16), torch.randn(3, 5, 16)
    with fp64_throughout():
        ref_out, ref = _module_step(plain, x, y, torch.float64)
        out, grads = _module_step(fused, x, y, torch.float64)
    assert (out - ref_out).abs().max() < FP64_AGREE and max_rel_diff(grads, ref) < FP64_AGREE
    fp32 = [_module_step(m, x, y, torch.float32) for m in (fused, plain)]
    assert_fp32_agree({"out": fp32[0][0]}, {"out": fp32[1][0]}, {"out": ref_out})
    assert_fp32_agree(fp32[0][1], fp32[1][1], ref)


def test_fused_module_in_bf16_follows_fp32():
    plain, fused = _module_pair()
    x, y = torch.randn(3, 5, 2, 16), torch.randn(3, 5, 16)
    ref_out, ref = _module_step(fused, x, y, torch.float32)
    out, grads = _module_step(fused, x, y, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads.values())
    assert max_rel_diff({"out": out.float()}, {"out": ref_out}) < 2e-2
    assert max_rel_diff({k: g.float() for k, g in grads.items()}, ref) < 5e-2


# Both stages trained through every pass, hyper-connections on.
CYCLE = ("model.num_residual_streams=2", "loss.latent_t_mode=random", "loss.cycle_stop_grad_latent=false")


def test_training_step_differs_from_the_package_by_rounding_only():
    cfg = tiny_config(*CYCLE)
    plain_cfg = tiny_config(*CYCLE, "model.fused_hyper_connections=false")
    batch = tiny_batch(cfg)
    fused_step, plain_step = tiny_step(cfg, perturb=0.05), tiny_step(plain_cfg, perturb=0.05)
    assert plain_step.model.state_dict().keys() == fused_step.model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain_step.model.state_dict().values(),
                                                   fused_step.model.state_dict().values()))
    fused, plain = (loss_and_grads(s, batch, at_step=5) for s in (fused_step, plain_step))
    ref = fp64_reference(plain_step, batch, at_step=5)
    assert_fp32_agree({"loss": fused[0]}, {"loss": plain[0]}, {"loss": ref[0]})
    assert_fp32_agree(fused[2], plain[2], ref[2])
    assert max_rel_diff(fp64_reference(fused_step, batch, at_step=5)[2], ref[2]) < 1e-10


def test_checkpointed_blocks_give_the_same_gradients():
    cfg = tiny_config(*CYCLE)
    batch = tiny_batch(cfg)
    plain = loss_and_grads(tiny_step(cfg, perturb=0.05), batch, at_step=5)
    checkpointed = loss_and_grads(tiny_step(tiny_config(*CYCLE, "model.activation_checkpointing=true"),
                                            perturb=0.05), batch, at_step=5)
    assert torch.equal(plain[0], checkpointed[0]) and max_rel_diff(checkpointed[2], plain[2]) == 0.0


def test_only_two_stream_hyper_connections_are_fused():
    kinds = {streams: {type(m) for m in build_model(tiny_config(f"model.num_residual_streams={streams}").model)
                       .modules() if isinstance(m, ManifoldConstrainedHyperConnections)} for streams in (2, 4)}
    assert kinds == {2: {FusedHyperConnections}, 4: {ManifoldConstrainedHyperConnections}}
    off = build_model(tiny_config("model.fused_hyper_connections=false").model)
    assert not any(isinstance(m, FusedHyperConnections) for m in off.modules())


def _ops_per_block(fused: bool) -> int:
    """Ops of one cycle_vae step per MMDiT block: the step at 3 blocks less the step at 2."""
    totals = []
    for blocks in (2, 3):
        cfg = tiny_config(f"model.n_blocks={blocks}", f"model.fused_hyper_connections={str(fused).lower()}")
        forward, backward = op_count.step_ops(tiny_step(cfg), tiny_batch(cfg))
        totals.append(forward.total + backward.total)
    return totals[1] - totals[0]


def test_fused_hyper_connections_cut_the_ops_per_block():
    # Measured with torch 2.13: 8,114 ops per block with the package's hyper-connections, 1,532
    # fused; 682 of them are the block's own (attention, feed-forward, norms: one stream).
    plain, fused = _ops_per_block(False), _ops_per_block(True)
    assert fused <= 1600 and plain >= 5 * fused, (plain, fused)


def test_op_count_command_prints_the_counts_as_its_last_line(capsys):
    assert op_count.main(["model.n_blocks=1", "loss.loss_type=l2t", "--time", "1", "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    counts = json.loads(lines[-1])
    assert len(lines) == 4 and counts["step_ops"] == counts["forward_ops"] + counts["backward_ops"] > 0
    assert counts["n_blocks"] == 1 and counts["fused_hyper_connections"] and counts["step_time_s"] > 0
