"""Strict config loading: every kind of bad config fails naming the key and the fix."""
import dataclasses
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mamba.config import ConfigError, TrainConfig
from mamba.config.load import duration_in_batches, load_config, to_dict
from mamba.training.parallel import check_world_size, mesh_shape

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_default_recipe_is_the_1_6b_cluster_config():
    cfg = load_config(REPO / "config.yaml")
    # config.yaml is the commented copy of the schema defaults, key for key (a key it leaves out
    # would take the default, so compare what the file itself says too).
    assert to_dict(cfg) == to_dict(TrainConfig())
    written = OmegaConf.to_container(OmegaConf.load(REPO / "config.yaml"))
    defaults = to_dict(TrainConfig())
    assert all(written[section] == {k: defaults[section][k] for k in written[section]}
               for section in written if isinstance(written[section], dict))
    m, t, o = cfg.model, cfg.trainer, cfg.optimizer
    assert (m.vocab_size, m.d_model, m.n_layer, cfg.data.seq_len) == (65024, 2688, 28, 4096)
    assert (t.global_batch_size, t.micro_batch_size) == (896, 7)
    assert (o.lr, o.betas, o.weight_decay) == (4.5e-4, [0.9, 0.95], 0.1)
    f = cfg.fsdp
    assert (f.version, f.sharding_strategy, f.activation_checkpointing, f.activation_checkpointing_every) == (
        2, "FULL_SHARD", True, 1)
    assert cfg.scheduler.name == "cosine" and cfg.optimizer.no_decay[:3] == ["A_log", "D", "dt_bias"]


