"""The MMDiT's two-stream hyper-connections as two fused autograd functions.

A manifold-constrained hyper-connection (``hyper_connections.mHCv2``, the module the MMDiT builds
around each attention and feed-forward branch) mixes its residual streams x [tokens, s, d] with
per-token weights: RMS-normalised x times learned projections gives logits; a sigmoid of one
column weights the streams into the branch input, 20 Sinkhorn iterations (alternate column and
row normalisation) turn an s x s block into the residual mixing matrix, and twice the sigmoid of
another column weights the branch output back into each stream. Written with the package's small
ops that is about 920 aten ops per hyper-connection in one forward and backward (four per block),
most of them the 40 normalisations of [tokens, 2, 2] tensors; on a GPU each op is a kernel launch.
Here the width connection is one autograd function and the depth connection another, about 107
ops together, with the same numbers (fp32 rounding apart).

The 20 iterations in closed form. The iterate after each row normalisation is diag(r) A diag(c)
with A = exp(L), L the 2 x 2 logits, and the ratio r1/r0 follows a Moebius map whose k-fold power
is, with eps = (L00 + L01 - L10 - L11) / 2 and delta = (L00 - L01 - L10 + L11) / 2,

    log(r1/r0) after k iterations = softplus(eps + log tau) - softplus(-eps + log tau),
    tau = |tanh(k asinh(1 / sinh(delta)))|     (k = 0: tau = 0, r unchanged; k -> inf: tau -> 1)

and the last column and row normalisations are a log-softmax over the rows of L + log r and a
softmax over the columns: the 20 iterations are k = 19 and those two. Every step is a positive
sum or a smooth function, so it keeps fp32 rounding where the iterations do; the backward is the
analytic derivative of those few steps. Where the package's normalisation divides by its 1e-12
floor (logits ~25 apart) its result is no longer that of the 20 iterations; this one still is.

``fuse_hyper_connections(module)`` switches every two-stream hyper-connection under ``module`` to
the fused functions (class swap; parameters, their names and the state dict stay the package's);
other stream counts keep the package's code.
"""
from __future__ import annotations

import functools
import math

import torch
from hyper_connections.mHCv2 import ManifoldConstrainedHyperConnections, sinkhorn_knopps
from torch import Tensor, nn

STREAMS = 2  # the closed form is that of a 2 x 2 Sinkhorn
_EPS = 1e-12  # the RMS norm's floor (F.normalize's), as in the package
# |delta| < 1e-17: tau is 1 within fp64 and the reciprocal below stays finite. |delta| > 80: log r
# is under 1e-33 (each row keeps its scale) and sinh(delta) stays finite in fp32.
_RECIPROCAL_MAX, _DELTA_MAX = math.sinh(40.0), 80.0


@functools.lru_cache(maxsize=None)
def _basis(device: torch.device, dtype: torch.dtype, k: int) -> tuple[Tensor, Tensor]:
    """The flat logits [beta, pre, L_i0, L_i1 for rows i = 0, 1] to (-eps, eps, delta) [8, 3]; and
    its transpose with the delta row scaled by -2k (the derivative of log tau, see the backward)."""
    with torch.inference_mode(False):
        basis = torch.tensor([[0, 0, 0], [0, 0, 0], [-1, 1, 1], [-1, 1, -1],
                              [0, 0, 0], [0, 0, 0], [1, -1, -1], [1, -1, 1]], dtype=dtype, device=device) / 2
        return basis, (basis.t() * torch.tensor([[1], [1], [-2 * k]], dtype=dtype, device=device)).contiguous()


