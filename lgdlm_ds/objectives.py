"""Training objectives: l2t, t2l, unconditional, random, sequential and cycle_vae.

``TrainStep`` is the module DeepSpeed wraps: ``forward(batch, step)`` runs every model pass of the
objective and returns ``(loss, metrics)``, so the engine sees one forward and one backward per
micro-step. A *pass* is a set of rows with their inputs and what is supervised on them;
``run_stage`` concatenates the passes of one dependency stage into a single model call.

cycle_vae has two stages:
  stage 1: base L2T (all-[MASK] text, clean latent -> text CE, pseudo tokens y_hat)
           base T2L (clean text, noised latent -> latent loss, x0 estimate x0_hat)
  stage 2: cycle_text   (all-[MASK] text, latent x0_hat -> CE against the true text)
           cycle_latent (pseudo text y_hat, noised latent -> latent loss against the true latent)
Two model calls on 2B rows instead of four on B: half the ZeRO-3 parameter gathers, the same
losses and gradients.

Non-finite values are never replaced: they reach the loss and the metrics, and the engine's
skip policy decides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BASE_MODES, Config
from .diffusion import LatentDiffusion, mask_probability, mask_tokens
from .plan import ObjectivePlan


def _same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise RuntimeError(f"{what}: prediction {tuple(a.shape)} and target {tuple(b.shape)} differ; "
                           "refusing to broadcast.")


def trim_padding(ids: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the trailing columns that are padding in every row. Exact: padded keys are masked out
    of attention and padded positions are never supervised, so every pass then skips that work."""
    used = int(real.any(0).nonzero().max()) + 1 if real.any() else 1
    return (ids, real) if used == ids.shape[1] else (ids[:, :used], real[:, :used])


@dataclass
class Pass:
    """Rows of one model pass: inputs, and what is supervised on them."""
    tokens: Tensor                 # [b, S] text input to the model
    text_t: Tensor                 # [b] float32
    latents: Tensor                # [b, D] latent input to the model
    latent_t: Tensor               # [b] float32
    attention_mask: Tensor         # [b, S] bool, True at real tokens
    text_targets: Tensor | None = None    # [b, S]: CE targets at text_loss_mask positions
    text_loss_mask: Tensor | None = None  # [b, S] bool
    text_weights: Tensor | None = None    # [b, S] per-position CE weight (None: 1)
    text_denominator: Tensor | None = None  # what the weighted CE sum is divided by
    latent_target: Tensor | None = None   # [b, D]: the latent head is trained toward this


@dataclass
class PassResult:
    text_loss: Tensor | None = None
    text_accuracy: Tensor | None = None
    sampled_tokens: Tensor | None = None  # [b, S]: input tokens with loss positions re-drawn
    latent_pred: Tensor | None = None     # [b, D]


def l2t_pass(ids: Tensor, real: Tensor, latents: Tensor, mask_token_id: int, latent_t: Tensor | None = None) -> Pass:
    """All real tokens [MASK] at text t=1, the latent at ``latent_t`` (default 0: clean); CE over
    every real token. Training and evaluation both build their L2T passes here."""
    b = ids.shape[0]
    tokens = torch.where(real, torch.full_like(ids, mask_token_id), ids)
    latent_t = torch.zeros(b, device=ids.device) if latent_t is None else latent_t
    return Pass(tokens, torch.ones(b, device=ids.device), latents, latent_t, real,
                text_targets=ids, text_loss_mask=real, text_denominator=real.sum())


