"""Learning-rate schedules evaluated on a real Composer State at known points.

Expected values are written out from the formulas in mamba/training/schedules.py's docstring
(computed by hand here, not by calling the code under test).
"""
import math

import pytest
import torch
from composer.core import State, Timestamp
from composer.devices import DeviceCPU

from mamba.config.schema import SchedulerConfig
from mamba.training.schedules import (
    ConstantWithWarmup,
    CosineWithWarmup,
    WarmupStableDecay,
    build_scheduler,
)


def state_at(max_duration: str, batch: int = 0, token: int = 0) -> State:
    state = State(model=torch.nn.Linear(2, 2), rank_zero_seed=0, run_name="s", device=DeviceCPU(),
                  max_duration=max_duration)
    state.timestamp = Timestamp(batch=batch, token=token, sample=batch * 4)
    return state


def lr(schedule, max_duration: str, **now) -> float:
    return schedule(state_at(max_duration, **now))


def test_cosine_with_warmup_in_batches():
    s = CosineWithWarmup("10ba", "1dur", alpha_f=0.1)
    assert lr(s, "110ba", batch=0) == 0.0
    assert lr(s, "110ba", batch=5) == pytest.approx(0.5, abs=1e-12)
    assert lr(s, "110ba", batch=10) == pytest.approx(1.0, abs=1e-12)       # end of warmup: peak
    assert lr(s, "110ba", batch=60) == pytest.approx(0.55, abs=1e-12)      # half-way: (1 + 0.1) / 2
    assert lr(s, "110ba", batch=35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-12)
    assert lr(s, "110ba", batch=110) == pytest.approx(0.1, abs=1e-12)      # alpha_f at the end
    assert lr(s, "110ba", batch=150) == pytest.approx(0.1, abs=1e-12)      # held after t_max


def test_constant_with_warmup():
    s = ConstantWithWarmup("4ba", "1dur")
    assert [lr(s, "20ba", batch=b) for b in (0, 1, 2, 4, 19, 20)] == [0.0, 0.25, 0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("shape, at_quarter", [("linear", 1 - 0.75 * 0.25), ("1-sqrt", 0.25 + 0.75 * (1 - 0.5))])
def test_wsd_reaches_alpha_f_exactly_at_the_end(shape, at_quarter):
    # 100 batches: warmup 10, stable 10..80, decay over the last 20% = 80..100.
    s = WarmupStableDecay("10ba", "1dur", alpha_f=0.25, decay_fraction=0.2, decay_shape=shape)
    assert lr(s, "100ba", batch=0) == 0.0
    assert lr(s, "100ba", batch=10) == 1.0
    assert lr(s, "100ba", batch=45) == 1.0            # mid-stable
    assert lr(s, "100ba", batch=79) == 1.0
    assert lr(s, "100ba", batch=80) == 1.0            # decay starts at 1
    assert lr(s, "100ba", batch=85) == pytest.approx(at_quarter, abs=1e-12)
    assert lr(s, "100ba", batch=100) == 0.25          # exactly alpha_f, no rounding slack
    assert lr(s, "100ba", batch=120) == 0.25


def test_wsd_on_token_durations_with_explicit_decay_length():
    # Tokens: warmup 1000 tok, t_max 1e5 tok, decay the last 2e4 tok (starts at 80,000).
    s = WarmupStableDecay("1000tok", "1e5tok", alpha_f=0.0, t_decay="2e4tok", decay_shape="linear")
    assert lr(s, "1e6tok", token=500) == 0.5
    assert lr(s, "1e6tok", token=50_000) == 1.0
    assert lr(s, "1e6tok", token=90_000) == pytest.approx(0.5, abs=1e-12)
    assert lr(s, "1e6tok", token=100_000) == 0.0
    # The batch count is irrelevant to a token schedule.
    assert lr(s, "1e6tok", token=90_000, batch=3) == lr(s, "1e6tok", token=90_000, batch=9000)


def test_cosine_dur_resolves_against_a_token_max_duration():
    s = CosineWithWarmup("0.1dur", "1dur", alpha_f=0.0)   # 1e4 tok total, warmup 1e3 tok
    assert lr(s, "1e4tok", token=1000) == pytest.approx(1.0)
    assert lr(s, "1e4tok", token=5500) == pytest.approx(0.5)
    assert lr(s, "1e4tok", token=10_000) == pytest.approx(0.0, abs=1e-12)


def test_mixed_units_are_refused_at_run_time():
    s = CosineWithWarmup("10ba", "1e5tok")
    with pytest.raises(ValueError, match="mix units"):
        lr(s, "1e6tok", token=10, batch=1)


def test_build_scheduler_from_config():
    s = build_scheduler(SchedulerConfig(name="wsd", t_warmup="2ba", t_max="10ba", alpha_f=0.0, t_decay="4ba",
                                        decay_shape="linear"))
    assert [lr(s, "10ba", batch=b) for b in (1, 2, 6, 8, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
