"""The objectives and TrainStep: what each mode trains, the fused cycle against separate calls,
the stop-gradient, the stage-wise backward, padding, non-finite values."""
import math

import pytest
import torch

from lgdlm_ds.config import ConfigError
from lgdlm_ds.plan import ObjectivePlan
from lgdlm_ds.tools.compare import max_rel_diff, param_grads
from core_utils import CYCLE_VAE_METRICS, fp64_reference, loss_and_grads, tiny_batch, tiny_config, tiny_step
from precision import assert_fp32_agree, fp64_throughout


def _unreachable(mode: str, names: list[str], n_blocks: int) -> set[str]:
    """Parameters a one-directional mode cannot reach: the other head, the other modality's final
    norm, and the parts of the last block that only write the other modality's output."""
    if mode not in ("l2t", "t2l"):
        return set()
    other, idx = ("latent", 1) if mode == "l2t" else ("text", 0)
    last = f"model.mmdit.blocks.{n_blocks - 1}."
    parts = tuple(f"attn_residual_fns.{idx}.{p}" for p in ("residual_scale", "static_beta", "dynamic_beta_fn",
                                                           "h_post_scale"))
    parts += (f"ff_residual_fns.{idx}.", f"to_out.{idx}.", f"ff_layernorms.{idx}.", f"feedforwards.{idx}.")
    return {n for n in names if n.startswith((f"model.{other}_head", f"model.mmdit.norms.{idx}."))
            or (n.startswith(last) and any(p in n for p in parts))}


@pytest.mark.parametrize("mode", ["l2t", "t2l", "unconditional", "random", "sequential", "cycle_vae"])
def test_each_mode_trains_what_it_should(mode):
    cfg = tiny_config(f"loss.loss_type={mode}", "loss.latent_t_mode=random")
    step = tiny_step(cfg, perturb=0.02)
    loss, metrics, grads = loss_and_grads(step, tiny_batch(cfg), at_step=7)
    assert math.isfinite(loss.item()) and metrics["nonfinite_terms"] == 0
    names = [n for n, _ in step.named_parameters()]
    with_grad = {n for n in names if n in grads and grads[n].abs().max() > 0}
    unreachable = _unreachable(ObjectivePlan.from_config(cfg).mode_at(7), names, cfg.model.n_blocks)
    # A residual-mixing scale has no effect where the mix is a doubly stochastic average of
    # identical streams (first block: the streams are copies of the input) or of streams summed
    # right after (last block): its gradient is zero up to Sinkhorn convergence.
    first, last = "model.mmdit.blocks.0.attn_residual_fns.", f"model.mmdit.blocks.{cfg.model.n_blocks - 1}.ff_residual_fns."
    invariant = {n for n in names if n.startswith((first, last)) and n.endswith("residual_scale")}
    assert set(names) - unreachable - invariant <= with_grad
    assert not unreachable & with_grad
    if mode == "cycle_vae":
        assert set(CYCLE_VAE_METRICS) <= metrics.keys()


def test_text_ce_is_over_real_tokens_only():
    cfg = tiny_config("loss.loss_type=l2t")
    batch = tiny_batch(cfg)
    real, ids = batch["attention_mask"], batch["input_ids"]
    assert (~real).any()
    step = tiny_step(cfg, perturb=0.02)
    torch.manual_seed(1)
    loss, _ = step(batch, 0)
    # Reference: full logits, cross-entropy averaged over real positions only.
    masked_in = torch.where(real, torch.full_like(ids, cfg.data.mask_token_id), ids)
    logits, _ = step.model(masked_in, batch["latent"], torch.ones(4), torch.zeros(4), real)
    ref = torch.nn.functional.cross_entropy(logits[real], ids[real])
    assert_fp32_agree({"loss": loss}, {"loss": ref}, {"loss": fp64_reference(step, batch, at_step=0)[0]})
    # What sits at padded positions cannot change the loss.
    other = dict(batch, input_ids=torch.where(real, ids, torch.full_like(ids, 5)))
    torch.manual_seed(1)
    assert torch.equal(step(other, 0)[0], loss)


