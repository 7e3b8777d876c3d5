"""Strict config loading: YAML + `key=value` overrides -> a validated `TrainConfig`.

omegaconf reads the YAML and the dot-list overrides (so `optimizer.lr=1e-3` and `${...}`
interpolation work); we then build the dataclasses ourselves so that every error names the key,
its section, and what to do — an unknown key lists the closest known ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from mamba import layout
from mamba.config.schema import TrainConfig

# Composer time strings we accept; "1dur" only where a fraction of max_duration makes sense.
_DURATION = re.compile(r"^\d+(\.\d+)?(e\d+)?(ba|tok|ep|sp|dur)$")

SSM_LAYERS = ("mamba1",)
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "amp_bf16")
DEVICES = ("auto", "cpu", "gpu")
STATE_DICT_TYPES = ("sharded", "full")


class ConfigError(ValueError):
    """A config that cannot be trained on; the message says which key and how to fix it."""


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read `path` (YAML; None means schema defaults), apply `key=value` overrides, validate."""
    base = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        base = OmegaConf.load(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=1e-3)")
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    raw = OmegaConf.to_container(merged, resolve=True)
    cfg = build_dataclass(TrainConfig, raw or {}, where=str(path) if path else "config")
    validate(cfg)
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data (for YAML output and for logging hyperparameters)."""
    return dataclasses.asdict(cfg)


def build_dataclass(cls, raw: dict, where: str, section: str = ""):
    """Instantiate dataclass `cls` from `raw`, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section '{section or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{section}.{key}" if section else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"{where}: unknown key '{dotted}' in section '{section or 'top level'}'{hint} "
                f"Known keys there: {', '.join(known)}"
            )
        kwargs[key] = _convert(hints[key], value, where, dotted)
    return cls(**kwargs)


def _convert(hint, value, where: str, dotted: str):
    """Check `value` against the annotation `hint`; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where, dotted)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where, dotted)
    expected = origin or hint
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(
            f"{where}: key '{dotted}' must be of type {expected.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> None:
    """Cross-field rules that a type check cannot express."""
    m, d, o, s, t = cfg.model, cfg.data, cfg.optimizer, cfg.scheduler, cfg.trainer
    _require(m.ssm_layer in SSM_LAYERS, f"model.ssm_layer={m.ssm_layer!r}: choose one of {SSM_LAYERS}")
    for key in ("d_model", "n_layer", "d_state", "d_conv", "expand", "pad_vocab_size_multiple"):
        _require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _require(
        0 < m.vocab_size <= layout.MAX_VOCAB_SIZE,
        f"model.vocab_size={m.vocab_size} must be in 1..{layout.MAX_VOCAB_SIZE}: the shard layout "
        f"stores token ids in {layout.TOKEN_BITS} bits",
    )
    _require(
        0 < d.seq_len <= layout.MAX_POSITION + 1,
        f"data.seq_len={d.seq_len} must be in 1..{layout.MAX_POSITION + 1}, the longest window whose "
        f"in-document positions the shard layout records exactly",
    )
    _require(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _require(o.lr > 0, f"optimizer.lr must be positive, got {o.lr}")
    _require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optimizer.betas={o.betas} must be two numbers in [0, 1)",
    )
    _require(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip_norm >= 0, f"optimizer.grad_clip_norm must be >= 0 (0 disables), got {o.grad_clip_norm}")
    _require(s.name in SCHEDULERS, f"scheduler.name={s.name!r}: choose one of {SCHEDULERS}")
    _require(0 <= s.alpha_f <= 1, f"scheduler.alpha_f={s.alpha_f} must be in [0, 1]")
    for key, value in (("scheduler.t_warmup", s.t_warmup), ("scheduler.t_max", s.t_max),
                       ("trainer.max_duration", t.max_duration), ("trainer.save_interval", t.save_interval),
                       ("trainer.log_interval", t.log_interval)):
        _require(
            bool(_DURATION.match(value)),
            f"{key}={value!r} is not a duration: write e.g. '1000ba', '2e9tok', '1ep' or '1dur'",
        )
    _require(t.precision in PRECISIONS, f"trainer.precision={t.precision!r}: choose one of {PRECISIONS}")
    _require(t.device in DEVICES, f"trainer.device={t.device!r}: choose one of {DEVICES}")
    _require(
        cfg.fsdp.state_dict_type in STATE_DICT_TYPES,
        f"fsdp.state_dict_type={cfg.fsdp.state_dict_type!r}: choose one of {STATE_DICT_TYPES}",
    )
    _require(t.micro_batch_size > 0, f"trainer.micro_batch_size must be positive, got {t.micro_batch_size}")
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
        f"trainer.micro_batch_size={t.micro_batch_size}; change one of them",
    )


def check_world_size(cfg: TrainConfig, world_size: int) -> int:
    """Per-rank batch for `world_size` ranks; fails unless global = micro x accumulation x ranks."""
    t = cfg.trainer
    if t.global_batch_size % (t.micro_batch_size * world_size) != 0:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} must be a multiple of "
            f"trainer.micro_batch_size={t.micro_batch_size} x {world_size} ranks "
            f"= {t.micro_batch_size * world_size}; change global_batch_size or micro_batch_size"
        )
    return t.global_batch_size // world_size
