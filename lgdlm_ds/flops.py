"""Model FLOPs of a training step, counted from the config, and the peak they are measured against.

What is counted: the matrix products of the model's arithmetic, 2 FLOPs per multiply-add — every
dense layer (time conditioning, latent encoder, each block's adaLN and branch-gate modulations,
q/k/v and output projections, feed-forward), attention's scores and weighted values, the
hyper-connections' logit projection, stream mixing and branch write-back, and the heads — in every
model pass the objective runs at that step: four for cycle_vae (base L2T, base T2L, cycle_text,
cycle_latent; a cycle term only where ``ObjectivePlan.cycle_terms_at`` says it trains on the
micro-batch, the one-row stand-ins of ``fixed_passes`` not counted), one for l2t, t2l and
unconditional, the step's mode for random and sequential. The vocabulary head counts only where it
runs: at every real token of an L2T pass, at the masked tokens of an unconditional pass (their
expected number: the mean mask probability times the real tokens), the latent head once per row
of a T2L or unconditional pass. Backward is twice the forward (a product's gradient is two
products of the same size), so a step costs 3 x its forward; this holds the convention for every
product, also where autograd skips a gradient no parameter needs (a first layer's input gradient).
With ``loss.cycle_latent_sampling: gumbel_st`` the base L2T head also forms soft tokens at every
real token while cycle_latent runs: one [V] x [V, H] product with the embedding, forward and
backward; with ``loss.gumbel_hard`` the forward is a lookup and only the backward's product with
the embedding is arithmetic (straight-through).

These are model FLOPs, not hardware FLOPs: activation checkpointing's recomputed forward, flash
attention's recomputed scores in backward, the chunked cross-entropy's per-pass weight gradients,
elementwise ops, norms and softmaxes are work the device does but not the model's arithmetic, so
utilisation compares runs by useful work (tests/test_flops.py accounts for each difference).

Only real tokens: a row's tokens are its non-padding text tokens (``attention_mask``) plus its
latent token, and its attention covers their pairs. A batch is trimmed to its longest row and
every pass computes those positions, padding included; that padding is work but not model FLOPs,
so padding lowers MFU (``data.length_buckets`` removes most of it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .config import Config, ModelConfig
from .diffusion import MASK_EPS
from .plan import ObjectivePlan

# Forward + backward per forward FLOP of a matrix product.
TRAIN_FACTOR = 3
# The MMDiT's feed-forward width, in multiples of the hidden size (x_transformers' FeedForward).
FF_MULT = 4
# Mean mask probability of an unconditional pass: (1 - eps) * E[clip(t, eps, 1)], t ~ U(0, 1)
# (diffusion.mask_probability); the text head runs at the masked positions only.
MEAN_MASKED = (1 - MASK_EPS) * (1 + MASK_EPS**2) / 2

# Dense (no structured sparsity) peak TFLOP/s of one device by compute dtype, from the vendors'
# data sheets; the first name contained in the device's name applies. fp32 is the plain FP32 rate:
# PyTorch does not run fp32 matmuls as TF32 unless told to.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
)


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs of the model's matrix products, by what they scale with."""
    per_token: int          # all blocks, per text or latent token: projections, feed-forward, hyper-connections
    per_pair: int           # all blocks' attention, per (query, key) pair of one row
    per_row: int            # once per row: conditioning, latent encoder, the blocks' modulations
    per_text_target: int    # vocabulary head, per position it runs at
    per_latent_target: int  # latent head, per row it runs on

    @classmethod
    def from_config(cls, m: ModelConfig) -> ModelFlops:
        from .model import TIMESTEP_FREQUENCIES  # here: the model's packages load slowly, and the log needs none
        H, C, D, V, s, n = m.hidden_size, m.cond_dim, m.latent_dim, m.vocab_size, m.num_residual_streams, m.n_blocks
        A = m.attn_heads * m.attn_dim_head
        # Per hyper-connection and token: s streams projected to s + 2 logits, mixed into the branch
        # input and s streams, and the branch output written back into the s streams.
        hyper = 0 if s == 1 else 2 * s * H * (s + 2) + 2 * s * (s + 1) * H + 2 * s * H
        block_token = 2 * H * 3 * A + 2 * A * H + 2 * 2 * H * FF_MULT * H + 2 * hyper  # attention and FF branches
        conditioning = 2 * (2 * TIMESTEP_FREQUENCIES * C + 2 * C * C) + 2 * 2 * C * 4 * C + 2 * 4 * C * C
        latent_encoder = 2 * D * 2 * H + 2 * 2 * H * H
        block_row = 4 * 2 * C * 2 * H + 2 * C * 4 * H  # adaLN (scale, shift) x 4, branch gates of both modalities
        return cls(per_token=n * block_token, per_pair=n * 2 * 2 * A,
                   per_row=conditioning + latent_encoder + n * block_row,
                   per_text_target=2 * H * V, per_latent_target=2 * H * 2 * H + 2 * 2 * H * D)

    def trunk(self, lengths: Tensor) -> Tensor:
        """Forward FLOPs of one model call (trunk only) over rows of ``lengths`` text tokens each."""
        tokens = lengths.double() + 1  # and the latent token
        return self.per_token * tokens.sum() + self.per_pair * tokens.square().sum() + self.per_row * len(lengths)