def _t2l_head_grad(stop_grad: bool) -> torch.Tensor:
    """Gradient reaching the base T2L latent prediction when only cycle_text depends on it."""
    cfg = tiny_config(f"loss.cycle_stop_grad_latent={stop_grad}", "loss.latent_loss_weight=0",
                      "loss.cycle_latent_weight=0", "loss.cycle_text_weight=1")
    step = tiny_step(cfg, perturb=0.02)
    captured = []

    def keep(_module, _inputs, out):
        if not captured:  # the first latent-head call is stage 1 (base T2L rows)
            out.retain_grad()
            captured.append(out)

    step.model.latent_head.register_forward_hook(keep)
    loss, metrics = step(tiny_batch(cfg), 0)
    assert "cycle_text_loss" in metrics and "cycle_latent_loss" not in metrics
    loss.backward()
    return captured[0].grad


def test_stop_grad_audit():
    assert _t2l_head_grad(stop_grad=True).abs().max() == 0
    assert _t2l_head_grad(stop_grad=False).abs().max() > 0


# Every pass of both stages trained, hyper-connections on: the graph whose fusion is checked below.
CYCLE_GRAPH = ("model.num_residual_streams=2", "loss.latent_t_mode=random", "loss.cycle_stop_grad_latent=false")


def _fused_and_unfused(cfg, dtype=torch.float32):
    """loss_and_grads of the fused cycle step and of the same weights with one model call per pass
    (four, counted); and the fused step and the batch, for a reference."""
    batch = tiny_batch(cfg, dtype=dtype)
    fused_step = tiny_step(cfg, dtype=dtype, perturb=0.02)
    fused = loss_and_grads(fused_step, batch, at_step=5)
    calls = []
    unfused_step = tiny_step(cfg, dtype=dtype, perturb=0.02, fuse=False)
    unfused_step.model.mmdit.register_forward_pre_hook(lambda *a: calls.append(1))
    unfused_step.model.trunk = _counting(unfused_step.model.trunk, calls)
    unfused = loss_and_grads(unfused_step, batch, at_step=5)
    assert len(calls) == 4
    return fused, unfused, fused_step, batch


@pytest.mark.parametrize("sampling", ["argmax", "categorical", "gumbel_st"])
def test_fused_stages_equal_four_separate_calls(sampling):
    # fp64 throughout: only summation order differs, and at fp64 precision that is ~1e-15.
    cfg = tiny_config(f"loss.cycle_latent_sampling={sampling}", *CYCLE_GRAPH)
    with fp64_throughout():
        fused, unfused, _, _ = _fused_and_unfused(cfg, torch.float64)
    assert abs(fused[0].item() - unfused[0].item()) <= 1e-10 * abs(unfused[0].item())
    assert max_rel_diff(fused[2], unfused[2]) <= 1e-10


@pytest.mark.parametrize("sampling", ["argmax", "categorical", "gumbel_st"])
def test_fused_stages_in_fp32_differ_by_rounding_only(sampling):
    cfg = tiny_config(f"loss.cycle_latent_sampling={sampling}", *CYCLE_GRAPH)
    fused, unfused, step, batch = _fused_and_unfused(cfg)
    ref = fp64_reference(step, batch, at_step=5)
    assert_fp32_agree({"loss": fused[0]}, {"loss": unfused[0]}, {"loss": ref[0]})
    assert_fp32_agree(fused[2], unfused[2], ref[2])


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped


def test_fused_cycle_makes_two_model_calls():
    cfg = tiny_config()
    step = tiny_step(cfg)
    calls = []
    step.model.trunk = _counting(step.model.trunk, calls)
    step(tiny_batch(cfg), 0)
    assert len(calls) == 2


def test_cycle_terms_follow_the_ramp():
    cfg = tiny_config("loss.cycle_text_warmup_steps=4", "loss.cycle_text_ramp_steps=4",
                      "loss.cycle_latent_warmup_steps=2", "loss.cycle_latent_ramp_steps=0")
    step, batch = tiny_step(cfg), tiny_batch(cfg)
    _, m = step(batch, 1)
    assert m["cycle_text_weight"] == 0 and m["cycle_latent_weight"] == 0
    assert "cycle_text_loss" not in m and "cycle_latent_loss" not in m  # off: not computed
    _, m = step(batch, 6)
    assert m["cycle_text_weight"] == pytest.approx(0.05) and m["cycle_latent_weight"] == pytest.approx(0.1)
    assert {"cycle_text_loss", "cycle_latent_loss"} <= m.keys()


def test_latent_shapes_are_checked_not_broadcast():
    cfg = tiny_config()
    batch = tiny_batch(cfg)
    batch["latent"] = batch["latent"][:, None]  # [B, 1, D], the older model's output shape
    with pytest.raises(RuntimeError, match=r"batch\['latent'\].*refusing to broadcast"):
        tiny_step(cfg)(batch, 0)


