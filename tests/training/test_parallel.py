"""FSDP unit choice, activation-checkpointing selection and mesh shapes (the multi-rank runs are in
test_fsdp_resume.py)."""
import pytest
from composer.distributed.activation_checkpointing import apply_ac, generate_composer_model_check_fn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from mamba.config import ConfigError
from mamba.config.schema import FSDPConfig
from mamba.model.composer_model import ComposerMambaLM
from mamba.model.lm import MambaConfig, MambaLMHeadModel
from mamba.training.parallel import assign_units, build_parallelism, checkpointed_blocks, mesh_shape


def composer_model(tie: bool = True, n_layer: int = 5) -> ComposerMambaLM:
    return ComposerMambaLM(MambaLMHeadModel(MambaConfig(d_model=16, n_layer=n_layer, vocab_size=50,
                                                        tie_embeddings=tie)))


@pytest.mark.parametrize("every, expected", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3]), (9, [0])])
def test_activation_checkpointing_every_kth_block(every, expected):
    cm = composer_model()
    assign_units(cm.model, FSDPConfig(activation_checkpointing_every=every))
    assert checkpointed_blocks(cm.model) == expected
    # Composer's own AC pass (the one FSDP2 runs) wraps exactly those blocks.
    apply_ac(cm, True, False, generate_composer_model_check_fn(cm))
    wrapped = [i for i, b in enumerate(cm.model.backbone.layers) if isinstance(b, CheckpointWrapper)]
    assert wrapped == expected


def test_checkpointing_off_wraps_nothing():
    cm = composer_model()
    assign_units(cm.model, FSDPConfig(activation_checkpointing=False))
    assert checkpointed_blocks(cm.model) == []


def test_units_are_blocks_plus_untied_embedding_and_head():
    cm = composer_model(tie=False)
    assign_units(cm.model, FSDPConfig())
    units = [n for n, m in cm.model.named_modules() if cm.model.fsdp_wrap_fn(m)]
    assert units == ["backbone.embedding"] + [f"backbone.layers.{i}" for i in range(5)] + ["lm_head"]
    tied = composer_model(tie=True)
    assign_units(tied.model, FSDPConfig())
    # A tied embedding/head is one Parameter: it stays in the root unit with norm_f.
    assert [n for n, m in tied.model.named_modules() if tied.model.fsdp_wrap_fn(m)] == [
        f"backbone.layers.{i}" for i in range(5)]


def test_mesh_shapes():
    assert mesh_shape(FSDPConfig(sharding_strategy="FULL_SHARD"), 16, 8) is None
    assert mesh_shape(FSDPConfig(sharding_strategy="SHARD_GRAD_OP"), 16, 8) is None
    assert mesh_shape(FSDPConfig(sharding_strategy="NO_SHARD"), 16, 8) == (16, 1)
    assert mesh_shape(FSDPConfig(sharding_strategy="HYBRID_SHARD"), 16, 8) == (2, 8)   # one node per group
    assert mesh_shape(FSDPConfig(sharding_strategy="HYBRID_SHARD", shard_degree=4), 16, 8) == (4, 4)


def test_fsdp1_is_refused_on_cpu_and_one_rank_is_unwrapped():
    with pytest.raises(ConfigError, match=r"fsdp.version=1 \(FSDP1\) runs on GPUs only"):
        build_parallelism(FSDPConfig(version=1), "cpu", world_size=2)
    assert build_parallelism(FSDPConfig(), "cpu", world_size=1) is None