class StepFlops:
    """Model FLOPs (forward + backward) of one micro-batch of a run's objective."""

    def __init__(self, cfg: Config):
        self.model = ModelFlops.from_config(cfg.model)
        self.plan = ObjectivePlan.from_config(cfg)
        self.soft_tokens = cfg.loss.cycle_latent_sampling == "gumbel_st"
        self.hard_tokens = cfg.loss.gumbel_hard

    def forward(self, real: Tensor, step: int) -> Tensor:
        """Forward model FLOPs at (0-based) ``step`` of a micro-batch whose real tokens are ``real``
        [B, S] (its attention mask), as a float64 tensor on its device."""
        m, mode = self.model, self.plan.mode_at(step)
        lengths = real.sum(1)
        trunk, tokens, rows = m.trunk(lengths), lengths.sum().double(), len(lengths)
        l2t = trunk + m.per_text_target * tokens
        t2l = trunk + m.per_latent_target * rows
        if mode == "l2t":
            return l2t
        if mode == "t2l":
            return t2l
        if mode == "unconditional":
            return t2l + m.per_text_target * MEAN_MASKED * tokens
        run_text, run_lat = self.plan.cycle_terms_at(step)
        soft = self._soft_tokens_at(step) and not self.hard_tokens
        return l2t + t2l + run_text * l2t + run_lat * t2l + soft * m.per_text_target * tokens

    def __call__(self, real: Tensor, step: int) -> Tensor:
        """Forward + backward: three times the forward, and hard soft tokens' one product (backward only)."""
        hard = self._soft_tokens_at(step) and self.hard_tokens
        return TRAIN_FACTOR * self.forward(real, step) + hard * self.model.per_text_target * real.sum().double()

    def _soft_tokens_at(self, step: int) -> bool:
        """Whether the base L2T head forms soft tokens (y @ E at every real token) at ``step``."""
        return self.soft_tokens and self.plan.mode_at(step) == "cycle_vae" and self.plan.cycle_terms_at(step)[1]


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode (products and attention, as executed: hardware FLOPs), also counting
    the CPU's flash attention, for which torch has no formula, with the GPU kernels' formulas."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v)})


def peak_tflops(configured: float, device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak TFLOP/s of one device: ``training.peak_tflops`` when set, else PEAK_TFLOPS's entry for
    the CUDA device's name and ``dtype`` (bf16 or fp32); None where neither says (the CPU, other
    GPUs): then no MFU is reported."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name, key = torch.cuda.get_device_name(device), "bf16" if dtype == torch.bfloat16 else "fp32"
    return next((peaks.get(key) for part, peaks in PEAK_TFLOPS if part in name), None)


def utilisation(flops: float, seconds: float, devices: int, peak: float | None) -> tuple[float, float | None]:
    """(model TFLOP/s per device, MFU: that over the peak, None without a peak)."""
    tflops = flops / max(seconds, 1e-9) / devices / 1e12
    return tflops, (tflops / peak if peak else None)
