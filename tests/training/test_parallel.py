"""FSDP unit choice, activation-checkpointing selection and mesh shapes (the multi-rank runs are in
test_fsdp_resume.py)."""
import pytest
import torch
from composer.core.precision import Precision
from composer.distributed.activation_checkpointing import apply_ac, generate_composer_model_check_fn
from composer.distributed.fsdp2 import create_mixed_precision_policy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import fully_shard

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


def test_fsdp1_is_refused_on_cpu_and_one_rank_is_fsdp2_unless_resuming_a_full_file(tmp_path):
    with pytest.raises(ConfigError, match=r"fsdp.version=1 \(FSDP1\) runs on GPUs only"):
        build_parallelism(FSDPConfig(version=1), "cpu", world_size=2)
    # One rank is a 1-rank FSDP2 mesh, so it writes the sharded checkpoints any world size loads.
    assert build_parallelism(FSDPConfig(), "cpu", world_size=1).fsdp2 is not None
    assert build_parallelism(FSDPConfig(), "cpu", world_size=1, resume_from=tmp_path).fsdp2 is not None
    assert build_parallelism(FSDPConfig(version=1), "gpu", world_size=1) is None
    # An older single-process run's full file resumes unwrapped on one process, and only there.
    full = tmp_path / "ep0-ba8-rank0.pt"
    full.write_bytes(b"")
    assert build_parallelism(FSDPConfig(), "cpu", world_size=1, resume_from=full) is None
    with pytest.raises(ConfigError, match=r"ep0-ba8-rank0.pt is a full one-file checkpoint.*Resume it on one process"):
        build_parallelism(FSDPConfig(), "cpu", world_size=2, resume_from=full)


@pytest.mark.parametrize("mode, gathered", [("DEFAULT", torch.bfloat16), ("FULL", torch.float32)])
def test_fsdp_mixed_precision_decides_the_dtype_a_log_d_and_dt_bias_reach_the_mixer_in(one_rank_gloo, monkeypatch,
                                                                                         mode, gathered):
    """The config's FSDP2Config through Composer's own policy builder, under bf16 autocast (the GPU
    recipe's amp_bf16; run here on CPU): DEFAULT gathers every parameter in bf16, FULL keeps them
    fp32; the matmuls run in bf16 either way, and the fp32 masters get fp32 gradients."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # what the launcher sets; the mesh choice reads it
    parallelism = build_parallelism(FSDPConfig(mixed_precision=mode), "gpu", world_size=2)
    policy = create_mixed_precision_policy(Precision.AMP_BF16, parallelism.fsdp2.mixed_precision)
    for ssm_layer in ("mamba1", "mamba2"):
        torch.manual_seed(0)
        model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=64, d_state=8, headdim=16,
                                             ssm_layer=ssm_layer))
        for block in model.backbone.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        mixer = model.backbone.layers[0].mixer
        seen = {}
        mixer.register_forward_pre_hook(lambda m, args: seen.update({n: p.dtype for n, p in m.named_parameters()}))
        mixer.in_proj.register_forward_hook(lambda m, args, out: seen.update(in_proj_output=out.dtype))
        tokens = torch.randint(0, 64, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens, labels=tokens).backward()
        ssm_params = [n for n in seen if n in ("A_log", "D", "dt_bias", "dt_proj.bias")]
        assert len(ssm_params) == 3, (ssm_layer, sorted(seen))  # dt bias: Mamba-1 dt_proj.bias, Mamba-2 dt_bias
        assert {seen[n] for n in ssm_params} == {gathered}, (ssm_layer, mode, seen)
        assert seen["in_proj.weight"] == gathered and seen["in_proj_output"] == torch.bfloat16
        assert mixer.A_log.dtype == torch.float32 and mixer.A_log.grad.dtype == torch.float32
        assert mixer.D.grad.to_local().abs().sum() > 0
