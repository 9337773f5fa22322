"""Diffusion math: the text absorbing-mask schedule and the latent Gaussian diffusion.

Time is float32 in [0, 1] everywhere. The latent schedule is the older code's discrete table
(1000 steps, betas clipped to [1e-4, 0.9999]) so checkpoints trained on it see the same noise
levels; ``index`` is the one place where continuous t becomes a table row.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MASK_EPS = 1e-4


# ---------------------------------------------------------------- text: absorbing mask (MDLM)

def mask_probability(t: Tensor) -> Tensor:
    """Probability that a token is [MASK] at text time t: (1 - 1e-4) * clip(t, 1e-4, 1)."""
    return (1.0 - MASK_EPS) * t.float().clamp(MASK_EPS, 1.0)


def elbo_weight(t: Tensor) -> Tensor:
    """Weight of a masked token's cross-entropy in the continuous-time MDLM bound (Sahoo et al.
    2024, eq. 10): -alpha'(t) / (1 - alpha(t)) with alpha(t) = 1 - mask_probability(t) =
    1 - (1 - 1e-4) t is exactly 1/t, the (1 - 1e-4) cancelling. Below t = 1e-4, where the mask
    probability stops falling, the weight stays 1e4. The bound on -log p(text) is the sum over
    masked tokens of weight x CE, averaged over t ~ U(0, 1)."""
    return 1.0 / t.float().clamp(MASK_EPS, 1.0)


def antithetic_times(noise: Tensor, index: Tensor, total: int) -> Tensor:
    """Stratified ("antithetic", MDLM's antithetic_sampling) times: sample ``index`` j of a batch of
    ``total`` gets (j + noise) / total, noise ~ U(0, 1) its own, so the batch covers [0, 1) with one
    time per stratum of width 1/total: the same marginal U(0, 1), less variance of the batch mean."""
    return ((index.double() + noise.double()) / total).float()


def mask_tokens(tokens: Tensor, t: Tensor, real: Tensor, mask_token_id: int) -> tuple[Tensor, Tensor]:
    """Replace each real (non-padding) token by [MASK] independently with mask_probability(t).
    Returns (noisy tokens, bool [B,S] of masked positions). Padding is never masked."""
    p = mask_probability(t)[:, None]
    masked = (torch.rand(tokens.shape, device=tokens.device) < p) & real
    return torch.where(masked, torch.full_like(tokens, mask_token_id), tokens), masked


# ---------------------------------------------------------------- latent: Gaussian diffusion

def _alpha_bar_table(schedule: str, num_timesteps: int) -> Tensor:
    T = num_timesteps
    if schedule == "cosine":  # Nichol & Dhariwal, s = 0.008
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
    elif schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    elif schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (0.02 - 1e-4) + 1e-4
    else:
        raise ValueError(f"unknown latent schedule '{schedule}': use cosine, linear or sigmoid.")
    return torch.cumprod(1 - betas.clamp(1e-4, 0.9999), dim=0)


class LatentDiffusion:
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with ab = alpha_bar(t); targets epsilon, x0 or v.

    Writing a = sqrt(ab) and s = sqrt(1 - ab) (a^2 + s^2 = 1): v = a eps - s x0, so
    x0 = a x_t - s v and eps = s x_t + a v need no division. Only x0 from an epsilon prediction,
    (x_t - s eps) / a, divides by a, which vanishes at t -> 1 (cosine: 1.6e-5 at t = 1); that
    division uses max(a, min_sqrt_alpha_bar).
    """

    def __init__(self, schedule: str = "cosine", num_timesteps: int = 1000,
                 parameterization: str = "x0", min_sqrt_alpha_bar: float = 0.05):
        if parameterization not in ("epsilon", "x0", "v"):
            raise ValueError(f"unknown latent parameterization '{parameterization}': use epsilon, x0 or v.")
        self.parameterization = parameterization
        self.num_timesteps = num_timesteps
        self.min_sqrt_alpha_bar = min_sqrt_alpha_bar
        self._alpha_bar = _alpha_bar_table(schedule, num_timesteps).float()
        self._on_device: dict[torch.device, Tensor] = {}

    @classmethod
    def from_config(cls, d) -> "LatentDiffusion":
        return cls(d.latent_schedule, d.latent_num_timesteps, d.latent_parameterization, d.x0_min_sqrt_alpha_bar)

    def index(self, t: Tensor) -> Tensor:
        """Continuous t in [0, 1] (float32) -> table row floor(t * (T - 1))."""
        if t.dtype != torch.float32:
            raise TypeError(f"latent time must be float32 in [0, 1], got {t.dtype} (bf16 rounds 0.9999 to 1).")
        return (t.clamp(0.0, 1.0) * (self.num_timesteps - 1)).floor().long()

    def alpha_bar(self, t: Tensor) -> Tensor:
        table = self._on_device.get(t.device)
        if table is None:
            table = self._on_device[t.device] = self._alpha_bar.to(t.device)
        return table[self.index(t)]

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(ab), sqrt(1 - ab)) as [B, 1] for broadcasting over the latent dimension."""
        ab = self.alpha_bar(t)[:, None]
        return ab.sqrt(), (1 - ab).sqrt()

    def add_noise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        a, s = self.coefficients(t)
        return a * x0 + s * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the latent head is trained to predict for this parameterization."""
        if self.parameterization == "x0":
            return x0
        if self.parameterization == "epsilon":
            return eps
        a, s = self.coefficients(t)
        return a * eps - s * x0

    def predict_x0(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """x0 estimate from the head's prediction (guarded division for epsilon, see class doc)."""
        if self.parameterization == "x0":
            return pred
        a, s = self.coefficients(t)
        if self.parameterization == "v":
            return a * x_t - s * pred
        return (x_t - s * pred) / a.clamp_min(self.min_sqrt_alpha_bar)

    def predict_eps(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """epsilon estimate from the head's prediction."""
        if self.parameterization == "epsilon":
            return pred
        a, s = self.coefficients(t)
        if self.parameterization == "v":
            return s * x_t + a * pred
        return (x_t - a * pred) / s  # s >= sqrt(1e-4) = 0.01: betas are clipped at 1e-4
