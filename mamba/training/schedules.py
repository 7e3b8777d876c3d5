"""Learning-rate schedules as Composer schedulers: callables of Composer's `State` -> lr multiplier.

Each schedule is a linear warmup from 0 to 1 over `t_warmup`, then a shape that runs until
`t_max`. Durations are Composer time strings in batches ("2000ba"), tokens ("2e9tok"), samples
("1e6sp") or a fraction of max_duration ("1dur", resolved to max_duration's own unit). The warmup,
decay and t_max must end up in one unit (the config loader checks it): progress through the
schedule is then a ratio of two counts of the same thing, read from `state.timestamp`.

Shapes:
  constant  1 after warmup.
  cosine    alpha_f + (1 - alpha_f) * (1 + cos(pi * p)) / 2, p from 0 at the warmup end to 1 at t_max
            (Loshchilov & Hutter 2017, "SGDR", with a floor alpha_f).
  linear    1 - (1 - alpha_f) * p, same p.
  wsd       warmup-stable-decay (Hu et al. 2024, "MiniCPM", sec. 4): 1 until the decay starts at
            t_max - t_decay, then down to alpha_f exactly at t_max, either linearly or as
            1 - sqrt (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
            Training Durations", eq. 1): alpha_f + (1 - alpha_f) * (1 - sqrt(q)), q the decay progress.
After t_max every shape holds its final value.
"""
from __future__ import annotations

import math
from typing import get_args

from composer.core import State, Time, TimeUnit
from composer.optim import ComposerScheduler

from mamba.config.schema import DecayShape, SchedulerConfig

DECAY_SHAPES = get_args(DecayShape)  # ("linear", "1-sqrt"), the schema's list


def resolve(duration: str, state: State) -> Time[int]:
    """A time string as a count in a concrete unit; "Xdur" becomes X x max_duration."""
    time = Time.from_timestring(duration)
    if time.unit == TimeUnit.DURATION:
        assert state.max_duration is not None, "Composer sets max_duration before any scheduler call"
        return Time(int(time.value * state.max_duration.value), state.max_duration.unit)
    return Time(int(time.value), time.unit)


def elapsed(state: State, unit: TimeUnit) -> int:
    """How much of `unit` training has consumed so far (batches, tokens, samples)."""
    return int(state.timestamp.get(unit).value)


def _same_unit(*times: Time[int]) -> TimeUnit:
    units = {t.unit for t in times}
    if len(units) != 1:
        raise ValueError(f"schedule durations {[str(t) for t in times]} mix units; give them all in one unit")
    return units.pop()


class _WarmupSchedule(ComposerScheduler):
    """Linear warmup to 1 over t_warmup, then `shape(p)` with p the progress from warmup end to t_max."""

    def __init__(self, t_warmup: str, t_max: str = "1dur", alpha_f: float = 0.0):
        self.t_warmup, self.t_max, self.alpha_f = t_warmup, t_max, alpha_f

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        warmup, t_max = resolve(self.t_warmup, state), resolve(self.t_max, state)
        now = elapsed(state, _same_unit(warmup, t_max))
        if now < warmup.value:
            return now / warmup.value
        span = max(t_max.value - warmup.value, 1)
        return self.shape(min((now - warmup.value) / span, 1.0), state)

    def shape(self, p: float, state: State) -> float:
        raise NotImplementedError  # each subclass defines its decay shape


class ConstantWithWarmup(_WarmupSchedule):
    def shape(self, p: float, state: State) -> float:
        return 1.0


class CosineWithWarmup(_WarmupSchedule):
    def shape(self, p: float, state: State) -> float:
        return self.alpha_f + (1.0 - self.alpha_f) * 0.5 * (1.0 + math.cos(math.pi * p))


class LinearWithWarmup(_WarmupSchedule):
    def shape(self, p: float, state: State) -> float:
        return 1.0 - (1.0 - self.alpha_f) * p


class WarmupStableDecay(ComposerScheduler):
    """WSD: warmup, 1 until t_max - decay, then `decay_shape` down to alpha_f at t_max.

    The decay length is `t_decay` (a duration) when given, else `decay_fraction` x t_max.
    """

    def __init__(self, t_warmup: str, t_max: str = "1dur", alpha_f: float = 0.0, decay_fraction: float = 0.2,
                 t_decay: str | None = None, decay_shape: str = "1-sqrt"):
        if decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape={decay_shape!r}: choose one of {DECAY_SHAPES}")
        self.t_warmup, self.t_max, self.alpha_f = t_warmup, t_max, alpha_f
        self.decay_fraction, self.t_decay, self.decay_shape = decay_fraction, t_decay, decay_shape

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        warmup, t_max = resolve(self.t_warmup, state), resolve(self.t_max, state)
        if self.t_decay is not None:
            decay = resolve(self.t_decay, state)
        else:
            decay = Time(int(round(self.decay_fraction * t_max.value)), t_max.unit)
        now = elapsed(state, _same_unit(warmup, t_max, decay))
        if now < warmup.value:
            return now / warmup.value
        decay_start = t_max.value - decay.value
        if now < decay_start:
            return 1.0
        q = min((now - decay_start) / max(decay.value, 1), 1.0)
        if self.decay_shape == "linear":
            return 1.0 - (1.0 - self.alpha_f) * q
        return self.alpha_f + (1.0 - self.alpha_f) * (1.0 - math.sqrt(q))


def build_scheduler(cfg: SchedulerConfig) -> ComposerScheduler:
    """The schedule named by `scheduler.name`, stepped every batch by the trainer."""
    if cfg.name == "wsd":
        return WarmupStableDecay(cfg.t_warmup, cfg.t_max, cfg.alpha_f, cfg.decay_fraction, cfg.t_decay,
                                 cfg.decay_shape)
    shapes = {"cosine": CosineWithWarmup, "linear": LinearWithWarmup, "constant": ConstantWithWarmup}
    return shapes[cfg.name](cfg.t_warmup, cfg.t_max, cfg.alpha_f)
