"""Generated invalid configs: each is refused with a ConfigError naming the key, never with an
exception from inside omegaconf, yaml or torch (hypothesis, bounded: 50 examples a property).

The keys and their types come from mamba/config/schema.py itself, so a key added there is fuzzed
too. Each case starts from the valid default recipe (config.yaml) and breaks one key.
"""
import copy
import dataclasses
import re
import typing
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from mamba.config import ConfigError, TrainConfig
from mamba.config.load import load_config

REPO = Path(__file__).resolve().parents[2]
BASE = OmegaConf.to_container(OmegaConf.load(REPO / "config.yaml"))
FUZZ = settings(max_examples=50, deadline=None, database=None)  # no .hypothesis/ folder left behind


def leaves(cls=TrainConfig, section: str = "") -> dict[str, type]:
    """Every leaf key of the schema, dotted, with its annotation (Annotated stripped)."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        dotted = f"{section}.{name}" if section else name
        found.update(leaves(hint, dotted) if dataclasses.is_dataclass(hint) else {dotted: hint})
    return found


LEAVES = leaves()
LITERALS = {k: typing.get_args(h) for k, h in LEAVES.items() if typing.get_origin(h) is typing.Literal}
DURATIONS = ["trainer.max_duration", "trainer.save_interval", "trainer.eval_interval", "scheduler.t_warmup",
             "scheduler.t_max", "scheduler.t_decay", "logging.log_interval"]
# Sizes and rates that must be positive (0 too is refused) or, for these two, >= 0.
POSITIVE = ["model.d_model", "model.n_layer", "model.vocab_size", "model.d_state", "model.expand",
            "model.d_conv", "data.seq_len", "trainer.micro_batch_size", "trainer.global_batch_size",
            "optimizer.lr"]
NON_NEGATIVE = ["data.num_workers", "optimizer.weight_decay", "optimizer.grad_clip_norm"]


def with_value(dotted: str, value) -> dict:
    raw = copy.deepcopy(BASE)
    *sections, key = dotted.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value
    return raw


def refused(source, overrides=(), key: str = "") -> str:
    """The ConfigError's message; any other exception type fails the test with its traceback."""
    try:
        load_config(source, overrides)
    except ConfigError as err:
        assert key in str(err), f"{err} does not name {key}"
        return str(err)
    raise AssertionError(f"accepted: {key} (overrides {list(overrides)})")


def wrong_type(hint):
    """Values that are not of the type `hint` describes (ints are not floats' wrong type)."""
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
    candidates = {
        int: st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.floats(allow_nan=False),
                       st.booleans()).filter(lambda v: not (isinstance(v, float) and v.is_integer())),
        float: st.one_of(st.text(max_size=5), st.lists(st.floats(), max_size=2), st.booleans()),
        bool: st.one_of(st.integers(), st.text(max_size=5), st.floats(allow_nan=False)),
        str: st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2), st.booleans()),
        list: st.one_of(st.integers(), st.text(max_size=5), st.dictionaries(st.just("a"), st.integers())),
    }
    return candidates.get(base, st.dictionaries(st.just("x"), st.integers(), min_size=1))


@st.composite
def wrongly_typed(draw):
    key = draw(st.sampled_from(sorted(k for k in LEAVES if k not in LITERALS)))
    return key, draw(wrong_type(LEAVES[key]))


@FUZZ
@given(wrongly_typed())
def test_a_value_of_the_wrong_type_is_refused(case):
    key, value = case
    refused(with_value(key, value), key=key)


@FUZZ
@given(st.sampled_from(sorted(LEAVES)), st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
def test_an_unknown_key_is_refused_with_the_known_ones(where, name):
    section = where.rsplit(".", 1)[0] if "." in where else ""
    dotted = f"{section}.{name}" if section else name
    if dotted in LEAVES or name in BASE:
        return
    message = refused(with_value(dotted, 1), key=dotted)
    assert "Known keys there" in message


@FUZZ
@given(st.sampled_from(sorted(LITERALS)), st.one_of(st.text(max_size=8), st.integers(), st.booleans()))
def test_a_value_outside_a_literal_is_refused_with_the_choices(key, value):
    if any(type(value) is type(allowed) and value == allowed for allowed in LITERALS[key]):
        return
    assert "choose" in refused(with_value(key, value), key=key)


@FUZZ
@given(st.sampled_from(POSITIVE + NON_NEGATIVE), st.integers(max_value=-1))
def test_a_negative_size_is_refused(key, value):
    refused(with_value(key, value), key=key)


@FUZZ
@given(st.sampled_from(DURATIONS), st.text(alphabet="0123456789.e-abdeikopstu ", max_size=8))
def test_a_bad_duration_is_refused(key, value):
    if re.fullmatch(r"\d+(\.\d+)?(e\d+)?(ba|tok|sp|dur)", value):
        return  # a valid duration (only the schedule rules could refuse it)
    refused(with_value(key, value), key=key)


@FUZZ
@given(st.sampled_from(sorted(LEAVES)), st.text(alphabet="${}[]:,'\" ab1.=-#\\", max_size=10))
def test_any_override_text_loads_or_is_refused_naming_the_key(key, value):
    """Values as typed on the command line go through omegaconf's and YAML's parsers first: an
    unclosed bracket or an interpolation to nowhere must still be a ConfigError naming the key."""
    try:
        load_config(REPO / "config.yaml", [f"{key}={value}"])
    except ConfigError as err:
        assert key in str(err) or key.split(".")[0] in str(err), f"{err} does not name {key}"