class HyperMix(torch.autograd.Function):
    """The width connection: (branch input [..., d], residual streams [tokens, s, d], gate
    [tokens, s, 1]) from the streams x [..., s, d] and the hyper-connection's parameters. The gate
    is the sigmoid whose double weights the branch output into each stream (``HyperAdd``)."""

    @staticmethod
    def forward(ctx, x, gamma, dynamic_alpha, dynamic_beta, pre_scale, residual_scale, post_scale,
                static_alpha, static_beta, iterations):
        *lead, s, d = x.shape
        x3 = x.float().reshape(-1, s, d).contiguous()  # the first block's streams are expanded views
        basis, back = _basis(x3.device, x3.dtype, iterations - 1)
        # Logit columns [beta, pre, residual 0..s-1]. The RMS norm's sqrt(d) (1 + gamma) and the
        # columns' scales are folded into the projection, so the tokens see one matmul.
        w = torch.cat([dynamic_beta.float(), dynamic_alpha.float().view(d, s + 1)], 1)
        post = post_scale.float() if post_scale.dim() else post_scale.float().reshape(1)
        scales = torch.cat([post, pre_scale.float()] + [residual_scale.float()] * s)
        factor = torch.addr(scales, gamma.float(), scales, beta=math.sqrt(d), alpha=math.sqrt(d))
        w_scaled = w * factor
        static = torch.cat([static_beta.float().view(s, 1), static_alpha.float()], 1)
        norm = torch.linalg.vector_norm(x3, dim=-1, keepdim=True).clamp_min(_EPS)
        projected = torch.mm(x3.view(-1, d), w_scaled).view(-1, s, s + 2)
        logits = torch.addcdiv(static, projected, norm)

        gate_logits, l = logits.split([2, s], -1)
        gates = torch.sigmoid(gate_logits)
        gate, pre = gates.split(1, -1)  # gate: half the weight of the branch output back into each stream
        mixing, sinkhorn = _sinkhorn_2x2(logits, l, basis, iterations - 1)
        alpha = torch.cat([pre, mixing], -1)  # [tokens, s (from), 1 + s (to)]
        branch, streams = torch.bmm(alpha.transpose(1, 2), x3).split([1, s], 1)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x3, w, w_scaled, factor, scales, gamma, projected, norm, gates, alpha, back,
                                  *sinkhorn)
            ctx.dtypes = [t.dtype for t in (x, gamma, dynamic_alpha, dynamic_beta, pre_scale, residual_scale,
                                            post_scale, static_alpha, static_beta)]
            ctx.x_shape, ctx.post_shape = x.shape, post_scale.shape
        return branch.view(*lead, d).to(x.dtype), streams.to(x.dtype), gate

    @staticmethod
    def backward(ctx, grad_branch, grad_streams, grad_gate):
        x3, w, w_scaled, factor, scales, gamma, projected, norm, gates, alpha, back, *sinkhorn = ctx.saved_tensors
        n, s, d = x3.shape
        grad_mixed = torch.cat([grad_branch.float().reshape(n, 1, d), grad_streams.float()], 1)
        grad_x = torch.bmm(alpha, grad_mixed)
        grad_alpha = torch.bmm(x3, grad_mixed.transpose(1, 2))
        grad_pre, grad_mixing = grad_alpha.split([1, s], -1)
        grad_l, grad_coords = _sinkhorn_2x2_backward(grad_mixing, *sinkhorn)
        grad_gates = torch.ops.aten.sigmoid_backward(torch.cat([grad_gate, grad_pre], -1), gates)
        grad_logits = torch.addmm(torch.cat([grad_gates, grad_l], -1).view(n, -1), grad_coords, back)

        # logits = static + (x @ w_scaled) / max(|x|, eps): the projection, then the norm.
        grad_projected = grad_logits.view(n, s, s + 2) / norm
        grad_flat = grad_projected.view(-1, s + 2)
        grad_w_scaled = torch.mm(x3.view(-1, d).t(), grad_flat)
        grad_x = torch.addmm(grad_x.view(-1, d), grad_flat, w_scaled.t()).view(n, s, d)
        radial = (grad_projected * projected).sum(-1, keepdim=True) / norm.square()
        grad_x = torch.addcmul(grad_x, x3, radial, value=-1)

        grad_dynamic_beta, grad_dynamic_alpha = (grad_w_scaled * factor).split([1, s + 1], 1)
        grad_factor = grad_w_scaled * w
        root_d = math.sqrt(d)
        grad_gamma = torch.addmv(gamma.float(), grad_factor, scales, beta=0, alpha=root_d)
        grad_scales = torch.addmv(grad_factor.sum(0), grad_factor.t(), gamma.float(), beta=root_d, alpha=root_d)
        grad_post, grad_pre, grad_residual = grad_scales.split([1, 1, s])
        grad_static_beta, grad_static_alpha = grad_logits.sum(0).view(s, s + 2).split([1, s + 1], 1)
        grads = (grad_x.view(ctx.x_shape), grad_gamma, grad_dynamic_alpha.unsqueeze(0), grad_dynamic_beta, grad_pre,
                 grad_residual.sum(0, keepdim=True), grad_post if len(ctx.post_shape) else grad_post.reshape(()),
                 grad_static_alpha, grad_static_beta.unsqueeze(-1))
        return (*(g.to(t) for g, t in zip(grads, ctx.dtypes)), None)


