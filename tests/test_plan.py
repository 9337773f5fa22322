import pytest
import torch

from lgdlm_ds.config import ConfigError, load_config
from lgdlm_ds.ds_config import load_ds_config
from lgdlm_ds.plan import DDIM_STEPS, ITERATIVE_DECODE_STEPS, RESTRICTED_STAGE, LatentTime, ObjectivePlan
from lgdlm_ds.schedules import Schedule
from core_utils import tiny_batch, tiny_config, tiny_step


def plan(*overrides: str) -> ObjectivePlan:
    return ObjectivePlan.from_config(load_config(None, list(overrides)))


@pytest.mark.parametrize("loss_type, extra, modes", [
    ("l2t", [], {"l2t"}),
    ("t2l", [], {"t2l"}),
    ("unconditional", [], {"unconditional"}),
    ("cycle_vae", [], {"l2t", "t2l"}),
    ("random", ["training.mode_weights={l2t: 1, t2l: 0, unconditional: 2}"], {"l2t", "unconditional"}),
    ("sequential", ["training.mode_schedule=[{type: t2l, steps: 3}, {type: l2t, steps: 1}]"], {"t2l", "l2t"}),
])
def test_trained_modes_are_the_modes_drawn(loss_type, extra, modes):
    p = plan(f"loss.loss_type={loss_type}", *extra)
    assert p.trained_modes == modes
    assert {p.mode_at(s) for s in range(200)} == (modes if loss_type in ("random", "sequential") else {loss_type})


def test_mode_weights_and_schedule_are_read_only_by_their_loss_type():
    # Validation checks them only for random / sequential: another loss type must not trip on them.
    p = plan("loss.loss_type=l2t", "training.mode_weights={foo: bar}", "training.mode_schedule=[1]")
    assert (p.mode_weights, p.mode_schedule, p.mode_at(5)) == ((), (), "l2t")


def test_random_mode_keeps_base_mode_order_and_weights():
    p = plan("loss.loss_type=random", "training.mode_weights={unconditional: 2, l2t: 1}")
    assert p.mode_weights == (("l2t", 1), ("unconditional", 2))


def test_sequential_mode_cycles_the_schedule():
    p = plan("loss.loss_type=sequential", "training.mode_schedule=[{type: t2l, steps: 3}, {type: l2t, steps: 1}]")
    assert [p.mode_at(s) for s in range(9)] == ["t2l"] * 3 + ["l2t"] + ["t2l"] * 3 + ["l2t", "t2l"]


def test_cycle_weights_follow_their_ramps():
    p = plan("loss.cycle_text_weight=0.4", "loss.cycle_text_warmup_steps=2", "loss.cycle_text_ramp_steps=4",
             "loss.cycle_latent_weight=0.2", "loss.cycle_latent_warmup_steps=1")
    assert (p.cycle_text, p.cycle_latent) == (Schedule(0.4, 2, 4), Schedule(0.2, 1, 0))
    assert [p.cycle_text.at(s) for s in (0, 1, 2, 3, 6, 50)] == pytest.approx([0, 0, 0, 0.1, 0.4, 0.4])
    assert [p.cycle_latent.at(s) for s in (0, 1, 2)] == [0, 0.2, 0.2]


def test_latent_time_sampler():
    full = plan("loss.latent_t_mode=full").latent_time
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert (full.sample(5, "cpu", 0) == 1).all() and full.largest == 1.0
    assert torch.equal(torch.get_rng_state(), state)  # t = 1 draws nothing: later noise is unchanged
    rnd = plan("loss.latent_t_mode=random", "loss.cycle_latent_t_min=0.3", "loss.cycle_latent_t_max=0.5").latent_time
    assert rnd == LatentTime("random", Schedule(0.3), 0.5) and rnd.largest == 0.5
    t = rnd.sample(1000, "cpu", 0)
    assert t.shape == (1000,) and t.dtype == torch.float32 and 0.3 <= t.min() and t.max() <= 0.5


@pytest.mark.parametrize("overrides, stages, passes, micro_steps, per_micro_step", [
    (["loss.loss_type=l2t"], 1, 1, (None,), 1),
    (["loss.loss_type=unconditional", "loss.cycle_stagewise=true"], 1, 1, (None,), 1),  # no stages to split
    (["loss.loss_type=cycle_vae"], 2, 2, (None,), 2),
    (["loss.loss_type=cycle_vae", "loss.cycle_stagewise=true"], 2, 2, (1, 2), 1),
])
def test_model_calls_and_micro_steps(overrides, stages, passes, micro_steps, per_micro_step):
    cfg = load_config(None, overrides + ["training.gradient_accumulation_steps=3"])
    p = ObjectivePlan.from_config(cfg)
    assert (p.stages, p.passes_per_stage, p.micro_step_stages, p.stages_per_micro_step) == \
        (stages, passes, micro_steps, per_micro_step)
    assert p.rows_per_call(4) == 4 * passes
    assert load_ds_config(cfg)["gradient_accumulation_steps"] == 3 * len(micro_steps)