def test_non_finite_values_are_reported_not_replaced():
    cfg = tiny_config()
    batch = tiny_batch(cfg)
    batch["latent"][0, 0] = float("nan")
    loss, metrics = tiny_step(cfg)(batch, 0)
    assert math.isnan(loss.item()) and loss.requires_grad
    assert metrics["nonfinite_terms"] > 0 and math.isnan(metrics["base_t2l_latent_loss"].item())


def test_elbo_weighting_changes_only_the_unconditional_text_term():
    batch = tiny_batch(tiny_config())
    losses = {}
    for elbo in ("false", "true"):
        cfg = tiny_config("loss.loss_type=unconditional", "loss.latent_t_mode=random", f"loss.text_elbo_weighting={elbo}")
        torch.manual_seed(2)
        _, m = tiny_step(cfg)(batch, 0)
        losses[elbo] = m
    assert losses["false"]["latent_loss"] == losses["true"]["latent_loss"]
    assert losses["false"]["text_loss"] != losses["true"]["text_loss"]


@pytest.mark.parametrize("sampling", ["argmax", "categorical", "gumbel_st", "gumbel_st_hard"])
def test_cycle_latent_reaches_the_l2t_logits_only_through_soft_tokens(sampling):
    """cycle_latent alone (cycle_text off): its gradient reaches the text head, whose logits only
    L2T uses, with gumbel_st, and never with hard pseudo tokens."""
    hard = sampling.endswith("_hard")
    cfg = tiny_config(f"loss.cycle_latent_sampling={sampling.removesuffix('_hard')}", f"loss.gumbel_hard={hard}",
                      "loss.cycle_text_weight=0", "loss.latent_t_mode=random", "loss.gumbel_temperature=0.5")
    step, batch = tiny_step(cfg, perturb=0.02), tiny_batch(cfg)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    torch.manual_seed(1)
    _, metrics, carry = step.cycle_stage1(ids, real, batch["latent"], 3)
    loss2, metrics2 = step.cycle_stage2(ids, real, batch["latent"], carry)
    assert set(metrics2) == {"cycle_latent_loss"}
    head = list(step.model.text_head.parameters())
    grads = torch.autograd.grad(loss2, head, allow_unused=True)
    if sampling.startswith("gumbel_st"):
        assert all(g is not None and g.isfinite().all() and g.abs().max() > 0 for g in grads)
        assert metrics["gumbel_temperature"] == 0.5
        # the pseudo tokens are the Gumbel-max samples the soft tokens were drawn with
        assert carry["soft"].shape == (int(real.sum()), cfg.model.hidden_size)
    else:
        assert all(g is None for g in grads) and carry["soft"] is None


def test_gumbel_st_is_refused_with_the_stagewise_backward():
    with pytest.raises(ConfigError, match="loss.cycle_latent_sampling.*cycle_stagewise: false"):
        tiny_config("loss.cycle_latent_sampling=gumbel_st", "loss.cycle_stagewise=true")
    with pytest.raises(ConfigError, match="loss.gumbel_temperature"):
        tiny_config("loss.cycle_latent_sampling=gumbel_st", "loss.gumbel_temperature=0")


def _unconditional_pass(cfg, batch, seed=2):
    step, seen = tiny_step(cfg), []
    run = step._run
    step._run = lambda model, passes, *a, **k: seen.extend(passes) or run(model, passes, *a, **k)
    torch.manual_seed(seed)
    _, metrics = step(batch, 0)
    return seen[0], metrics


def test_antithetic_text_times_cover_the_global_batch_one_stratum_each():
    cfg = tiny_config("loss.loss_type=unconditional", "loss.text_time_antithetic=true")
    batch = tiny_batch(cfg)
    # slot 1 of a global batch of 12: global indices 4..7 -> strata [4/12, 8/12)
    batch.update(global_index=torch.arange(4, 8), global_batch_size=torch.tensor(12))
    p, _ = _unconditional_pass(cfg, batch)
    assert ((p.text_t * 12).floor() == torch.arange(4, 8)).all()
    # the same uniforms as the plain draw, moved into their strata
    torch.manual_seed(2)
    torch.testing.assert_close(p.text_t, (torch.arange(4, 8) + torch.rand(4)) / 12)
    # without slots (validation, direct calls) the micro-batch is its own global batch
    del batch["global_index"], batch["global_batch_size"]
    p, _ = _unconditional_pass(cfg, batch)
    assert ((p.text_t * 4).floor() == torch.arange(4)).all()


