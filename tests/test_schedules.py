"""The schedule library: each shape against values worked out by hand, and the config shape."""
import math

import pytest

from lgdlm_ds.config import load_config
from lgdlm_ds.schedules import Schedule, schedule_from, schedule_problems

STEPS = (0, 1, 2, 3, 4, 6, 8, 10, 11, 100)  # warmup 2, ramp 8: the ramp runs over steps 2..10


def test_linear_shape():
    s = Schedule(0.5, 2, 8, "linear")
    assert [s.at(k) for k in STEPS] == pytest.approx([0, 0, 0, 0.0625, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    assert [Schedule(0.5, 3).at(k) for k in (0, 2, 3, 4)] == [0, 0, 0.5, 0.5]  # no ramp: a jump after warmup
    assert s.end == 10


def test_cosine_shape():
    s = Schedule(0.5, 2, 8, "cosine")
    half_cosine = [0.25 * (1 - math.cos(math.pi * max(0, min(1, (k - 2) / 8)))) for k in STEPS]
    assert [s.at(k) for k in STEPS] == pytest.approx(half_cosine)
    assert s.at(6) == pytest.approx(0.25) and s.at(3) < Schedule(0.5, 2, 8).at(3)  # slower off the start


def test_step_shape():
    s = Schedule(0.5, 2, 8, "step", stairs=4)  # a stair of 0.125 every 2 steps, the last at step 10
    assert [s.at(k) for k in STEPS] == [0, 0, 0, 0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert [Schedule(1.0, 0, 4, "step", stairs=1).at(k) for k in range(6)] == [0, 0, 0, 0, 1, 1]


def test_a_falling_schedule_from_start_to_base():
    s = Schedule(0.1, 0, 4, "linear", start=0.9)  # the t-range curriculum and temperatures fall
    assert [s.at(k) for k in (0, 2, 4, 9)] == pytest.approx([0.9, 0.5, 0.1, 0.1])


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="shape 'exp'"):
        Schedule(1.0, shape="exp")
    with pytest.raises(ValueError, match="stairs >= 1"):
        Schedule(1.0, stairs=0)


def test_config_keys_of_a_schedule():
    lo = load_config(None, ["loss.cycle_text_warmup_steps=3", "loss.cycle_text_ramp_steps=5",
                            "loss.cycle_text_shape=cosine", "loss.cycle_text_stairs=2"]).loss
    assert schedule_from(lo, "cycle_text", 0.4) == Schedule(0.4, 3, 5, "cosine", 0.0, 2)
    assert schedule_problems(lo, "cycle_text") == []
    lo.cycle_text_shape, lo.cycle_text_ramp_steps = "exp", -1
    assert [k for k, _ in schedule_problems(lo, "cycle_text")] == ["cycle_text_ramp_steps", "cycle_text_shape"]
