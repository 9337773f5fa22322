"""The latent prior regulariser: its value against the formula in fp64, the target it reads, and
moments over every rank's rows (two gloo processes against one holding all the rows)."""
import json

import pytest
import torch
import torch.multiprocessing as mp

from lgdlm_ds.latent_prior import LatentPrior
from core_utils import packed_config, tiny_batch, tiny_config, tiny_step
from engine_utils import free_port

FP32_EPS = torch.finfo(torch.float32).eps


def _reference(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """The docstring's R in fp64, the variance as the mean squared deviation (no cancellation)."""
    x, mean, var = x.double(), mean.double(), var.double()
    m = x.mean(0)
    v = (x - m).pow(2).mean(0)
    s2 = var.mean()
    return (m - mean).pow(2).mean() / s2 + (v - var).pow(2).mean() / s2 ** 2


def test_prior_is_the_moment_mismatch():
    g = torch.Generator().manual_seed(0)
    b, d = 64, 16
    x = 0.5 + 2.0 * torch.randn(b, d, generator=g)  # moments far from the target's: no cancellation below
    mean, var = 0.1 * torch.randn(d, generator=g), 0.5 + torch.rand(d, generator=g)
    got = LatentPrior(mean, var).loss(x)
    # fp32: sums of b terms (relative error <= b eps each), squared and averaged over d: a few b eps.
    assert got.item() == pytest.approx(_reference(x, mean, var).item(), rel=8 * b * FP32_EPS)
    # Scale-free: latents and target scaled together give the same value.
    assert LatentPrior(3 * mean, 9 * var).loss(3 * x).item() == pytest.approx(got.item(), rel=8 * b * FP32_EPS)
    assert LatentPrior(mean, var).loss(mean + var.sqrt() * torch.randn(100_000, d, generator=g)).item() < 1e-3


def test_target_is_standard_or_the_recorded_statistics(packed_data):
    meta = json.loads((packed_data / "metadata.json").read_text())
    data = LatentPrior.from_config(packed_config(packed_data, "loss.latent_prior_weight=1",
                                                 "loss.latent_prior_target=data"))
    assert torch.equal(data.mean, torch.tensor(meta["latent_mean"], dtype=torch.float64).float())
    assert torch.equal(data.var, torch.tensor(meta["latent_std"], dtype=torch.float64).pow(2).float())
    for overrides in (["loss.latent_prior_target=standard"], ["loss.latent_prior_target=data",
                                                               "data.standardize_latents=true"]):
        std = LatentPrior.from_config(packed_config(packed_data, "loss.latent_prior_weight=1", *overrides))
        assert torch.equal(std.mean, torch.zeros(384)) and torch.equal(std.var, torch.ones(384))


def test_training_adds_the_weighted_prior_on_the_t2l_estimates():
    for mode in ("t2l", "unconditional", "cycle_vae"):
        cfg = tiny_config(f"loss.loss_type={mode}", "loss.latent_prior_weight=0.5",
                          "loss.latent_prior_warmup_steps=2")
        step, batch = tiny_step(cfg), tiny_batch(cfg)
        torch.manual_seed(1)
        before, m0 = step(batch, 1)
        torch.manual_seed(1)
        after, m1 = step(batch, 2)
        assert "latent_prior_loss" not in m0 and m1["latent_prior_loss"] > 0
        off = tiny_step(tiny_config(f"loss.loss_type={mode}"))
        torch.manual_seed(1)
        plain, _ = off(batch, 2)
        assert after.item() == pytest.approx(plain.item() + 0.5 * m1["latent_prior_loss"].item(), rel=1e-6)


def _rank(rank: int, port: int, x: torch.Tensor, mean, var, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    part = x[rank * 3:(rank + 1) * 3 + rank].clone().requires_grad_()  # rows 0-2 and 3-6: unequal splits
    loss = LatentPrior(mean, var).loss(part)
    loss.backward()
    out[rank] = (loss.detach(), part.grad)
    torch.distributed.destroy_process_group()


def test_moments_cover_every_ranks_rows_and_the_gradient_does_not_depend_on_the_split():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64) * 1.5 + 0.3
    mean, var = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    full = x.clone().requires_grad_()
    expected = LatentPrior(mean, var).loss(full)
    expected.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(free_port(), x, mean, var, out), nprocs=2)
        results = dict(out)
    # The engine averages the ranks' gradients: each rank's, halved, is its rows' part of the whole.
    grads = torch.cat([results[0][1], results[1][1]]) / 2
    # The prior computes in fp32 and the split changes only the order of its sums of 7 rows: a
    # few dozen roundings at most.
    tol = 64 * FP32_EPS
    for loss, _ in results.values():
        assert loss.item() == pytest.approx(expected.item(), rel=tol)
    assert torch.allclose(grads, full.grad, rtol=tol, atol=tol * full.grad.abs().max().item())
