"""The vocabulary head, with a cross-entropy that never holds [positions, V] logits in full.

A text pass's logits (B*S*V floats) are its largest tensor. ``TextHead(hidden, targets, ...)``
computes the cross-entropy chunk by chunk, so only one chunk of logits is alive at a time, and it
returns per-pass weighted sums of it: a loss is linear in those sums, so the gradient of every
chunk's logits (softmax - onehot, times the position's weight) is known in forward. It is reduced
there, while the chunk is at hand, to the gradients of the hidden rows, the weight and the bias;
backward only scales them by each pass's incoming gradient. That costs the same arithmetic as an
unchunked head (no logits are recomputed) and holds one fp32 weight-sized gradient per pass. It is
one module call, so under ZeRO-3 the weight is gathered once for all chunks.

Soft tokens (``loss.cycle_latent_sampling: gumbel_st``): the same call can also return, for every
row, the expected token embedding ``y @ E`` with ``y = softmax((logits + g) / tau)``, g Gumbel
noise, tau the temperature, E the token embedding matrix (Jang et al. 2017; Maddison et al. 2017).
With ``hard`` the forward value is E[argmax(logits + g)] (an exact categorical sample, Gumbel-max)
and the logits get the soft one's gradient (straight-through: (onehot - y.detach() + y) @ E, as
torch's gumbel_softmax(hard=True)), E the sampled rows'. cycle_latent's T2L pass reads them, so its
gradient reaches the L2T logits and, through them, the trunk, the head and the embedding. Forward
keeps one chunk of logits at a time and only the [N, H] result; backward recomputes each chunk's
probabilities (the Gumbel noise again from the same seeded generator, drawn chunk by chunk in the
same order) and reduces them at once to the gradients of h, W, b and E: two [N, V, H] GEMMs in
forward (logits, y @ E) and five in backward, for the memory of one chunk. The embedding is another
module's weight: with gumbel_st, TrainStep registers it as an external parameter of the head, so
ZeRO-3 gathers it for this call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Rows of logits per chunk: about 2**23 elements (32 MiB in fp32) whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 23


def chunk_logits(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
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
            logits = chunk_logits(h[i:j], weight, bias)
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


@dataclass(frozen=True)
class SoftTokens:
    """How the soft tokens of one text-head call are drawn: Gumbel-softmax at ``temperature``,
    forward value hard (straight-through) or soft, Gumbel noise from a generator seeded ``seed``."""
    temperature: float
    hard: bool
    seed: int


def gumbel_noise(generator: torch.Generator, rows: int, vocab: int, dtype: torch.dtype, device) -> Tensor:
    """[rows, vocab] standard Gumbel noise in ``dtype``, the next draw of ``generator``. The uniforms
    are drawn in fp32 whatever ``dtype``, so one seed gives fp32 and fp64 the same noise."""
    u = torch.rand(rows, vocab, generator=generator, device=device).clamp_min_(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u.to(dtype)))


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class _GumbelSoftEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, embedding, soft: SoftTokens, chunk: int):
        n = h.shape[0]
        out = torch.empty(n, embedding.shape[1], dtype=embedding.dtype, device=h.device)
        tokens = torch.empty(n, dtype=torch.long, device=h.device)
        gen = _generator(soft.seed, h.device)
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            z = chunk_logits(h[i:j], weight, bias)
            z += gumbel_noise(gen, j - i, z.shape[1], z.dtype, z.device)
            tokens[i:j] = z.argmax(-1)
            if soft.hard:
                out[i:j] = embedding[tokens[i:j]]
            else:
                out[i:j] = z.div_(soft.temperature).softmax(-1).to(embedding.dtype) @ embedding
        ctx.save_for_backward(h, weight, bias, embedding, tokens)
        ctx.soft, ctx.chunk = soft, chunk
        ctx.mark_non_differentiable(tokens)
        return out, tokens

    @staticmethod
    def backward(ctx, grad_out, _unused):
        h, weight, bias, embedding, tokens = ctx.saved_tensors
        soft, chunk, n = ctx.soft, ctx.chunk, h.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device)
        grad_e = torch.zeros(embedding.shape, dtype=torch.promote_types(embedding.dtype, torch.float32),
                             device=embedding.device)
        gen = _generator(soft.seed, h.device)
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            z = chunk_logits(h[i:j], weight, bias)
            z += gumbel_noise(gen, j - i, z.shape[1], z.dtype, z.device)
            y = z.div_(soft.temperature).softmax(-1)
            g_out = grad_out[i:j].to(embedding.dtype)
            if soft.hard:  # the value used was the sampled token's row: its gradient goes there
                grad_e.index_add_(0, tokens[i:j], g_out.to(grad_e.dtype))
            else:
                grad_e += (y.t().to(embedding.dtype) @ g_out).to(grad_e.dtype)
            g_y = (g_out @ embedding.t()).to(y.dtype)
            # softmax backward, then 1/tau: d logits = y * (g_y - <g_y, y>) / tau
            g = y.mul_(g_y - (g_y * y).sum(-1, keepdim=True)).div_(soft.temperature)
            grad_h[i:j] = (g.to(weight.dtype) @ weight).to(h.dtype)
            grad_w += g.t().to(weight.dtype) @ h[i:j].to(weight.dtype)
            grad_b += g.sum(0).to(acc)
        return (grad_h, grad_w.to(weight.dtype), grad_b.to(bias.dtype), grad_e.to(embedding.dtype), None, None)


def soft_embeddings(hidden: Tensor, weight: Tensor, bias: Tensor, embedding: Tensor, soft: SoftTokens,
                    chunk: int) -> tuple[Tensor, Tensor]:
    """(embeddings [N, H_e], sampled tokens [N]) for hidden [N, H] under logits hidden W^T + b and
    the embedding matrix [V, H_e], ``chunk`` rows of logits at a time. Only the embeddings carry
    gradient."""
    return _GumbelSoftEmbedding.apply(hidden, weight, bias, embedding, soft, chunk)


INIT_STD = 0.02  # the older model's init of the head's weight


class TextHead(nn.Linear):
    """Linear(H, V) with the older init (N(0, INIT_STD), bias 0) and a chunked cross-entropy mode."""

    def __init__(self, hidden: int, vocab_size: int):
        super().__init__(hidden, vocab_size)
        nn.init.normal_(self.weight, std=INIT_STD)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: Tensor, targets: Tensor | None = None, categorical: bool = False,
                weights: Tensor | None = None, pass_sizes: tuple[int, ...] | None = None,
                soft: SoftTokens | None = None, embedding: Tensor | None = None):
        """Without targets: logits [..., V]. With targets (hidden [N, H], targets [N]): returns
        (sums [P], ce [N], argmax [N], sample [N]). The N rows are ``pass_sizes`` consecutive
        groups (default: one), ``sums[p]`` is the sum over group p of weights * ce (weights
        default 1) and is the only output that carries gradient; ``sample`` is a categorical
        draw from the logits when ``categorical`` and the argmax otherwise. With ``soft`` and the
        token ``embedding`` matrix [V, H_e]: (sums, ce, argmax, sample, soft embeddings [N, H_e]),
        ``sample`` then being the Gumbel-max token of the soft embeddings' noise, and the soft
        embeddings carry gradient too (see the module doc)."""
        if targets is None:
            return super().forward(hidden)
        n = hidden.shape[0]
        pass_sizes = (n,) if pass_sizes is None else tuple(pass_sizes)
        if hidden.dim() != 2 or targets.shape != (n,) or sum(pass_sizes) != n:
            raise ValueError(f"chunked CE needs hidden [N, H], targets [N] and pass sizes adding up to N, got "
                             f"{tuple(hidden.shape)}, {tuple(targets.shape)} and {pass_sizes}.")
        weights = torch.ones(n, device=hidden.device) if weights is None else weights
        chunk = max(1, CHUNK_ELEMENTS // self.out_features)
        ce_out = _ChunkedCrossEntropy.apply(hidden, self.weight, self.bias, targets, weights, pass_sizes, chunk,
                                            categorical and soft is None)
        if soft is None:
            return ce_out
        emb, sampled = soft_embeddings(hidden, self.weight, self.bias, embedding, soft, chunk)
        return (*ce_out[:3], sampled, emb)
