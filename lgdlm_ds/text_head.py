"""The vocabulary head, with a cross-entropy that never holds [positions, V] logits in full.

A text pass's logits (B*S*V floats) are its largest tensor. ``TextHead(hidden, targets, ...)``
computes the cross-entropy chunk by chunk, so only one chunk of logits is alive at a time, and it
returns per-pass weighted sums of it: a loss is linear in those sums, so the gradient of every
chunk's logits (softmax - onehot, times the position's weight) is known in forward. It is reduced
there, while the chunk is at hand, to the gradients of the hidden rows, the weight and the bias;
backward only scales them by each pass's incoming gradient. That costs the same arithmetic as an
unchunked head (no logits are recomputed) and holds one fp32 weight-sized gradient per pass. It is
one module call, so under ZeRO-3 the weight is gathered once for all chunks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# Rows of logits per chunk: about 2**23 elements (32 MiB in fp32) whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 23


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    # Cross-entropy in at least fp32 even when the weights are bf16 (fp64 stays fp64 for tests).
    return torch.addmm(bias, h, weight.t()).to(torch.promote_types(h.dtype, torch.float32))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, weights, pass_sizes, chunk, categorical):
        n, acc = h.shape[0], torch.promote_types(weight.dtype, torch.float32)
        ce = torch.empty(n, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        argmax = torch.empty(n, dtype=torch.long, device=h.device)
        sampled = torch.empty_like(argmax) if categorical else argmax
        grads = any(ctx.needs_input_grad[:3])
        if grads:
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros((len(pass_sizes), *weight.shape), dtype=acc, device=weight.device)
            grad_b = torch.zeros((len(pass_sizes), *bias.shape), dtype=acc, device=bias.device)
        starts = [sum(pass_sizes[:p]) for p in range(len(pass_sizes) + 1)]
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            logits = _chunk_logits(h[i:j], weight, bias)
            lse = logits.logsumexp(-1)
            ce[i:j] = lse - logits.gather(1, targets[i:j, None])[:, 0]
            argmax[i:j] = logits.argmax(-1)
            if categorical:  # Gumbel-max: an exact sample of softmax(logits), one chunk at a time
                u = torch.rand_like(logits).clamp_min_(torch.finfo(logits.dtype).tiny)
                sampled[i:j] = (logits - torch.log(-torch.log(u))).argmax(-1)
            if grads:  # d(weight_i * ce_i) / d logits_i = weight_i * (softmax_i - onehot(target_i))
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(j - i, device=g.device), targets[i:j]] -= 1
                g.mul_(weights[i:j, None].to(g.dtype))
                grad_h[i:j] = (g.to(weight.dtype) @ weight).to(h.dtype)
                gt = g.t().to(weight.dtype)  # the weight's precision for the GEMM, accumulated in fp32
                for p in range(len(pass_sizes)):  # the passes this chunk's rows belong to
                    lo, hi = max(i, starts[p]), min(j, starts[p + 1])
                    if lo < hi:
                        grad_w[p] += gt[:, lo - i:hi - i] @ h[lo:hi].to(weight.dtype)
                        grad_b[p] += g[lo - i:hi - i].sum(0).to(acc)
        sums = torch.stack([(ce[a:b] * weights[a:b].to(ce.dtype)).sum() for a, b in zip(starts[:-1], starts[1:])])
        if grads:
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            ctx.pass_sizes = pass_sizes
            ctx.dtypes = (weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(ce, argmax, sampled)
        return sums, ce, argmax, sampled

    @staticmethod
    def backward(ctx, grad_sums, *_unused):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_sums.to(grad_w.dtype)
        per_row = torch.repeat_interleave(grad_sums.to(grad_h.dtype),
                                          torch.tensor(ctx.pass_sizes, device=grad_h.device))
        return (grad_h * per_row[:, None], torch.tensordot(scale, grad_w, dims=1).to(ctx.dtypes[0]),
                (scale @ grad_b).to(ctx.dtypes[1]), None, None, None, None, None)


class TextHead(nn.Linear):
    """Linear(H, V) with the older init (N(0, 0.02), bias 0) and a chunked cross-entropy mode."""

    def __init__(self, hidden: int, vocab_size: int):
        super().__init__(hidden, vocab_size)
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: Tensor, targets: Tensor | None = None, categorical: bool = False,
                weights: Tensor | None = None, pass_sizes: tuple[int, ...] | None = None):
        """Without targets: logits [..., V]. With targets (hidden [N, H], targets [N]): returns
        (sums [P], ce [N], argmax [N], sample [N]). The N rows are ``pass_sizes`` consecutive
        groups (default: one), ``sums[p]`` is the sum over group p of weights * ce (weights
        default 1) and is the only output that carries gradient; ``sample`` is a categorical
        draw from the logits when ``categorical`` and the argmax otherwise."""
        if targets is None:
            return super().forward(hidden)
        n = hidden.shape[0]
        pass_sizes = (n,) if pass_sizes is None else tuple(pass_sizes)
        if hidden.dim() != 2 or targets.shape != (n,) or sum(pass_sizes) != n:
            raise ValueError(f"chunked CE needs hidden [N, H], targets [N] and pass sizes adding up to N, got "
                             f"{tuple(hidden.shape)}, {tuple(targets.shape)} and {pass_sizes}.")
        weights = torch.ones(n, device=hidden.device) if weights is None else weights
        chunk = max(1, CHUNK_ELEMENTS // self.out_features)
        return _ChunkedCrossEntropy.apply(hidden, self.weight, self.bias, targets, weights, pass_sizes, chunk,
                                          categorical)