@pytest.mark.parametrize("overrides, decode_steps, t2l_start, t2l_steps", [
    (["loss.loss_type=cycle_vae", "loss.latent_t_mode=full"], 1, 1.0, 1),
    (["loss.loss_type=cycle_vae", "loss.latent_t_mode=random", "loss.cycle_latent_t_max=0.9"], 1, 0.9, DDIM_STEPS),
    (["loss.loss_type=unconditional", "loss.latent_t_mode=full"], ITERATIVE_DECODE_STEPS, 1.0, DDIM_STEPS),
    (["loss.loss_type=random", "loss.latent_t_mode=random", "training.mode_weights={t2l: 1, unconditional: 1}"],
     ITERATIVE_DECODE_STEPS, 1.0, DDIM_STEPS),
    (["loss.loss_type=l2t", "loss.latent_t_mode=full"], 1, 1.0, 1),
])
def test_where_sampling_starts(overrides, decode_steps, t2l_start, t2l_steps):
    p = plan(*overrides)
    assert (p.decode_steps, p.t2l_start, p.t2l_steps) == (decode_steps, t2l_start, t2l_steps)


def test_latent_time_curriculum_widens_the_range_from_near_one():
    p = plan("loss.latent_t_mode=random", "loss.cycle_latent_t_min=0.1", "loss.cycle_latent_t_max=1.0",
             "loss.cycle_latent_t_min_start=0.9", "loss.latent_t_curriculum_steps=100")
    lt = p.latent_time
    assert [lt.low(s) for s in (0, 50, 100, 10**6)] == pytest.approx([0.9, 0.5, 0.1, 0.1])
    torch.manual_seed(0)
    for step, low in ((0, 0.9), (50, 0.5), (200, 0.1)):
        t = lt.sample(4000, "cpu", step)
        assert t.dtype == torch.float32 and low <= t.min() < low + 0.01 and 0.99 < t.max() <= 1.0
    assert (p.t2l_start, p.t2l_steps) == (1.0, DDIM_STEPS)  # the upper bound, whatever the step


def test_without_a_curriculum_the_range_is_whole_from_the_start():
    lt = plan("loss.latent_t_mode=random", "loss.cycle_latent_t_min_start=0.5").latent_time
    assert lt == LatentTime("random", Schedule(0.0), 0.98) and lt.low(0) == 0.0


def test_training_draws_the_curriculums_latent_times():
    cfg = tiny_config("loss.loss_type=t2l", "loss.latent_t_mode=random", "loss.cycle_latent_t_max=1.0",
                      "loss.cycle_latent_t_min_start=0.8", "loss.latent_t_curriculum_steps=10")
    step = tiny_step(cfg)
    batch = tiny_batch(cfg)
    assert step(batch, 0)[1]["t_lat_mean"] >= 0.8
    assert step(batch, 10**3)[1]["t_lat_mean"] < 0.8


@pytest.mark.parametrize("overrides, key", [
    (["loss.latent_t_curriculum_steps=10"], "loss.latent_t_curriculum_steps"),  # latent_t_mode full
    (["loss.latent_t_mode=random", "loss.latent_t_curriculum_steps=-1"], "loss.latent_t_curriculum_steps"),
    (["loss.latent_t_mode=random", "loss.latent_t_curriculum_steps=10", "loss.cycle_latent_t_min_start=0.98"],
     "loss.cycle_latent_t_min_start"),
    (["loss.latent_t_mode=random", "loss.latent_t_curriculum_steps=10", "loss.cycle_latent_t_min=0.5",
      "loss.cycle_latent_t_min_start=0.4"], "loss.cycle_latent_t_min_start"),
])
def test_bad_curricula_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, overrides)


def test_latent_time_sampling_modes():
    full = ObjectivePlan.from_config(tiny_config("loss.latent_t_mode=full")).latent_time
    assert (full.sample(100, "cpu", 0) == 1).all()
    cfg = tiny_config("loss.latent_t_mode=random", "loss.cycle_latent_t_min=0.2", "loss.cycle_latent_t_max=0.6")
    torch.manual_seed(0)
    t = ObjectivePlan.from_config(cfg).latent_time.sample(10000, "cpu", 0)
    assert t.dtype == torch.float32 and t.min() >= 0.2 and t.max() <= 0.6
    assert abs(t.mean().item() - 0.4) < 0.01 and t.min() < 0.21 and t.max() > 0.59


def test_random_mode_is_the_same_on_every_rank_and_follows_weights():
    cfg = tiny_config("loss.loss_type=random", "training.mode_weights={l2t: 1, t2l: 3}")
    picks = [ObjectivePlan.from_config(cfg).mode_at(s) for s in range(4000)]
    assert picks == [ObjectivePlan.from_config(cfg).mode_at(s) for s in range(4000)]  # a function of (seed, step) only
    assert set(picks) == {"l2t", "t2l"} and abs(picks.count("t2l") / 4000 - 0.75) < 0.03
    other_seed = tiny_config("loss.loss_type=random", "training.mode_weights={l2t: 1, t2l: 3}", "training.seed=1")
    assert picks != [ObjectivePlan.from_config(other_seed).mode_at(s) for s in range(4000)]