def test_overrides_apply_and_convert_ints_to_floats(tmp_path):
    cfg = load_config(REPO / "config.yaml", ["optimizer.lr=1", "model.n_layer=2", "run_name=x"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.n_layer == 2 and cfg.run_name == "x"


def test_misspelled_key_names_section_and_close_match(tmp_path):
    path = write(tmp_path, "optimizer:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.weight_decy'.*did you mean 'optimizer.weight_decay'"):
        load_config(path)


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainr'.*'trainer'"):
        load_config(write(tmp_path, "trainr:\n  max_duration: 10ba\n"))


def test_unknown_override_is_refused_naming_the_command_line():
    with pytest.raises(ConfigError, match=r"^command line \(override 'model.d_modle=64'\): unknown key "
                                          r"'model.d_modle'.*did you mean 'model.d_model'"):
        load_config(REPO / "config.yaml", ["model.d_modle=64"])
    # The closest keys come from the whole schema: a section's name counts, and the same name
    # in another section is found.
    with pytest.raises(ConfigError, match=r"did you mean 'optimizer.lr'"):
        load_config(REPO / "config.yaml", ["optimizer.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.lr' in section 'trainer'; did you mean 'optimizer.lr'"):
        load_config(REPO / "config.yaml", ["trainer.lr=1"])
    with pytest.raises(ConfigError,
                       match=r"^command line \(override 'model=\{d_modle: 3\}'\): unknown key 'model.d_modle'"):
        load_config(REPO / "config.yaml", ["model={d_modle: 3}"])  # a whole section given on the command line


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
        ("model.ssm_layer=mamba4", r"model.ssm_layer='mamba4'"),
        ("optimizer.betas=[0.9]", r"optimizer.betas=\[0.9\] must be two numbers"),
        ("optimizer.no_decay=[1]", r"optimizer.no_decay=\[1\] must be a list of parameter-name parts"),
        ("fsdp.sharding_strategy=FULLSHARD", r"fsdp.sharding_strategy='FULLSHARD': choose one of"),
        ("fsdp.version=3", r"fsdp.version=3: choose 2"),
        ("fsdp.shard_degree=4", r"fsdp.shard_degree=4 only applies with fsdp.sharding_strategy=HYBRID_SHARD"),
        ("fsdp.activation_checkpointing_every=0", r"fsdp.activation_checkpointing_every=0 must be >= 1"),
        ("fsdp.mixed_precision=bf16", r"fsdp.mixed_precision='bf16': choose DEFAULT \(bf16 all-gathers\) or FULL"),
        ("scheduler.decay_shape=sqrt", r"scheduler.decay_shape='sqrt': choose one of"),
        ("scheduler.decay_fraction=1.5", r"scheduler.decay_fraction=1.5 must be in \(0, 1\]"),
        ("scheduler.t_decay=soon", r"scheduler.t_decay='soon' is not a duration"),
        # warmup as long as the whole schedule: both keys named, with the fix
        ("scheduler.t_warmup=100000ba",
         r"scheduler.t_warmup='100000ba' must be shorter than scheduler.t_max='1dur' "
         r"\(trainer.max_duration='100000ba'\); shorten the warmup"),
        # tokens vs batches cannot be compared: refused naming every key and its unit
        ("scheduler.t_warmup=1e8tok",
         r"scheduler.t_warmup='1e8tok' \(tok\), scheduler.t_max='1dur' \(ba\).*give them all in one unit"),
        ("trainer.max_duration=2e10tok", r"scheduler.t_warmup='2000ba' \(ba\), scheduler.t_max='1dur' \(tok\)"),
    ],
)
def test_cross_field_rules(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(REPO / "config.yaml", [override])


def test_wsd_warmup_plus_decay_must_fit_in_t_max():
    with pytest.raises(ConfigError, match=r"t_warmup='2000ba' plus the decay \(9000ba\) exceeds scheduler.t_max='10000ba'"):
        load_config(REPO / "config.yaml", ["scheduler.name=wsd", "scheduler.t_max=10000ba", "scheduler.t_decay=9000ba"])
    cfg = load_config(REPO / "config.yaml", ["scheduler.name=wsd", "trainer.max_duration=4e9tok",
                                             "scheduler.t_warmup=1e8tok", "scheduler.t_decay=8e8tok"])
    assert (cfg.scheduler.name, cfg.scheduler.t_decay) == ("wsd", "8e8tok")


def test_hybrid_shard_degree_must_divide_the_ranks():
    cfg = load_config(REPO / "config.yaml", ["fsdp.sharding_strategy=HYBRID_SHARD", "fsdp.shard_degree=3",
                                             "trainer.global_batch_size=168"])
    with pytest.raises(ConfigError, match=r"fsdp.shard_degree=3 must divide the 8 ranks"):
        check_world_size(cfg, 8)
    assert check_world_size(cfg, 6) == 28


def test_hybrid_shard_groups_of_one_node_must_divide_the_ranks(monkeypatch):
    # shard_degree -1 means the ranks of one node; the launcher says how many (LOCAL_WORLD_SIZE).
    cfg = load_config(REPO / "config.yaml", ["fsdp.sharding_strategy=HYBRID_SHARD", "trainer.global_batch_size=168"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    message = r"fsdp.shard_degree=-1 \(the 4 ranks of one node\) must divide the 6 ranks"
    with pytest.raises(ConfigError, match=message):
        check_world_size(cfg, 6)
    with pytest.raises(ConfigError, match=message):  # the mesh is built by the same rule
        mesh_shape(cfg.fsdp, 6, 4)
    assert check_world_size(cfg, 8) == 21 and mesh_shape(cfg.fsdp, 8, 4) == (2, 4)


def test_world_size_must_divide_the_global_batch():
    cfg = load_config(REPO / "config.yaml")
    assert check_world_size(cfg, 8) == 112
    with pytest.raises(ConfigError, match=r"multiple of trainer.micro_batch_size=7 x 3 ranks = 21"):
        check_world_size(cfg, 3)


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(REPO / "config.yaml", ["optimizer.lr"])


@pytest.mark.parametrize("override, pattern", [
    ("optimizer.betas={a: 1}", r"'optimizer.betas' is a list in .*config.yaml and the value is not .*give a list"),
    ("data.sources={1: 2}", r"'data.sources' is a list in .*config.yaml"),
])
def test_an_override_of_another_container_kind_names_the_key(override, pattern):
    """omegaconf's merge raises a bare TypeError for a mapping onto a list (found by the fuzz suite)."""
    with pytest.raises(ConfigError, match=pattern):
        load_config(REPO / "config.yaml", [override])


def literal_fields():
    """(dotted key, allowed values) of every schema field typed with a Literal."""
    for section, cls in typing.get_type_hints(TrainConfig).items():
        if dataclasses.is_dataclass(cls):
            for name, hint in typing.get_type_hints(cls).items():  # Annotated[Literal, text] -> Literal
                if typing.get_origin(hint) is typing.Literal:
                    yield f"{section}.{name}", typing.get_args(hint)


LITERAL_FIELDS = dict(literal_fields())


def test_enumerated_keys_are_literals():
    assert {"model.ssm_layer", "model.kernels", "scheduler.name", "scheduler.decay_shape", "fsdp.version",
            "fsdp.sharding_strategy", "fsdp.mixed_precision", "fsdp.state_dict_type", "trainer.precision",
            "trainer.device", "trainer.on_nonfinite_loss"} <= set(LITERAL_FIELDS)


@pytest.mark.parametrize("key", sorted(LITERAL_FIELDS))
def test_every_literal_key_refuses_other_values_listing_the_choices(key):
    choices = LITERAL_FIELDS[key]
    for allowed in choices:  # each allowed value loads as given
        section, name = key.split(".")
        assert getattr(getattr(load_config({section: {name: allowed}}), section), name) == allowed
    bad = "nonsense" if isinstance(choices[0], str) else 7
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "config.yaml", [f"{key}={bad}"])
    message = str(err.value)
    assert f"{key}={bad!r}: choose" in message and "config.yaml" in message
    assert all(str(allowed) in message for allowed in choices), message


def test_a_literal_compares_types_too():
    # YAML `true` equals 1 in Python; it is still not the FSDP version 1.
    with pytest.raises(ConfigError, match=r"fsdp.version=True: choose 2"):
        load_config({"fsdp": {"version": True}})


def test_in_memory_data_loads_like_the_file_and_is_named_honestly():
    text = (REPO / "config.yaml").read_text()
    from_file = load_config(REPO / "config.yaml", ["optimizer.lr=1e-3"])
    data = OmegaConf.to_container(OmegaConf.create(text))
    assert load_config(data, ["optimizer.lr=1e-3"]) == from_file
    assert load_config(OmegaConf.create(text), ["optimizer.lr=1e-3"]) == from_file
    assert load_config({}) == load_config(None) == TrainConfig()
    with pytest.raises(ConfigError, match=r"^config: key 'trainer.autoresume' must be of type bool"):
        load_config({"trainer": {"autoresume": 3}})
    with pytest.raises(ConfigError, match=r"^config: unknown key 'model.d_modle'"):
        load_config({**data, "model": {"d_modle": 3}})


@pytest.mark.parametrize("duration, steps", [("300ba", 300), ("1dur", 1000), ("0.25dur", 250), ("16sp", 2),
                                             ("2048tok", 2), ("2049tok", 3), ("1e4ba", 10000)])
def test_durations_in_batches(duration, steps):
    # 8 windows of 128 tokens per step: samples and tokens round up to the step that reaches them.
    cfg = load_config(REPO / "config.yaml", ["trainer.max_duration=1000ba", "trainer.global_batch_size=8",
                                             "trainer.micro_batch_size=1", "data.seq_len=128", "scheduler.t_warmup=10ba"])
    assert duration_in_batches(duration, cfg) == steps


def test_max_duration_cannot_be_a_share_of_itself():
    with pytest.raises(ConfigError, match=r"trainer.max_duration='1dur': 'dur' is a share of max_duration itself"):
        load_config(REPO / "config.yaml", ["trainer.max_duration=1dur"])


@pytest.mark.parametrize("overrides, pattern", [
    (["model.attn_layer_idx=[3,3]"], r"model.attn_layer_idx=\[3, 3\]: give distinct layer indices in 0..27"),
    (["model.attn_layer_idx=[28]"], r"model.attn_layer_idx=\[28\].*\(model.n_layer=28\)"),
    (["model.attn_layer_idx=[1]"], r"model.attn_cfg.num_heads must be > 0 for the attention layers \[1\]"),
    (["model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=21", "model.attn_cfg.num_heads_kv=5"],
     r"model.attn_cfg.num_heads_kv=5 must divide num_heads=21"),
    (["model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=5"], r"num_heads=5 must divide d_model=2688, or set"),
    (["model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=21", "model.attn_cfg.rotary_emb_dim=130"],
     r"rotary_emb_dim=130 must be even and in 0..head_dim=128"),
    (["model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=21", "model.attn_cfg.rotary_emb_dim=63"],
     r"rotary_emb_dim=63 must be even"),
    (["model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=21", "model.attn_cfg.causal=false"],
     r"model.attn_cfg.causal=false would let the language model attend"),
    (["model.d_intermediate=-1"], r"model.d_intermediate must be >= 0"),
    (["model.attn_cfg.num_head=16"], r"num_head.*num_heads"),  # strict keys inside attn_cfg too
])
def test_hybrid_rules(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(REPO / "config.yaml", overrides)


def test_a_valid_hybrid_loads_and_builds_its_layers():
    from mamba.model.factory import build_model

    cfg = load_config(REPO / "config.yaml", [
        "model.d_model=64", "model.n_layer=4", "model.ssm_layer=mamba2", "model.headdim=32", "model.d_state=16",
        "model.attn_layer_idx=[1,3]", "model.attn_cfg.num_heads=4", "model.attn_cfg.num_heads_kv=2",
        "model.attn_cfg.rotary_emb_dim=8", "model.d_intermediate=96", "model.vocab_size=300"])
    model = build_model(cfg.model, device="cpu")
    kinds = [type(layer.mixer).__name__ for layer in model.backbone.layers]
    assert kinds == ["Mamba2", "MHA", "Mamba2", "MHA"]
    assert model.backbone.layers[1].mixer.num_heads_kv == 2 and model.backbone.layers[0].mlp.hidden == 128
