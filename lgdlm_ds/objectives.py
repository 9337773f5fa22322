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

Options (off by default): the latent prior on every T2L x0 estimate (latent_prior.py);
alternation, where stage 2 runs its cycle terms only at some steps and stand-in rows otherwise, so
every step calls the same modules in the same order (ZeRO-3's prefetch trace); and a restricted
cycle_text term, run as a micro-step of its own whose backward reaches only a group of
parameters (``RestrictedUpdates``).

Non-finite values are never replaced: they reach the loss and the metrics, and the engine's
skip policy decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BASE_MODES, Config, ConfigError
from .diffusion import LatentDiffusion, antithetic_times, elbo_weight, mask_tokens
from .latent_prior import LatentPrior
from .plan import RESTRICTED_STAGE, ObjectivePlan
from .schedules import schedule_from
from .text_head import SoftTokens


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
    soft_mask: Tensor | None = None       # [b, S] bool: positions that read soft_embeddings
    soft_embeddings: Tensor | None = None  # [soft_mask.sum(), H] input embeddings there (text_head)


@dataclass
class PassResult:
    text_loss: Tensor | None = None
    text_accuracy: Tensor | None = None
    token_ce: Tensor | None = None        # [text_loss_mask.sum()] detached CE per supervised position
    sampled_tokens: Tensor | None = None  # [b, S]: input tokens with loss positions re-drawn
    soft_embeddings: Tensor | None = None  # [text_loss_mask.sum(), H]: soft tokens there (run_stage soft)
    latent_pred: Tensor | None = None     # [b, D]


def l2t_pass(ids: Tensor, real: Tensor, latents: Tensor, mask_token_id: int, latent_t: Tensor | None = None) -> Pass:
    """All real tokens [MASK] at text t=1, the latent at ``latent_t`` (default 0: clean); CE over
    every real token. Training and evaluation both build their L2T passes here."""
    b = ids.shape[0]
    tokens = torch.where(real, torch.full_like(ids, mask_token_id), ids)
    latent_t = torch.zeros(b, device=ids.device) if latent_t is None else latent_t
    return Pass(tokens, torch.ones(b, device=ids.device), latents, latent_t, real,
                text_targets=ids, text_loss_mask=real, text_denominator=real.sum())


def _soft_inputs(passes: list[Pass]) -> tuple[Tensor, Tensor] | None:
    """The trunk's soft_tokens argument for the concatenated rows: (mask, embeddings) or None."""
    soft = [p for p in passes if p.soft_mask is not None]
    if not soft:
        return None
    mask = torch.cat([p.soft_mask if p.soft_mask is not None else torch.zeros_like(p.attention_mask)
                      for p in passes])
    return mask, torch.cat([p.soft_embeddings for p in soft])


def run_stage(model: nn.Module, passes: list[Pass], categorical: bool = False,
              soft: SoftTokens | None = None) -> list[PassResult]:
    """One model call over the concatenated rows of ``passes``; each head runs only on the rows
    that need it, text CE only at the supervised positions (chunked, see text_head). ``soft``: the
    text head also returns soft tokens at the supervised positions (PassResult.soft_embeddings)."""
    cat = lambda name: torch.cat([getattr(p, name) for p in passes])  # noqa: E731
    text_h, latent_h = model.trunk(cat("tokens"), cat("latents"), cat("text_t"), cat("latent_t"),
                                   cat("attention_mask"), soft_tokens=_soft_inputs(passes))
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
        head = model.text_head(hidden, targets, categorical, weights, counts, soft,
                               None if soft is None else model.text_encoder.token_embed.weight)
        sums, ce, argmax, sampled = head[:4]
        soft_emb = head[4].split(counts) if soft is not None else [None] * len(counts)
        for i, m, sum_i, ce_i, am_i, s_i, t_i, e_i in zip(text_idx, masks, sums, ce.split(counts), argmax.split(counts),
                                                          sampled.split(counts), targets.split(counts), soft_emb):
            p, r = passes[i], results[i]
            r.text_loss = sum_i / p.text_denominator.clamp_min(1)
            r.token_ce, r.soft_embeddings = ce_i.detach(), e_i
            r.text_accuracy = (am_i == t_i).float().mean() if t_i.numel() else sum_i.new_zeros(())
            r.sampled_tokens = p.tokens.masked_scatter(m, s_i)

    latent_idx = [i for i, p in enumerate(passes) if p.latent_target is not None]
    if latent_idx:
        pred = model.latent_head(torch.cat([latent_h[spans[i][0]:spans[i][1]] for i in latent_idx]))
        for i, pred_i in zip(latent_idx, pred.split([passes[i].tokens.shape[0] for i in latent_idx])):
            results[i].latent_pred = pred_i
    return results


def run_stage_unfused(model: nn.Module, passes: list[Pass], categorical: bool = False,
                      soft: SoftTokens | None = None) -> list[PassResult]:
    """The same as ``run_stage`` with one model call per pass (for tests and benchmarks)."""
    return [run_stage(model, [p], categorical, soft)[0] for p in passes]


def drop_latent(p: Pass, rows: Tensor, noise: Tensor) -> None:
    """The null condition of an L2T pass at ``rows`` (bool [b]): the latent replaced by ``noise``
    at latent t = 1, the diffusion's state of knowing nothing about it (loss.cond_dropout)."""
    p.latents = torch.where(rows[:, None], noise.to(p.latents.dtype), p.latents)
    p.latent_t = torch.where(rows, torch.ones_like(p.latent_t), p.latent_t)


def drop_text(p: Pass, rows: Tensor, mask_token_id: int) -> None:
    """The null condition of a T2L pass at ``rows`` (bool [b]): every real token [MASK] at text
    t = 1, the text diffusion's state of knowing nothing about it (loss.cond_dropout)."""
    p.tokens = torch.where(rows[:, None] & p.attention_mask, torch.full_like(p.tokens, mask_token_id), p.tokens)
    p.text_t = torch.where(rows, torch.ones_like(p.text_t), p.text_t)


class _NoGradient(torch.autograd.Function):
    """0 in the forward, a zero gradient in the backward: a stand-in pass's output enters the loss,
    so its modules run their backward (as ZeRO-3's prefetch trace expects) and train nothing."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.new_zeros(ctx.shape)


class RestrictedUpdates:
    """Zeroes the gradient of every parameter of ``model`` outside ``patterns`` while ``active``.

    A tensor hook on each such parameter runs before its gradient is accumulated, so before the
    hooks through which DeepSpeed's ZeRO-2 and ZeRO-3 reduce and partition it: those then reduce
    zeros. requires_grad is never touched (ZeRO fixes the trainable set when it partitions), and
    the engine's backward is used as it is. The micro-step of the restricted term is the only
    backward run while ``active``, so only that term's gradient is cut."""

    def __init__(self, model: nn.Module, patterns: tuple[str, ...]):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.group = [n for n in names if any(fnmatchcase(n, pat) for pat in patterns)]
        unmatched = [pat for pat in patterns if not any(fnmatchcase(n, pat) for n in names)]
        if unmatched:
            raise ConfigError(f"config key 'loss.cycle_text_params': {unmatched} match no parameter name of the "
                              f"model (e.g. {names[0]}, {names[-1]}); list them with model.named_parameters().")
        self.active = False
        for name, p in model.named_parameters():
            if p.requires_grad and name not in self.group:
                p.register_hook(self._cut)

    def _cut(self, grad: Tensor) -> Tensor:
        return torch.zeros_like(grad) if self.active else grad


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
        lo = cfg.loss
        self.gumbel_temperature = schedule_from(lo, "gumbel_temperature", lo.gumbel_temperature,
                                                lo.gumbel_temperature_start)
        if lo.cycle_latent_sampling == "gumbel_st":
            # The text head reads the token embedding for soft tokens: ZeRO-3 must gather it there too.
            from deepspeed.runtime.zero import register_external_parameter
            register_external_parameter(model.text_head, model.text_encoder.token_embed.weight)
        self.prior = LatentPrior.from_config(cfg) if lo.latent_prior_weight > 0 else None
        self.restricted = RestrictedUpdates(model, self.plan.cycle_text_params) if self.plan.cycle_text_params else None

    # ---- pass builders

    def l2t_pass(self, ids: Tensor, real: Tensor, latents: Tensor) -> Pass:
        """The L2T pass from a clean latent (see ``l2t_pass``)."""
        return l2t_pass(ids, real, latents, self.cfg.data.mask_token_id)

    def t2l_pass(self, tokens: Tensor, real: Tensor, x0: Tensor, t: Tensor, eps: Tensor) -> Pass:
        """Clean text at t=0, latent noised at t; the head predicts the diffusion target."""
        return Pass(tokens, torch.zeros_like(t), self.diffusion.add_noise(x0, t, eps), t, real,
                    latent_target=self.diffusion.target(x0, eps, t))

    def unconditional_pass(self, ids: Tensor, real: Tensor, x0: Tensor,
                           slots: tuple[Tensor, int] | None = None) -> Pass:
        """Text masked at t ~ U(0,1), latent noised at t' ~ U(0,1); both supervised. With
        loss.text_time_antithetic the text times are stratified over ``slots`` (each row's index
        in the step's global batch, its size; default: this micro-batch alone)."""
        b = ids.shape[0]
        text_t = torch.rand(b, device=ids.device)
        if self.cfg.loss.text_time_antithetic:
            index, total = slots if slots is not None else (torch.arange(b, device=ids.device), b)
            text_t = antithetic_times(text_t, index, total)
        latent_t, eps = torch.rand(b, device=ids.device), torch.randn_like(x0)
        tokens, masked = mask_tokens(ids, text_t, real, self.cfg.data.mask_token_id)
        p = self.t2l_pass(tokens, real, x0, latent_t, eps)
        p.text_t, p.text_targets, p.text_loss_mask = text_t, ids, masked
        if self.cfg.loss.text_elbo_weighting:  # the MDLM bound per real token (diffusion.elbo_weight)
            p.text_weights = elbo_weight(text_t)[:, None].expand_as(ids)
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

    def _with_prior(self, loss: Tensor, metrics: dict[str, Tensor], p: Pass, r: PassResult, step: int) -> Tensor:
        """``loss`` plus the latent prior on the x0 estimates of T2L pass ``p`` while its weight is
        above 0 (the same steps on every rank: the prior's moments are a collective)."""
        w = self.plan.latent_prior.at(step)
        if self.prior is None or w <= 0:
            return loss
        prior = self.prior.loss(self.diffusion.predict_x0(p.latents, p.latent_t, r.latent_pred))
        metrics["latent_prior_loss"] = prior
        return loss + w * prior

    # ---- forward

    def forward(self, batch: dict[str, Tensor], step: int, stage: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The whole objective for one micro-batch. ``stage`` (1 or 2, cycle_vae with
        loss.cycle_stagewise only) runs one stage: the engine calls stage 1, backward, then stage 2
        on the same batch, backward; together they give the plain mode's loss and gradients. With
        loss.cycle_text_params a third, RESTRICTED_STAGE, runs cycle_text (plan.micro_step_stages)."""
        ids, x0 = batch["input_ids"], batch["latent"]
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
        ids, real = trim_padding(ids, real)
        _same_shape(x0, x0.new_empty(ids.shape[0], self.cfg.model.latent_dim), "batch['latent']")
        # Where the rows sit in the step's global batch (the trainer adds it; see batching.py).
        slots = (batch["global_index"], int(batch["global_batch_size"])) if "global_index" in batch else None
        mode = self.plan.mode_at(step)
        if self.restricted is not None:  # on until the next forward: the backward of this one
            self.restricted.active = stage == RESTRICTED_STAGE
        if mode == "cycle_vae":
            loss, metrics = self.cycle_vae(ids, real, x0, step, stage)
        else:
            loss, metrics = self.single_mode(mode, ids, real, x0, step, slots)
            metrics["mode_index"] = torch.tensor(float(BASE_MODES.index(mode)), device=ids.device)
        metrics = {k: v.detach().float() for k, v in metrics.items()}
        values = list(metrics.values())  # none: a micro-step of stand-in passes only
        metrics["nonfinite_terms"] = (~torch.stack(values).isfinite()).sum().float() if values else x0.new_zeros(())
        return loss, metrics

    def dropped_rows(self, b: int, device) -> Tensor | None:
        """Rows whose condition is replaced by its null form (loss.cond_dropout), or None when off.
        Drawn after every other draw of the pass, so turning it on leaves the other noise as it was."""
        p = self.cfg.loss.cond_dropout
        return torch.rand(b, device=device) < p if p > 0 else None

    def single_mode(self, mode: str, ids: Tensor, real: Tensor, x0: Tensor, step: int,
                    slots: tuple[Tensor, int] | None = None):
        w_lat = self.cfg.loss.latent_loss_weight
        if mode == "l2t":
            p = self.l2t_pass(ids, real, x0)
            if (rows := self.dropped_rows(ids.shape[0], ids.device)) is not None:
                drop_latent(p, rows, torch.randn_like(x0))
            (r,) = self._run(self.model, [p])
            return r.text_loss, {"text_loss": r.text_loss, "text_accuracy": r.text_accuracy}
        if mode == "t2l":
            t = self.plan.latent_time.sample(ids.shape[0], ids.device, step)
            p = self.t2l_pass(ids, real, x0, t, torch.randn_like(x0))
            if (rows := self.dropped_rows(ids.shape[0], ids.device)) is not None:
                drop_text(p, rows, self.cfg.data.mask_token_id)
            (r,) = self._run(self.model, [p])
            lat = self.latent_loss(r.latent_pred, p.latent_target, "t2l latent")
            metrics = {"latent_loss": lat, **self._t2l_metrics(p, r)}
            return self._with_prior(w_lat * lat, metrics, p, r, step), metrics
        p = self.unconditional_pass(ids, real, x0, slots)
        (r,) = self._run(self.model, [p])
        lat = self.latent_loss(r.latent_pred, p.latent_target, "unconditional latent")
        # The MDLM bound on -log p(text | latent at t') per real token, one t per sample.
        nelbo = (r.token_ce * elbo_weight(p.text_t)[:, None].expand_as(ids)[p.text_loss_mask]).sum() / real.sum()
        metrics = {"text_loss": r.text_loss, "text_accuracy": r.text_accuracy, "text_nelbo": nelbo,
                   "latent_loss": lat, **self._t2l_metrics(p, r)}
        return self._with_prior(r.text_loss + w_lat * lat, metrics, p, r, step), metrics

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
        last = RESTRICTED_STAGE if self.restricted else 2
        if stage not in (2, last) or self._carry is None:
            raise RuntimeError(f"stage-wise cycle_vae runs stages 1 to {last} in order on the same batch; got stage "
                               f"{stage}{' without a stage 1 before it' if stage in (2, last) else ''}.")
        carry = self._carry
        if stage == last:
            self._carry = None
        if self.restricted is None:
            return self.cycle_stage2(ids, real, x0, carry)
        # cycle_latent in stage 2; cycle_text alone in its micro-step, whose backward is restricted.
        return self.cycle_stage2(ids, real, x0, carry, ("lat",) if stage == 2 else ("text",))

    def cycle_stage1(self, ids: Tensor, real: Tensor, x0: Tensor, step: int):
        """Base L2T + base T2L in one model call; returns the loss, metrics and what stage 2
        needs (the x0 estimate, the pseudo tokens, stage 2's noise, the ramp weights)."""
        lo, plan = self.cfg.loss, self.plan
        w_text, w_lat = plan.cycle_text.at(step), plan.cycle_latent.at(step)
        b = ids.shape[0]
        # Draw all noise before any model call: fused, unfused and stage-wise runs see the same numbers.
        t_base, eps_base = plan.latent_time.sample(b, ids.device, step), torch.randn_like(x0)
        t_cyc, eps_cyc = plan.latent_time.sample(b, ids.device, step), torch.randn_like(x0)
        run_text, run_lat = plan.cycle_terms_at(step, self.training)
        soft = None
        if run_lat and lo.cycle_latent_sampling == "gumbel_st":  # Gumbel noise seeded from this micro-step's stream
            soft = SoftTokens(self.gumbel_temperature.at(step), lo.gumbel_hard, int(torch.randint(0, 2**62, ())))

        base_l2t, base_t2l = self.l2t_pass(ids, real, x0), self.t2l_pass(ids, real, x0, t_base, eps_base)
        r_l2t, r_t2l = self._run(self.model, [base_l2t, base_t2l],
                                 categorical=run_lat and lo.cycle_latent_sampling == "categorical", soft=soft)
        base_lat = self.latent_loss(r_t2l.latent_pred, base_t2l.latent_target, "base_t2l latent")
        loss = r_l2t.text_loss + lo.latent_loss_weight * base_lat
        metrics = {"base_l2t_text_loss": r_l2t.text_loss, "base_l2t_token_accuracy": r_l2t.text_accuracy,
                   "base_t2l_latent_loss": base_lat, "cycle_text_weight": torch.tensor(w_text, device=ids.device),
                   "cycle_latent_weight": torch.tensor(w_lat, device=ids.device), **self._t2l_metrics(base_t2l, r_t2l)}
        if soft is not None:
            metrics["gumbel_temperature"] = torch.tensor(soft.temperature, device=ids.device)
        if plan.alternates and self.training:
            metrics["cycle_ran"] = torch.tensor(float(plan.cycle_runs_at(step)), device=ids.device)
        loss = self._with_prior(loss, metrics, base_t2l, r_t2l, step)
        x0_hat = self.diffusion.predict_x0(base_t2l.latents, t_base, r_t2l.latent_pred) \
            if run_text or plan.fixed_passes else None
        carry = {"w_text": w_text, "w_lat": w_lat, "run_text": run_text, "run_lat": run_lat,
                 "x0_hat": x0_hat.detach() if x0_hat is not None and lo.cycle_stop_grad_latent else x0_hat,
                 # pseudo tokens carry no gradient (sampled under the chunked head, detached);
                 # gumbel_st's soft tokens at the real positions do (text_head)
                 "pseudo": r_l2t.sampled_tokens.detach(), "soft": r_l2t.soft_embeddings,
                 "t_cyc": t_cyc, "eps_cyc": eps_cyc}
        return loss, metrics, carry

    def cycle_stage2(self, ids: Tensor, real: Tensor, x0: Tensor, carry: dict,
                     terms: tuple[str, ...] = ("text", "lat")):
        """cycle_text (L2T from the x0 estimate) and/or cycle_latent (T2L from the pseudo tokens),
        as ``terms`` says, in one model call; a term whose ramp weight is 0 is skipped (except
        stage-wise, see above). With plan.fixed_passes every call runs both passes: a term that does
        not run here (not in ``terms``, or not at this step) runs on the micro-batch's first row,
        a stand-in whose loss passes no gradient (_NoGradient)."""
        passes: list[tuple[str, Pass, bool]] = []  # (term, pass, trains)
        for term in ("text", "lat"):
            trains = term in terms and carry[f"run_{term}"]
            if not trains and not self.plan.fixed_passes:
                continue
            rows = slice(None) if trains else slice(0, 1)
            if term == "text":
                p = self.l2t_pass(ids[rows], real[rows], carry["x0_hat"][rows])
            else:
                p = self.t2l_pass(carry["pseudo"][rows], real[rows], x0[rows], carry["t_cyc"][rows],
                                  carry["eps_cyc"][rows])
                if carry["soft"] is not None:  # the soft tokens of the rows' real positions, row-major
                    p.soft_mask, p.soft_embeddings = real[rows], carry["soft"][:int(real[rows].sum())]
            passes.append((term, p, trains))
        results = self._run(self.model, [p for _, p, _ in passes]) if passes else []
        loss, metrics = x0.new_zeros(()), {}
        for (term, p, trains), r in zip(passes, results):
            if not trains:
                loss = loss + _NoGradient.apply(r.text_loss if term == "text" else r.latent_pred)
            elif term == "text":
                loss = loss + carry["w_text"] * r.text_loss
                metrics["cycle_text_loss"] = r.text_loss
            else:
                cyc_lat = self.latent_loss(r.latent_pred, p.latent_target, "cycle_latent latent")
                loss = loss + carry["w_lat"] * cyc_lat
                metrics["cycle_latent_loss"] = cyc_lat
        return loss, metrics
