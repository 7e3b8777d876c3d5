"""Strict config loading: YAML (or in-memory data) + `key=value` overrides -> a validated `TrainConfig`.

omegaconf reads the YAML and the dot-list overrides (so `optimizer.lr=1e-3` and `${...}`
interpolation work); we then build the dataclasses ourselves so that every error names the key,
its section, and what to do — an unknown key lists the closest known ones (naming the command
line when an override brought it), a key typed with a Literal in schema.py lists its allowed
values. The rules that need the world size or the device are checked at training time
(mamba/training/parallel.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any, Sequence, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mamba import layout
from mamba.config.errors import ConfigError  # also importable from here, as before it had its module
from mamba.config.schema import TrainConfig
from mamba.data.mixture import integer_weights

# Composer time strings we accept; "1dur" only where a fraction of max_duration makes sense.
_DURATION = re.compile(r"^\d+(\.\d+)?(e\d+)?(ba|tok|ep|sp|dur)$")

# What load_config reads: a YAML file, the same data already in memory, or None (the defaults).
ConfigSource = Union[str, Path, dict, DictConfig, None]
IN_MEMORY = "config"  # how errors name data that came from no file
COMMAND_LINE = "command line"  # how errors name the overrides (every caller takes them from there)


def load_config(source: ConfigSource = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read `source` (a YAML path, a dict or an OmegaConf node; None means the schema defaults),
    apply `key=value` overrides, validate. Errors name the file, or "config" for in-memory data."""
    if source is None or isinstance(source, (dict, DictConfig)):
        base, where = OmegaConf.create(source or {}), IN_MEMORY
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        base, where = OmegaConf.load(path), str(path)
    merged = base
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=1e-3)")
        key = item.split("=", 1)[0]
        try:  # one at a time, so that a value YAML cannot parse is named with its key
            parsed = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"override {item!r}: the value of '{key}' does not parse as "
                              f"YAML ({_first_line(e)}); quote it, e.g. key='\"text\"'") from None
        # Its keys are checked on their own, before the merge carries them into the file's
        # sections, where an unknown one would be reported as the file's.
        _check_keys(TrainConfig, OmegaConf.to_container(parsed), f"{COMMAND_LINE} (override {item!r})")
        try:
            merged = OmegaConf.merge(merged, parsed)
        except (OmegaConfBaseException, TypeError, ValueError) as e:  # e.g. a mapping onto a list
            kind = "list" if OmegaConf.is_list(OmegaConf.select(merged, key)) else "mapping"
            raise ConfigError(f"override {item!r}: '{key}' is a {kind} in {where} and the value is not "
                              f"({_first_line(e)}); give a {kind}") from None
    try:
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:  # e.g. an ${interpolation} to a key that does not exist
        raise ConfigError(f"{where}: key '{getattr(e, 'full_key', '?')}': {_first_line(e)}") from None
    cfg = build_dataclass(TrainConfig, raw or {}, where=where)
    validate(cfg)
    return cfg


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data (for YAML output and for logging hyperparameters)."""
    return dataclasses.asdict(cfg)


def build_dataclass(cls, raw: dict, where: str, section: str = ""):
    """Instantiate dataclass `cls` from `raw`, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section '{section or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)  # extras: keep Annotated's choice text
    _check_keys(cls, raw, where, section)
    kwargs = {key: _convert(hints[key], value, where, f"{section}.{key}" if section else key)
              for key, value in raw.items()}
    return cls(**kwargs)


def _check_keys(cls, raw, where: str, section: str = "") -> None:
    """Every key of `raw` (and of its sections, recursively) must be a field of dataclass `cls`;
    an unknown one is named with the closest keys of the whole schema."""
    if not isinstance(raw, dict):
        return  # a section given as a scalar: build_dataclass names it
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        dotted = f"{section}.{key}" if section else key
        if key not in known:
            close = _closest(dotted)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{where}: unknown key '{dotted}' in section '{section or 'top level'}'{hint} "
                              f"Known keys there: {', '.join(known)}")
        if dataclasses.is_dataclass(hints[key]):
            _check_keys(hints[key], value, where, dotted)


