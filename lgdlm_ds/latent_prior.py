"""The latent prior regulariser: moment matching of predicted latents to the data's.

R = mean_d (m_d - mu_d)^2 / s^2 + mean_d (v_d - sigma_d^2)^2 / s^4, where m and v are the batch mean
and (biased) per-dimension variance of the T2L x0 estimates, mu and sigma^2 those of the training
latents, and s^2 = mean_d sigma_d^2 their average variance. Dividing by the average instead of per
dimension keeps R free of the latents' scale without blowing up a near-constant dimension
(all-MiniLM-L6-v2 has three, std ~ 1e-6).

The moments are over the rows of one micro-step on all ranks: each rank all-reduces its sums, and
autograd runs through its own rows only. The engine averages gradients over ranks, so each rank's
part of the sums is scaled by the world size in the backward: the gradient then equals that of
one process holding every rank's rows, whatever the split.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import Tensor

from .config import Config
from .data import read_metadata


class LatentPrior:
    """Target moments ``mean`` and ``var`` ([D] float32) and the loss of a batch of estimates."""

    def __init__(self, mean: Tensor, var: Tensor):
        self.mean, self.var = mean.float(), var.float()
        self.scale = self.var.mean()

    @classmethod
    def from_config(cls, cfg: Config) -> LatentPrior:
        """N(0, I), or the statistics prepare recorded for the training split (loss.latent_prior_target)."""
        d = cfg.model.latent_dim
        if cfg.loss.latent_prior_target == "standard" or cfg.data.standardize_latents:
            return cls(torch.zeros(d), torch.ones(d))
        meta = read_metadata(cfg.data.path)
        mean, std = (torch.tensor(meta[k], dtype=torch.float64) for k in ("latent_mean", "latent_std"))
        if mean.shape != (d,) or std.shape != (d,) or not (mean.isfinite().all() and std.isfinite().all()):
            raise ValueError(f"{cfg.data.path}: latent_mean/latent_std in metadata.json are not {d} finite numbers "
                             "(model.latent_dim), so loss.latent_prior_target: data has no target; prepare the "
                             "data again, or use loss.latent_prior_target: standard.")
        return cls(mean.float(), std.pow(2).float())

    def loss(self, x0_hat: Tensor) -> Tensor:
        """R of the estimates ``x0_hat`` [b, D] of this rank, the moments over every rank's rows."""
        x = x0_hat.float()
        mean, var = self.mean.to(x.device), self.var.to(x.device)
        sums = torch.stack([x.sum(0), x.pow(2).sum(0)])
        count = torch.tensor(float(x.shape[0]), device=x.device)
        if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            world = torch_dist.get_world_size()
            total = torch.cat([sums.detach().flatten(), count[None]])
            torch_dist.all_reduce(total)
            # Value: every rank's sums; gradient: this rank's rows, times the world size (see above).
            sums = total[:-1].view_as(sums) + world * (sums - sums.detach())
            count = total[-1]
        m = sums[0] / count
        v = sums[1] / count - m.pow(2)
        return (m - mean).pow(2).mean() / self.scale + (v - var).pow(2).mean() / self.scale.pow(2)