def test_sequential_schedule_cycles_by_step():
    cfg = tiny_config("loss.loss_type=sequential", "loss.latent_t_mode=random",
                      "training.mode_schedule=[{type: l2t, steps: 2}, {type: unconditional, steps: 1}]")
    plan = ObjectivePlan.from_config(cfg)
    assert [plan.mode_at(s) for s in range(7)] == ["l2t", "l2t", "unconditional"] * 2 + ["l2t"]


# ---- the cycle options: schedules, alternation, restricted cycle_text


def test_every_scheduled_quantity_reads_its_shape():
    p = plan("loss.cycle_text_ramp_steps=4", "loss.cycle_text_shape=step", "loss.cycle_text_stairs=2",
             "loss.cycle_latent_ramp_steps=4", "loss.cycle_latent_shape=cosine",
             "loss.latent_prior_weight=2", "loss.latent_prior_warmup_steps=1", "loss.latent_prior_ramp_steps=2",
             "loss.latent_t_mode=random", "loss.cycle_latent_t_min_start=0.8", "loss.latent_t_curriculum_steps=4",
             "loss.latent_t_curriculum_warmup_steps=2", "loss.latent_t_curriculum_shape=step",
             "loss.latent_t_curriculum_stairs=4")
    assert p.cycle_text == Schedule(0.1, 0, 4, "step", stairs=2)
    assert [p.cycle_latent.at(s) for s in (0, 2, 4)] == pytest.approx([0, 0.05, 0.1])
    assert [p.latent_prior.at(s) for s in (0, 1, 2, 3)] == [0, 0, 1, 2]
    assert [p.latent_time.low(s) for s in (0, 2, 3, 4, 6)] == pytest.approx([0.8, 0.8, 0.6, 0.4, 0.0])


def test_cycle_every_runs_the_cycle_on_every_nth_step_from_step_0():
    p = plan("loss.cycle_every=3")
    assert [p.cycle_runs_at(s) for s in range(7)] == [True, False, False] * 2 + [True]
    assert p.alternates and p.fixed_passes
    assert [p.cycle_terms_at(s) for s in (0, 1)] == [(True, True), (False, False)]
    assert p.cycle_terms_at(1, training=False) == (True, True)  # evaluation measures every term
    assert not plan().alternates and not plan().fixed_passes


def test_cycle_probability_is_a_draw_of_seed_and_step_only():
    draws = [plan("loss.cycle_probability=0.25").cycle_runs_at(s) for s in range(4000)]
    assert draws == [plan("loss.cycle_probability=0.25").cycle_runs_at(s) for s in range(4000)]  # every rank
    assert abs(sum(draws) / 4000 - 0.25) < 0.03  # binomial sd 0.007
    assert draws != [plan("loss.cycle_probability=0.25", "training.seed=1").cycle_runs_at(s) for s in range(4000)]
    both = plan("loss.cycle_probability=0.5", "loss.cycle_every=2")
    assert not any(both.cycle_runs_at(s) for s in range(1, 400, 2))
    assert 0.4 < sum(both.cycle_runs_at(s) for s in range(0, 400, 2)) / 200 < 0.6  # sd 0.035


def test_restricted_cycle_text_gets_a_micro_step_of_its_own():
    cfg = load_config(None, ["loss.cycle_stagewise=true", "loss.cycle_text_params=[text_head.*]",
                             "training.gradient_accumulation_steps=2"])
    p = ObjectivePlan.from_config(cfg)
    assert p.micro_step_stages == (1, 2, RESTRICTED_STAGE) and p.stages_per_micro_step == 1 and p.fixed_passes
    assert load_ds_config(cfg)["gradient_accumulation_steps"] == 6


@pytest.mark.parametrize("overrides, key", [
    (["loss.cycle_every=0"], "loss.cycle_every"),
    (["loss.cycle_probability=0"], "loss.cycle_probability"),
    (["loss.cycle_probability=1.5"], "loss.cycle_probability"),
    (["loss.loss_type=l2t", "loss.cycle_every=2"], "loss.cycle_every"),
    (["loss.cycle_text_params=[text_head.*]"], "loss.cycle_text_params"),  # without cycle_stagewise
    (["loss.cycle_text_params=['']", "loss.cycle_stagewise=true"], "loss.cycle_text_params"),
    (["loss.latent_prior_weight=-1"], "loss.latent_prior_weight"),
    (["loss.latent_prior_target=gauss"], "loss.latent_prior_target"),
    (["loss.latent_prior_weight=1", "loss.latent_prior_target=data", "data.kind=synthetic"],
     "loss.latent_prior_target"),
    (["loss.latent_prior_shape=exp"], "loss.latent_prior_shape"),
    (["loss.cycle_text_stairs=0"], "loss.cycle_text_stairs"),
    (["loss.cycle_latent_warmup_steps=-2"], "loss.cycle_latent_warmup_steps"),
    (["loss.latent_t_curriculum_shape=exp"], "loss.latent_t_curriculum_shape"),
])
def test_bad_cycle_options_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, overrides)