def _schema_keys(cls=TrainConfig, section: str = "") -> list[str]:
    """Every dotted key of the schema, sections too ("optimizer", "optimizer.lr", ...)."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        dotted = f"{section}.{name}" if section else name
        keys += [dotted, *(_schema_keys(hint, dotted) if dataclasses.is_dataclass(hint) else [])]
    return keys


def _closest(dotted: str) -> list[str]:
    """Up to three schema keys like `dotted`: the same name in another section first (trainer.lr
    -> optimizer.lr), then by spelling over the whole dotted name, so that a section's name
    counts too (optimizer.learning_rate -> optimizer.lr)."""
    keys = _schema_keys()
    leaf = dotted.rsplit(".", 1)[-1]
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    spelled = difflib.get_close_matches(dotted, keys, n=3, cutoff=0.5)
    return list(dict.fromkeys(same_name + spelled))[:3]


def _convert(hint, value, where: str, dotted: str, choices: str | None = None):
    """Check `value` against the annotation `hint`; ints are accepted where floats are expected.

    Literal[...] (optionally Annotated with a text describing the choices) admits exactly its
    values, compared with their types so that `true` is not taken for 1.
    """
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where, dotted)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _convert(args[0], value, where, dotted, choices=args[1])
    if origin is typing.Literal:
        if not any(type(value) is type(allowed) and value == allowed for allowed in args):
            choices = choices or "one of " + ", ".join(repr(allowed) for allowed in args)
            raise ConfigError(f"{where}: {dotted}={value!r}: choose {choices}")
        return value
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
    for key in ("d_model", "n_layer", "d_state", "d_conv", "expand", "pad_vocab_size_multiple",
                "headdim", "ngroups", "chunk_size"):
        _require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _require(0 < m.dt_min <= m.dt_max, f"model.dt_min={m.dt_min}, model.dt_max={m.dt_max}: need 0 < dt_min <= dt_max")
    _require(
        len(m.A_init_range) == 2 and 0 < m.A_init_range[0] <= m.A_init_range[1],
        f"model.A_init_range={m.A_init_range}: give [low, high] with 0 < low <= high",
    )
    if m.ssm_layer == "mamba2":
        d_inner = m.expand * m.d_model
        _require(d_inner % m.headdim == 0,
                 f"model.headdim={m.headdim} must divide expand * d_model = {d_inner} (ssm_layer mamba2)")
        _require((d_inner // max(m.headdim, 1)) % m.ngroups == 0,
                 f"model.ngroups={m.ngroups} must divide the number of heads {d_inner // max(m.headdim, 1)}")
    if m.ssm_layer == "mamba3":
        _validate_mamba3(m)
    else:
        _require(not m.is_mimo, f"model.is_mimo=true is Mamba-3's MIMO form; set model.ssm_layer=mamba3 "
                                f"(it is {m.ssm_layer}) or model.is_mimo=false")
    _validate_hybrid(m)
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
    _check_sources(d.sources, "data.sources", allow_empty=False)
    _check_sources(d.eval_sources, "data.eval_sources", allow_empty=True)
    for key in ("fim_rate", "fim_spm_rate"):
        _require(0 <= getattr(d, key) <= 1, f"data.{key}={getattr(d, key)} must be a probability in [0, 1]")
    durations = (("trainer.max_duration", t.max_duration), ("scheduler.t_warmup", s.t_warmup),
                 ("scheduler.t_max", s.t_max), ("trainer.save_interval", t.save_interval),
                 ("trainer.eval_interval", t.eval_interval), ("logging.log_interval", cfg.logging.log_interval))
    for key, value in durations:
        _require(
            not value.endswith("ep"),
            f"{key}={value!r}: the training data has no epochs (each source restarts when it runs out, "
            f"at its own pace), so give it in batches, tokens or samples, e.g. '1000ba' or '2e9tok'",
        )
    _require(o.lr > 0, f"optimizer.lr must be positive, got {o.lr}")
    _require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optimizer.betas={o.betas} must be two numbers in [0, 1)",
    )
    _require(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip_norm >= 0, f"optimizer.grad_clip_norm must be >= 0 (0 disables), got {o.grad_clip_norm}")
    _require(0 <= s.alpha_f <= 1, f"scheduler.alpha_f={s.alpha_f} must be in [0, 1]")
    for key, value in durations:
        _require(
            bool(_DURATION.match(value)),
            f"{key}={value!r} is not a duration: write e.g. '1000ba', '2e9tok', '1ep' or '1dur'",
        )
    _require(not t.max_duration.endswith("dur"),
             f"trainer.max_duration={t.max_duration!r}: 'dur' is a share of max_duration itself; "
             f"give it in batches, tokens or samples, e.g. '1000ba'")
    _validate_fsdp(cfg)
    _validate_schedule(cfg)
    _require(
        all(isinstance(n, str) and n for n in o.no_decay),
        f"optimizer.no_decay={o.no_decay!r} must be a list of parameter-name parts, e.g. [A_log, D, bias]",
    )
    _require(t.micro_batch_size > 0, f"trainer.micro_batch_size must be positive, got {t.micro_batch_size}")
    _require(t.global_batch_size > 0, f"trainer.global_batch_size must be positive, got {t.global_batch_size}")
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
        f"trainer.micro_batch_size={t.micro_batch_size}; change one of them",
    )


def _validate_mamba3(m) -> None:
    """The Mamba-3 mixer's shape rules (mamba/model/mamba3.py), named by key with the fix."""
    d_inner = m.expand * m.d_model
    _require(d_inner % m.headdim == 0,
             f"model.headdim={m.headdim} must divide expand * d_model = {d_inner} (ssm_layer mamba3)")
    _require((d_inner // max(m.headdim, 1)) % m.ngroups == 0,
             f"model.ngroups={m.ngroups} must divide the number of heads {d_inner // max(m.headdim, 1)} "
             "(ssm_layer mamba3)")
    _require(m.rope_fraction in (0.5, 1.0),
             f"model.rope_fraction={m.rope_fraction}: choose 0.5 or 1.0 (mamba-ssm's Mamba-3 allows these)")
    _require(int(m.d_state * m.rope_fraction) >= 2,
             f"model.d_state={m.d_state} with model.rope_fraction={m.rope_fraction} rotates no channel pair; "
             "use d_state >= 4 (or rope_fraction 1.0)")
    _require(m.A_floor > 0, f"model.A_floor={m.A_floor} must be positive (the decay rate is clamped to A <= -A_floor)")
    if m.is_mimo:
        _require(m.mimo_rank >= 1, f"model.mimo_rank={m.mimo_rank} must be >= 1 (with model.is_mimo)")
        _require(m.d_state % 2 == 0,
                 f"model.d_state={m.d_state} must be even with model.is_mimo (MIMO rotates channel i with i + d_state/2)")


def _validate_hybrid(m) -> None:
    """The attention layers and MLPs of a hybrid model (mamba-ssm's MHA asserts the same shapes)."""
    _require(m.d_intermediate >= 0, f"model.d_intermediate must be >= 0 (0: no MLP), got {m.d_intermediate}")
    idx, a = m.attn_layer_idx, m.attn_cfg
    _require(all(type(i) is int and 0 <= i < m.n_layer for i in idx) and len(set(idx)) == len(idx),
             f"model.attn_layer_idx={idx}: give distinct layer indices in 0..{m.n_layer - 1} (model.n_layer={m.n_layer})")
    if not idx:
        return
    _require(a.num_heads > 0, f"model.attn_cfg.num_heads must be > 0 for the attention layers {idx}, got {a.num_heads}")
    kv = a.num_heads if a.num_heads_kv is None else a.num_heads_kv
    _require(kv > 0 and a.num_heads % kv == 0,
             f"model.attn_cfg.num_heads_kv={a.num_heads_kv} must divide num_heads={a.num_heads}")
    _require(a.head_dim is not None or m.d_model % a.num_heads == 0,
             f"model.attn_cfg.num_heads={a.num_heads} must divide d_model={m.d_model}, or set attn_cfg.head_dim")
    head_dim = a.head_dim if a.head_dim is not None else m.d_model // a.num_heads
    _require(head_dim > 0, f"model.attn_cfg.head_dim must be positive, got {a.head_dim}")
    _require(0 <= a.rotary_emb_dim <= head_dim and a.rotary_emb_dim % 2 == 0,
             f"model.attn_cfg.rotary_emb_dim={a.rotary_emb_dim} must be even and in 0..head_dim={head_dim}")
    _require(a.rotary_emb_base > 0, f"model.attn_cfg.rotary_emb_base must be positive, got {a.rotary_emb_base}")
    _require(a.d_conv >= 0, f"model.attn_cfg.d_conv must be >= 0 (0: no convolution), got {a.d_conv}")
    _require(a.causal, "model.attn_cfg.causal=false would let the language model attend to the tokens it "
             "predicts; set it to true (mamba-ssm's MHA defaults to false, its LM configs set true)")
    _require(a.softmax_scale is None or a.softmax_scale > 0,
             f"model.attn_cfg.softmax_scale must be positive or null, got {a.softmax_scale}")


def _validate_fsdp(cfg: TrainConfig) -> None:
    f = cfg.fsdp
    _require(f.shard_degree == -1 or f.shard_degree > 0,
             f"fsdp.shard_degree={f.shard_degree} must be -1 (ranks of one node) or a positive rank count")
    _require(f.shard_degree == -1 or f.sharding_strategy == "HYBRID_SHARD",
             f"fsdp.shard_degree={f.shard_degree} only applies with fsdp.sharding_strategy=HYBRID_SHARD "
             f"(got {f.sharding_strategy}); set shard_degree=-1 or use HYBRID_SHARD")
    _require(f.activation_checkpointing_every >= 1,
             f"fsdp.activation_checkpointing_every={f.activation_checkpointing_every} must be >= 1 "
             f"(1 = every block); turn checkpointing off with fsdp.activation_checkpointing=false")


def _split(duration: str) -> tuple[float, str]:
    """'2e9tok' -> (2e9, 'tok'); only called on strings that matched _DURATION."""
    number, unit = re.match(r"^(\d+(?:\.\d+)?(?:e\d+)?)([a-z]+)$", duration).groups()
    return float(number), unit


def per_rank_batch(cfg: TrainConfig, world_size: int) -> int:
    """trainer.global_batch_size / world_size; fails unless it is micro x accumulation x ranks.
    The rule both training (mamba/training/parallel.py) and create_mamba_config.py's plan check."""
    t = cfg.trainer
    if t.global_batch_size % (t.micro_batch_size * world_size) != 0:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} must be a multiple of "
            f"trainer.micro_batch_size={t.micro_batch_size} x {world_size} ranks "
            f"= {t.micro_batch_size * world_size}; change global_batch_size or micro_batch_size"
        )
    return t.global_batch_size // world_size


