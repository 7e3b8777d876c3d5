"""Strict config loading: every kind of bad config fails naming the key and the fix."""
from pathlib import Path

import pytest

from mamba.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_default_recipe_is_the_1_6b_cluster_config():
    cfg = load_config(REPO / "config.yaml")
    m, t, o = cfg.model, cfg.trainer, cfg.optimizer
    assert (m.vocab_size, m.d_model, m.n_layer, cfg.data.seq_len) == (65024, 2688, 28, 4096)
    assert (t.global_batch_size, t.micro_batch_size) == (896, 7)
    assert (o.lr, o.betas, o.weight_decay) == (4.5e-4, [0.9, 0.95], 0.1)
    assert cfg.fsdp.activation_checkpointing and cfg.fsdp.reshard_after_forward


def test_overrides_apply_and_convert_ints_to_floats(tmp_path):
    cfg = load_config(REPO / "config.yaml", ["optimizer.lr=1", "model.n_layer=2", "run_name=x"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.n_layer == 2 and cfg.run_name == "x"


def test_misspelled_key_names_section_and_close_match(tmp_path):
    path = write(tmp_path, "optimizer:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.weight_decy'.*did you mean 'weight_decay'"):
        load_config(path)


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainr'.*'trainer'"):
        load_config(write(tmp_path, "trainr:\n  max_duration: 10ba\n"))


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match=r"model.d_modle.*'d_model'"):
        load_config(REPO / "config.yaml", ["model.d_modle=64"])


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("model:\n  n_layer: two\n", r"'model.n_layer' must be of type int"),
        ("model:\n  n_layer: 2.5\n", r"'model.n_layer' must be of type int"),
        ("trainer:\n  autoresume: 3\n", r"'trainer.autoresume' must be of type bool"),
        ("data: 5\n", r"section 'data' must be a mapping"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.vocab_size=70000", r"model.vocab_size=70000 must be in 1..65536"),
        ("data.seq_len=20000", r"data.seq_len=20000 must be in 1..16384"),
        ("trainer.micro_batch_size=5", r"global_batch_size=896 is not a multiple of trainer.micro_batch_size=5"),
        ("scheduler.t_warmup=10steps", r"scheduler.t_warmup='10steps' is not a duration"),
        ("scheduler.name=wsdx", r"scheduler.name='wsdx': choose one of"),
        ("model.ssm_layer=mamba3", r"model.ssm_layer='mamba3'"),
        ("optimizer.betas=[0.9]", r"optimizer.betas=\[0.9\] must be two numbers"),
    ],
)
def test_cross_field_rules(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(REPO / "config.yaml", [override])


def test_world_size_must_divide_the_global_batch():
    from mamba.config.load import check_world_size

    cfg = load_config(REPO / "config.yaml")
    assert check_world_size(cfg, 8) == 112
    with pytest.raises(ConfigError, match=r"multiple of trainer.micro_batch_size=7 x 3 ranks = 21"):
        check_world_size(cfg, 3)


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(REPO / "config.yaml", ["optimizer.lr"])