@pytest.mark.parametrize("elbo", [False, True])
def test_text_nelbo_is_the_mdlm_bound_per_real_token(elbo):
    """The bound sums 1/t x CE over masked tokens per real token (weight -alpha'/(1 - alpha) = 1/t
    for the log-linear mask schedule); with text_elbo_weighting it is the text loss itself."""
    cfg = tiny_config("loss.loss_type=unconditional", f"loss.text_elbo_weighting={elbo}")
    batch = tiny_batch(cfg)
    p, metrics = _unconditional_pass(cfg, batch)
    real = p.attention_mask  # the batch trimmed of its all-padding columns
    step = tiny_step(cfg)
    with torch.no_grad():
        logits, _ = step.model(p.tokens, p.latents, p.text_t, p.latent_t, real)
        ce = torch.nn.functional.cross_entropy(logits[p.text_loss_mask], p.text_targets[p.text_loss_mask],
                                               reduction="none")
    weights = (1 / p.text_t)[:, None].expand_as(real)[p.text_loss_mask]
    want = (ce * weights).sum() / real.sum()
    torch.testing.assert_close(metrics["text_nelbo"], want, rtol=1e-5, atol=0)
    if elbo:
        torch.testing.assert_close(metrics["text_loss"], want, rtol=1e-5, atol=0)


def test_stagewise_backward_equals_the_plain_step():
    cfg = tiny_config("loss.latent_t_mode=random", "loss.cycle_latent_sampling=categorical")
    batch = tiny_batch(cfg)
    plain_step = tiny_step(cfg, perturb=0.02)
    plain_loss, plain_metrics, plain = loss_and_grads(plain_step, batch, at_step=5)
    step = tiny_step(tiny_config("loss.latent_t_mode=random", "loss.cycle_latent_sampling=categorical",
                                 "loss.cycle_stagewise=true"), perturb=0.02)
    torch.manual_seed(1)
    loss1, m1 = step(batch, 5, stage=1)
    loss1.backward()
    loss2, m2 = step(batch, 5, stage=2)
    loss2.backward()
    assert {**m1, **m2}.keys() == plain_metrics.keys()
    ref_loss, _, ref = fp64_reference(plain_step, batch, at_step=5)
    assert_fp32_agree({"loss": loss1 + loss2}, {"loss": plain_loss}, {"loss": ref_loss})
    assert_fp32_agree(param_grads(step), plain, ref)


def test_stagewise_needs_stop_grad_and_stage_order():
    with pytest.raises(ConfigError, match="loss.cycle_stagewise.*needs loss.cycle_stop_grad_latent: true"):
        tiny_config("loss.cycle_stagewise=true", "loss.cycle_stop_grad_latent=false")
    cfg = tiny_config("loss.cycle_stagewise=true")
    with pytest.raises(RuntimeError, match="without a stage 1 before it"):
        tiny_step(cfg)(tiny_batch(cfg), 0, stage=2)
    with pytest.raises(RuntimeError, match="set loss.cycle_stagewise: true"):
        tiny_step(tiny_config())(tiny_batch(cfg), 0, stage=1)


def test_trailing_padding_is_trimmed_exactly(monkeypatch):
    # fp64 with plain residuals: the hyper-connections mix in fp32 whatever the dtype, which would
    # turn the different summation order into fp32 noise.
    cfg = tiny_config("loss.latent_t_mode=random", "model.num_residual_streams=1")
    batch = tiny_batch(cfg, dtype=torch.float64)
    batch["attention_mask"][:, 9:] = False  # no row uses the last three columns
    widths = []
    step = tiny_step(cfg, perturb=0.02, dtype=torch.float64)
    step.model.text_encoder.register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    trimmed = loss_and_grads(step, batch, at_step=3)
    assert widths and set(widths) == {9}
    monkeypatch.setattr("lgdlm_ds.objectives.trim_padding", lambda ids, real: (ids, real))
    full = loss_and_grads(tiny_step(cfg, perturb=0.02, dtype=torch.float64), batch, at_step=3)
    assert abs(trimmed[0].item() - full[0].item()) <= 1e-12 * abs(full[0].item())
    assert max_rel_diff(trimmed[2], full[2]) <= 1e-10