def duration_in_batches(duration: str, cfg: TrainConfig) -> int:
    """A duration of the validated `cfg` as optimizer steps: samples and tokens through the global
    batch (rounded up: the step that reaches them), "Xdur" as that share of max_duration."""
    value, unit = _split(duration)
    if unit == "dur":
        return math.ceil(value * duration_in_batches(cfg.trainer.max_duration, cfg))
    windows = cfg.trainer.global_batch_size
    return math.ceil(value / {"ba": 1, "sp": windows, "tok": windows * cfg.data.seq_len}[unit])


def _unit(duration: str, max_duration: str) -> str:
    """The unit a duration counts in once "Xdur" is resolved against max_duration."""
    unit = _split(duration)[1]
    return _split(max_duration)[1] if unit == "dur" else unit


def _amount(duration: str, max_duration: str) -> float:
    value, unit = _split(duration)
    return value * _split(max_duration)[0] if unit == "dur" else value


def _validate_schedule(cfg: TrainConfig) -> None:
    """Warmup, decay and t_max must count the same thing, and fit inside each other."""
    s, max_d = cfg.scheduler, cfg.trainer.max_duration
    _require(0 < s.decay_fraction <= 1, f"scheduler.decay_fraction={s.decay_fraction} must be in (0, 1]")
    spans = [("scheduler.t_warmup", s.t_warmup), ("scheduler.t_max", s.t_max)]
    if s.t_decay is not None:
        _require(bool(_DURATION.match(s.t_decay)) and not s.t_decay.endswith("ep"),
                 f"scheduler.t_decay={s.t_decay!r} is not a duration: write e.g. '2000ba' or '1e9tok'")
        spans.append(("scheduler.t_decay", s.t_decay))
    units = {key: _unit(value, max_d) for key, value in spans}
    _require(
        len(set(units.values())) == 1,
        "schedule durations count different things: "
        + ", ".join(f"{k}={v!r} ({units[k]})" for k, v in spans)
        + f" (\"dur\" means trainer.max_duration={max_d!r}); give them all in one unit, e.g. all in 'ba' or all in 'tok'",
    )
    warmup, t_max = _amount(s.t_warmup, max_d), _amount(s.t_max, max_d)
    _require(warmup < t_max, f"scheduler.t_warmup={s.t_warmup!r} must be shorter than scheduler.t_max={s.t_max!r} "
                             f"(trainer.max_duration={max_d!r}); shorten the warmup or lengthen t_max")
    if s.name == "wsd":
        decay = _amount(s.t_decay, max_d) if s.t_decay is not None else s.decay_fraction * t_max
        _require(warmup + decay <= t_max,
                 f"scheduler.t_warmup={s.t_warmup!r} plus the decay ({s.t_decay or f'{s.decay_fraction} x t_max'}) "
                 f"exceeds scheduler.t_max={s.t_max!r}; shorten scheduler.t_warmup or scheduler.t_decay/decay_fraction")


def _check_sources(entries, key: str, allow_empty: bool) -> None:
    """Each entry must be {path: non-empty str, weight: number > 0 (optional, default 1)}."""
    _require(isinstance(entries, list), f"{key} must be a list of {{path, weight}} mappings, got {entries!r}")
    _require(bool(entries) or allow_empty,
             f"{key} is empty: list at least one packed directory, e.g. {key}=[{{path: ./data/packed, weight: 1}}]")
    for i, entry in enumerate(entries):
        _require(isinstance(entry, dict), f"{key}[{i}]={entry!r} must be a mapping {{path: DIR, weight: W}}")
        unknown = sorted(set(entry) - {"path", "weight"})
        _require(not unknown, f"{key}[{i}]: unknown keys {unknown}; an entry has only 'path' and 'weight'")
        path = entry.get("path")
        _require(isinstance(path, str) and bool(path), f"{key}[{i}].path must be a directory name, got {path!r}")
        weight = entry.get("weight", 1.0)
        _require(
            isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
            f"{key}[{i}].weight={weight!r} must be a number > 0 (its share relative to the other sources)",
        )
    if entries:
        try:
            integer_weights([e.get("weight", 1.0) for e in entries])
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