def run_stage(model: nn.Module, passes: list[Pass], categorical: bool = False) -> list[PassResult]:
    """One model call over the concatenated rows of ``passes``; each head runs only on the rows
    that need it, text CE only at the supervised positions (chunked, see text_head)."""
    cat = lambda name: torch.cat([getattr(p, name) for p in passes])  # noqa: E731
    text_h, latent_h = model.trunk(cat("tokens"), cat("latents"), cat("text_t"), cat("latent_t"),
                                   cat("attention_mask"))
    rows = torch.tensor([0] + [p.tokens.shape[0] for p in passes]).cumsum(0).tolist()
    spans = list(zip(rows[:-1], rows[1:]))
    results = [PassResult() for _ in passes]

    text_idx = [i for i, p in enumerate(passes) if p.text_targets is not None]
    if text_idx:
        masks = [passes[i].text_loss_mask for i in text_idx]
        hidden = torch.cat([text_h[spans[i][0]:spans[i][1]][m] for i, m in zip(text_idx, masks)])
        targets = torch.cat([passes[i].text_targets[m] for i, m in zip(text_idx, masks)])
        weights = torch.cat([passes[i].text_weights[m] if passes[i].text_weights is not None
                             else torch.ones(int(m.sum()), device=m.device) for i, m in zip(text_idx, masks)])
        counts = [int(m.sum()) for m in masks]
        sums, _, argmax, sampled = model.text_head(hidden, targets, categorical, weights, counts)
        for i, m, sum_i, am_i, s_i, t_i in zip(text_idx, masks, sums, argmax.split(counts), sampled.split(counts),
                                               targets.split(counts)):
            p, r = passes[i], results[i]
            r.text_loss = sum_i / p.text_denominator.clamp_min(1)
            r.text_accuracy = (am_i == t_i).float().mean() if t_i.numel() else sum_i.new_zeros(())
            r.sampled_tokens = p.tokens.masked_scatter(m, s_i)

    latent_idx = [i for i, p in enumerate(passes) if p.latent_target is not None]
    if latent_idx:
        pred = model.latent_head(torch.cat([latent_h[spans[i][0]:spans[i][1]] for i in latent_idx]))
        for i, pred_i in zip(latent_idx, pred.split([passes[i].tokens.shape[0] for i in latent_idx])):
            results[i].latent_pred = pred_i
    return results


def run_stage_unfused(model: nn.Module, passes: list[Pass], categorical: bool = False) -> list[PassResult]:
    """The same as ``run_stage`` with one model call per pass (for tests and benchmarks)."""
    return [run_stage(model, [p], categorical)[0] for p in passes]