# ---- alternation and the restricted cycle_text term


def _model_calls(step) -> list[int]:
    """Rows of each model call ``step`` makes from now on."""
    rows = []
    step.model.text_encoder.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    return rows


def test_a_step_without_the_cycle_trains_the_base_terms_only():
    """cycle_every: 2. Step 1 runs the base terms, with stand-in cycle passes on one row that pass
    no gradient: loss and gradients equal those of a run whose cycle weights are 0 (stage 2 then
    does not run at all), bitwise; step 2 equals the plain run's."""
    cfg = tiny_config("loss.latent_t_mode=random", "loss.cycle_every=2")
    batch = tiny_batch(cfg)
    step = tiny_step(cfg, perturb=0.02)
    rows = _model_calls(step)
    loss, metrics, grads = loss_and_grads(step, batch, at_step=1)
    assert rows == [8, 2] and metrics["cycle_ran"] == 0  # base L2T + T2L; two stand-in rows
    assert "cycle_text_loss" not in metrics and "cycle_latent_loss" not in metrics
    base = tiny_step(tiny_config("loss.latent_t_mode=random", "loss.cycle_text_weight=0",
                                 "loss.cycle_latent_weight=0"), perturb=0.02)
    base_loss, _, base_grads = loss_and_grads(base, batch, at_step=1)
    assert loss.item() == base_loss.item() and grads.keys() == base_grads.keys()
    assert all(torch.equal(grads[n], base_grads[n]) for n in grads)
    loss2, metrics2, grads2 = loss_and_grads(step, batch, at_step=2)
    plain_loss, _, plain_grads = loss_and_grads(tiny_step(tiny_config("loss.latent_t_mode=random"), perturb=0.02),
                                                batch, at_step=2)
    assert metrics2["cycle_ran"] == 1 and loss2.item() == plain_loss.item()
    assert all(torch.equal(grads2[n], plain_grads[n]) for n in grads2)


def _cycle_text_grads(patterns: str, batch) -> dict[str, torch.Tensor]:
    """The gradient of the restricted micro-step alone: stage 1's forward, then stage 3's forward
    and backward."""
    step = tiny_step(tiny_config("loss.cycle_stagewise=true", f"loss.cycle_text_params={patterns}"), perturb=0.02)
    torch.manual_seed(1)
    step(batch, 5, stage=1)
    step(batch, 5, stage=2)
    step.zero_grad(set_to_none=True)
    loss, metrics = step(batch, 5, stage=3)
    loss.backward()
    assert set(metrics) == {"cycle_text_loss", "nonfinite_terms"}
    return param_grads(step)


def test_restricted_cycle_text_updates_only_its_group():
    batch = tiny_batch(tiny_config())
    group = ["model.text_head.", "model.mmdit.blocks.1."]
    restricted = _cycle_text_grads("[text_head.*, mmdit.blocks.1.*]", batch)
    unrestricted = _cycle_text_grads("['*']", batch)  # every parameter in the group: no restriction
    inside = [n for n in unrestricted if n.startswith(tuple(group))]
    outside = [n for n in unrestricted if not n.startswith(tuple(group))]
    assert inside and all(torch.equal(restricted[n], unrestricted[n]) for n in inside)
    assert all(not restricted[n].any() for n in outside)
    assert any(unrestricted[n].any() for n in outside)  # the audit could fail: cycle_text reaches them


def test_restricted_steps_add_up_to_the_plain_loss():
    cfg = tiny_config("loss.cycle_stagewise=true", "loss.cycle_text_params=[text_head.*]")
    batch, step, plain = tiny_batch(cfg), tiny_step(cfg), tiny_step(tiny_config())
    torch.manual_seed(1)
    losses, metrics = zip(*(step(batch, 5, stage=s) for s in step.plan.micro_step_stages))
    torch.manual_seed(1)
    plain_loss, plain_metrics = plain(batch, 5)
    # The same terms of the same numbers, summed in another order: a few roundings of the sum.
    assert sum(losses).item() == pytest.approx(plain_loss.item(), rel=8 * torch.finfo(torch.float32).eps)
    assert {k for m in metrics for k in m} == plain_metrics.keys()
    with pytest.raises(ConfigError, match=r"'loss.cycle_text_params': \['nothing.\*'\] match no parameter"):
        tiny_step(tiny_config("loss.cycle_stagewise=true", "loss.cycle_text_params=[text_head.*, nothing.*]"))