def _sinkhorn_2x2(logits: Tensor, l: Tensor, basis: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
    """The package's ``sinkhorn_knopps(l, iters=k + 1)`` of l [tokens, 2, 2] (a slice of logits),
    in closed form (see the module docstring); and what its backward needs."""
    eps, delta = torch.mm(logits.view(logits.shape[0], -1), basis).split([2, 1], 1)  # (-eps, eps), delta
    csch = torch.sinh(delta.clamp(-_DELTA_MAX, _DELTA_MAX)).reciprocal().clamp(-_RECIPROCAL_MAX, _RECIPROCAL_MAX)
    ka = torch.asinh(csch) * k
    shifted = eps + torch.tanh(ka).abs().log()  # (-eps, eps) + log tau
    log_rows = nn.functional.softplus(shifted)  # log r, up to a constant
    by_column = torch.log_softmax(l + log_rows[..., None], -2)
    mixing = torch.softmax(by_column, -1)
    # d log tau / d delta = -2k |csch delta| / sinh(2 k a), a = asinh(csch delta); -2k is in the basis.
    # One iteration (k = 0): log tau = -inf whatever delta.
    slope = csch.abs() / torch.sinh(ka * 2) if k else torch.zeros_like(csch)
    return mixing, [mixing, by_column, shifted, slope]


def _sinkhorn_2x2_backward(grad: Tensor, mixing: Tensor, by_column: Tensor, shifted: Tensor,
                           slope: Tensor) -> tuple[Tensor, Tensor]:
    """(gradient of L through the final normalisations, gradient of (-eps, eps, delta))."""
    grad = torch.ops.aten._softmax_backward_data(grad, mixing, -1, mixing.dtype)
    grad_l = torch.ops.aten._log_softmax_backward_data(grad, by_column, -2, by_column.dtype)
    grad_shifted = torch.ops.aten.softplus_backward(grad_l.sum(-1), shifted, 1, 20)
    grad_delta = grad_shifted.sum(-1, keepdim=True) * slope
    return grad_l, torch.cat([grad_shifted, grad_delta], 1)


class HyperAdd(torch.autograd.Function):
    """The depth connection: streams + 2 gate * branch output, as [..., s, d]."""

    @staticmethod
    def forward(ctx, streams, gate, branch):
        n, s, d = streams.shape
        branch3 = branch.float().reshape(n, 1, d)
        out = torch.addcmul(streams.float(), gate, branch3, value=2).view(*branch.shape[:-1], s, d)
        ctx.save_for_backward(gate, branch3)
        ctx.dtypes = (streams.dtype, gate.dtype, branch.dtype)
        ctx.branch_shape = branch.shape
        return out.to(streams.dtype)

    @staticmethod
    def backward(ctx, grad):
        gate, branch3 = ctx.saved_tensors
        n, s, _ = gate.shape
        grad3 = grad.float().reshape(n, s, -1)
        grad_branch = torch.baddbmm(branch3, gate.transpose(1, 2), grad3, beta=0, alpha=2).view(ctx.branch_shape)
        grad_gate = torch.baddbmm(gate, grad3, branch3.transpose(1, 2), beta=0, alpha=2)
        return tuple(g.to(t) for g, t in zip((grad3, grad_gate, grad_branch), ctx.dtypes))


class FusedHyperConnections(ManifoldConstrainedHyperConnections):
    """A two-stream hyper-connection whose width and depth connections are ``HyperMix`` and
    ``HyperAdd``. Made by ``fuse_hyper_connections`` from a built module, never constructed."""

    sinkhorn_iterations: int

    def width_connection(self, residuals):
        branch, streams, beta = HyperMix.apply(
            residuals, self.norm.gamma, self.dynamic_alpha_fn, self.dynamic_beta_fn, self.pre_branch_scale,
            self.residual_scale, self.h_post_scale, self.static_alpha, self.static_beta, self.sinkhorn_iterations)
        return branch, streams, dict(beta=beta)

    def depth_connection(self, branch_output, residuals, *, beta):
        return HyperAdd.apply(residuals, beta, branch_output)


def _sinkhorn_iterations(module: ManifoldConstrainedHyperConnections) -> int:
    fn = module.residual_mix_constraint_fn
    if not (isinstance(fn, functools.partial) and fn.func is sinkhorn_knopps and fn.keywords.get("iters", 0) >= 1):
        raise ValueError("fused hyper-connections compute the package's default Sinkhorn (sinkhorn_knopps with "
                         f"iters >= 1); this module uses {fn!r}. Set model.fused_hyper_connections: false.")
    return fn.keywords["iters"]


def fuse_hyper_connections(module: nn.Module) -> int:
    """Switch every two-stream hyper-connection under ``module`` to the fused functions; returns
    how many. The fused functions cover the MMDiT's configuration (one fraction, one input view,
    one alpha proposal, no stream mixing before the norm, no dropout or residual transform)."""
    fused = 0
    for m in module.modules():
        if type(m) is not ManifoldConstrainedHyperConnections or m.num_residual_streams != STREAMS:
            continue
        plain = (m.num_fracs == 1 and m.num_input_views == 1 and m.num_dynamic_alpha_proposals == 1
                 and m.maybe_mix_streams is None and m.dropout.p == 0 and m.add_branch_out_to_residual
                 and isinstance(m.residual_transform, nn.Identity) and m.branch is None)
        if not plain:
            raise ValueError("fused hyper-connections cover the MMDiT's hyper-connections only (one fraction, "
                             "view and proposal, no dropout); set model.fused_hyper_connections: false.")
        m.sinkhorn_iterations = _sinkhorn_iterations(m)
        m.__class__ = FusedHyperConnections
        fused += 1
    return fused
