"""The vocabulary head, with a cross-entropy that never holds [positions, V] logits in full.

A text pass's logits (B*S*V floats) are its largest tensor. ``TextHead(hidden, targets=...)``
computes cross-entropy chunk by chunk in forward and recomputes each chunk's logits in backward,
so only one chunk of logits is alive at a time. It is one module call, so under ZeRO-3 the
weight is gathered once for all chunks.
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
    def forward(ctx, h, weight, bias, targets, chunk, categorical):
        n = h.shape[0]
        ce = torch.empty(n, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        lse = torch.empty_like(ce)
        argmax = torch.empty(n, dtype=torch.long, device=h.device)
        sampled = torch.empty_like(argmax) if categorical else argmax
        for i in range(0, n, chunk):
            logits = _chunk_logits(h[i:i + chunk], weight, bias)
            lse[i:i + chunk] = logits.logsumexp(-1)
            ce[i:i + chunk] = lse[i:i + chunk] - logits.gather(1, targets[i:i + chunk, None])[:, 0]
            argmax[i:i + chunk] = logits.argmax(-1)
            if categorical:  # Gumbel-max: an exact sample of softmax(logits), one chunk at a time
                u = torch.rand_like(logits).clamp_min_(torch.finfo(logits.dtype).tiny)
                sampled[i:i + chunk] = (logits - torch.log(-torch.log(u))).argmax(-1)
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(argmax, sampled)
        return ce, argmax, sampled

    @staticmethod
    def backward(ctx, grad_ce, _grad_argmax, _grad_sampled):
        h, weight, bias, targets, lse = ctx.saved_tensors
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device)
        for i in range(0, h.shape[0], ctx.chunk):
            hc = h[i:i + ctx.chunk]
            # d ce / d logits = softmax - onehot(target)
            g = (_chunk_logits(hc, weight, bias) - lse[i:i + ctx.chunk, None]).exp_()
            g[torch.arange(g.shape[0], device=g.device), targets[i:i + ctx.chunk]] -= 1
            g.mul_(grad_ce[i:i + ctx.chunk, None])
            grad_h[i:i + ctx.chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)
            grad_w += g.t() @ hc.to(acc)
            grad_b += g.sum(0)
        return grad_h, grad_w.to(weight.dtype), grad_b.to(bias.dtype), None, None, None


class TextHead(nn.Linear):
    """Linear(H, V) with the older init (N(0, 0.02), bias 0) and a chunked cross-entropy mode."""

    def __init__(self, hidden: int, vocab_size: int):
        super().__init__(hidden, vocab_size)
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: Tensor, targets: Tensor | None = None, categorical: bool = False):
        """Without targets: logits [..., V]. With targets (hidden [N, H], targets [N]): returns
        (ce [N], argmax [N], sample [N]) where sample is a categorical draw from the logits when
        ``categorical`` and the argmax otherwise; only ce carries gradient."""
        if targets is None:
            return super().forward(hidden)
        if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
            raise ValueError(f"chunked CE needs hidden [N, H] and targets [N], got {tuple(hidden.shape)} "
                             f"and {tuple(targets.shape)}.")
        chunk = max(1, CHUNK_ELEMENTS // self.out_features)
        return _ChunkedCrossEntropy.apply(hidden, self.weight, self.bias, targets, chunk, categorical)