class TrainStep(nn.Module):
    """model + objective; ``forward(batch, step) -> (loss, metrics)`` with metrics as detached
    0-dim tensors (the engine averages them across ranks when it logs)."""

    def __init__(self, model: nn.Module, cfg: Config, fuse: bool = True):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.plan = ObjectivePlan.from_config(cfg)
        self.diffusion = LatentDiffusion.from_config(cfg.diffusion)
        self._run = run_stage if fuse else run_stage_unfused
        self._carry: dict | None = None  # stage 1 -> stage 2 hand-over in the stage-wise mode

    # ---- pass builders

    def l2t_pass(self, ids: Tensor, real: Tensor, latents: Tensor) -> Pass:
        """The L2T pass from a clean latent (see ``l2t_pass``)."""
        return l2t_pass(ids, real, latents, self.cfg.data.mask_token_id)

    def t2l_pass(self, tokens: Tensor, real: Tensor, x0: Tensor, t: Tensor, eps: Tensor) -> Pass:
        """Clean text at t=0, latent noised at t; the head predicts the diffusion target."""
        return Pass(tokens, torch.zeros_like(t), self.diffusion.add_noise(x0, t, eps), t, real,
                    latent_target=self.diffusion.target(x0, eps, t))

    def unconditional_pass(self, ids: Tensor, real: Tensor, x0: Tensor) -> Pass:
        """Text masked at t ~ U(0,1), latent noised at t' ~ U(0,1); both supervised."""
        b = ids.shape[0]
        text_t = torch.rand(b, device=ids.device)
        latent_t, eps = torch.rand(b, device=ids.device), torch.randn_like(x0)
        tokens, masked = mask_tokens(ids, text_t, real, self.cfg.data.mask_token_id)
        p = self.t2l_pass(tokens, real, x0, latent_t, eps)
        p.text_t, p.text_targets, p.text_loss_mask = text_t, ids, masked
        if self.cfg.loss.text_elbo_weighting:  # MDLM: E[#masked] = p * #real, so 1/p keeps it unbiased
            p.text_weights = (1.0 / mask_probability(text_t))[:, None].expand_as(ids)
            p.text_denominator = real.sum()
        else:
            p.text_denominator = masked.sum()
        return p

    # ---- losses

    def latent_loss(self, pred: Tensor, target: Tensor, what: str) -> Tensor:
        _same_shape(pred, target, what)
        pred, target = pred.float(), target.float()
        if self.cfg.loss.latent_loss_type == "normalized_mse":
            pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
        return F.mse_loss(pred, target)

    def _t2l_metrics(self, p: Pass, r: PassResult) -> dict[str, Tensor]:
        x0 = self.diffusion.predict_x0(p.latents, p.latent_t, r.latent_pred.detach())
        return {"t_lat_mean": p.latent_t.mean(), "latent_pred_norm": r.latent_pred.detach().float().norm(dim=-1).mean(),
                "x0_pred_norm": x0.float().norm(dim=-1).mean()}

    # ---- forward

    def forward(self, batch: dict[str, Tensor], step: int, stage: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The whole objective for one micro-batch. ``stage`` (1 or 2, cycle_vae with
        loss.cycle_stagewise only) runs one stage: the engine calls stage 1, backward, then stage 2
        on the same batch, backward; together they give the plain mode's loss and gradients."""
        ids, x0 = batch["input_ids"], batch["latent"]
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
        ids, real = trim_padding(ids, real)
        _same_shape(x0, x0.new_empty(ids.shape[0], self.cfg.model.latent_dim), "batch['latent']")
        mode = self.plan.mode_at(step)
        if mode == "cycle_vae":
            loss, metrics = self.cycle_vae(ids, real, x0, step, stage)
        else:
            loss, metrics = self.single_mode(mode, ids, real, x0, step)
            metrics["mode_index"] = torch.tensor(float(BASE_MODES.index(mode)), device=ids.device)
        metrics = {k: v.detach().float() for k, v in metrics.items()}
        metrics["nonfinite_terms"] = (~torch.stack(list(metrics.values())).isfinite()).sum().float()
        return loss, metrics

    def single_mode(self, mode: str, ids: Tensor, real: Tensor, x0: Tensor, step: int):
        w_lat = self.cfg.loss.latent_loss_weight
        if mode == "l2t":
            (r,) = self._run(self.model, [self.l2t_pass(ids, real, x0)])
            return r.text_loss, {"text_loss": r.text_loss, "text_accuracy": r.text_accuracy}
        if mode == "t2l":
            t = self.plan.latent_time.sample(ids.shape[0], ids.device, step)
            p = self.t2l_pass(ids, real, x0, t, torch.randn_like(x0))
            (r,) = self._run(self.model, [p])
            lat = self.latent_loss(r.latent_pred, p.latent_target, "t2l latent")
            return w_lat * lat, {"latent_loss": lat, **self._t2l_metrics(p, r)}
        p = self.unconditional_pass(ids, real, x0)
        (r,) = self._run(self.model, [p])
        lat = self.latent_loss(r.latent_pred, p.latent_target, "unconditional latent")
        return r.text_loss + w_lat * lat, {"text_loss": r.text_loss, "text_accuracy": r.text_accuracy,
                                           "latent_loss": lat, **self._t2l_metrics(p, r)}

    def cycle_vae(self, ids: Tensor, real: Tensor, x0: Tensor, step: int, stage: int | None):
        if stage is None:
            loss1, metrics, carry = self.cycle_stage1(ids, real, x0, step)
            loss2, metrics2 = self.cycle_stage2(ids, real, x0, carry)
            return loss1 + loss2, {**metrics, **metrics2}
        if not self.plan.stagewise:
            raise RuntimeError("TrainStep(stage=...) is the stage-wise mode: set loss.cycle_stagewise: true.")
        if stage == 1:
            loss1, metrics, self._carry = self.cycle_stage1(ids, real, x0, step)
            return loss1, metrics
        if stage != 2 or self._carry is None:
            raise RuntimeError(f"stage-wise cycle_vae runs stage 1 then stage 2 on the same batch; got stage {stage}"
                               f"{' without a stage 1 before it' if stage == 2 else ''}.")
        carry, self._carry = self._carry, None
        return self.cycle_stage2(ids, real, x0, carry)

    def cycle_stage1(self, ids: Tensor, real: Tensor, x0: Tensor, step: int):
        """Base L2T + base T2L in one model call; returns the loss, metrics and what stage 2
        needs (the x0 estimate, the pseudo tokens, stage 2's noise, the ramp weights)."""
        lo, plan = self.cfg.loss, self.plan
        w_text, w_lat = plan.cycle_text.at(step), plan.cycle_latent.at(step)
        b = ids.shape[0]
        # Draw all noise before any model call: fused, unfused and stage-wise runs see the same numbers.
        t_base, eps_base = plan.latent_time.sample(b, ids.device, step), torch.randn_like(x0)
        t_cyc, eps_cyc = plan.latent_time.sample(b, ids.device, step), torch.randn_like(x0)
        # In the stage-wise mode stage 2 always runs (weight 0 during warmup): its micro-step
        # must have a graph for the engine's backward.
        run_text, run_lat = plan.stagewise or w_text > 0, plan.stagewise or w_lat > 0

        base_l2t, base_t2l = self.l2t_pass(ids, real, x0), self.t2l_pass(ids, real, x0, t_base, eps_base)
        r_l2t, r_t2l = self._run(self.model, [base_l2t, base_t2l],
                                 categorical=run_lat and lo.cycle_latent_sampling == "categorical")
        base_lat = self.latent_loss(r_t2l.latent_pred, base_t2l.latent_target, "base_t2l latent")
        loss = r_l2t.text_loss + lo.latent_loss_weight * base_lat
        metrics = {"base_l2t_text_loss": r_l2t.text_loss, "base_l2t_token_accuracy": r_l2t.text_accuracy,
                   "base_t2l_latent_loss": base_lat, "cycle_text_weight": torch.tensor(w_text, device=ids.device),
                   "cycle_latent_weight": torch.tensor(w_lat, device=ids.device), **self._t2l_metrics(base_t2l, r_t2l)}
        x0_hat = self.diffusion.predict_x0(base_t2l.latents, t_base, r_t2l.latent_pred) if run_text else None
        carry = {"w_text": w_text, "w_lat": w_lat, "run_text": run_text, "run_lat": run_lat,
                 "x0_hat": x0_hat.detach() if run_text and lo.cycle_stop_grad_latent else x0_hat,
                 # pseudo tokens carry no gradient (sampled under the chunked head, detached)
                 "pseudo": r_l2t.sampled_tokens.detach(), "t_cyc": t_cyc, "eps_cyc": eps_cyc}
        return loss, metrics, carry

    def cycle_stage2(self, ids: Tensor, real: Tensor, x0: Tensor, carry: dict):
        """cycle_text (L2T from the x0 estimate) + cycle_latent (T2L from the pseudo tokens) in
        one model call; a term whose ramp weight is 0 is skipped (except stage-wise, see above)."""
        passes: list[Pass] = []
        if carry["run_text"]:
            passes.append(self.l2t_pass(ids, real, carry["x0_hat"]))
        if carry["run_lat"]:
            passes.append(self.t2l_pass(carry["pseudo"], real, x0, carry["t_cyc"], carry["eps_cyc"]))
        results = iter(self._run(self.model, passes)) if passes else iter(())
        loss, metrics = x0.new_zeros(()), {}
        if carry["run_text"]:
            r = next(results)
            loss = loss + carry["w_text"] * r.text_loss
            metrics["cycle_text_loss"] = r.text_loss
        if carry["run_lat"]:
            p, r = passes[-1], next(results)
            cyc_lat = self.latent_loss(r.latent_pred, p.latent_target, "cycle_latent latent")
            loss = loss + carry["w_lat"] * cyc_lat
            metrics["cycle_latent_loss"] = cyc_lat
        return loss, metrics
