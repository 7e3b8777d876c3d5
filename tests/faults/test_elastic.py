"""Resume on another number of ranks: model, optimizer and data order continue.

Every run, one process included, trains under FSDP2 and writes sharded DCP checkpoints, which
torch.distributed.checkpoint reshards on load (mamba.training.parallel.build_parallelism); the
loader's resume counts global samples (mamba.data.loader). Runs on the fault tests' tiny config
(a checkpoint every 4 batches, a 2000-batch schedule, so a shorter max_duration leaves the
learning rate the same):
  reference  one process, 16 batches uninterrupted (checkpoints ba8, ba12, ba16 kept);
  1 -> 2     the reference's ba8 alone in a new save folder, `composer -n 2` to batch 16;
  2 -> 1     that 2-rank run's ba12 (two shard files), one process to batch 16;
  2 -> 4     the same ba12, `composer -n 4` to batch 16.
Each resumed run logs every batch after its checkpoint exactly once and the reference's losses
within RTOL: the same weights, AdamW moments and batches, summed in another order (fp32; observed
below 1e-7 relative). Per-rank RNG states of another world size are restored for the ranks both
have (Composer warns); the tiny model draws no random numbers in training. Two multi-rank launches
in all; the one-process runs run in this process.
An older version's single-process checkpoint (a full `.pt` file, no FSDP) still resumes on one
process and stays in that format.
"""
import shutil
from pathlib import Path

import pytest
import torch

from launching import launch
from mamba.runs.checkpoints import find_checkpoints
from mamba.runs.metrics import read_metrics
from mamba.training.cli import main

RTOL = 1e-5
LOSS = "loss/train/total"


def train_here(config: Path, run_name: str, *extra: str) -> None:
    """One in-process run; the process group goes whatever happens (main removes it on success)."""
    try:
        main([str(config), f"run_name={run_name}", *extra])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launch_ranks(config: Path, run_name: str, nproc: int) -> None:
    proc = launch(config, f"run_name={run_name}", "trainer.max_duration=16ba", nproc=nproc)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"composer -n {nproc} failed:\n{out[-5000:]}"


def losses(config: Path, run_name: str) -> list[tuple[int, float]]:
    """(batch, loss) of every logged training step, in order, repeats kept."""
    return [(r["batch"], r[LOSS]) for r in read_metrics(str(config.parent / run_name / "metrics.jsonl")) if LOSS in r]


def resume_from(checkpoint: Path, config: Path, run_name: str) -> None:
    """A new run's save folder holding `checkpoint` alone (its manifest inside it)."""
    folder = config.parent / run_name / "ckpt"
    folder.mkdir(parents=True)
    shutil.copytree(checkpoint, folder / checkpoint.name)


def assert_continues(config: Path, run_name: str, start: int, reference: dict[int, float]) -> None:
    resumed = losses(config, run_name)
    assert [b for b, _ in resumed] == list(range(start + 1, 17)), f"{run_name}: batches {resumed}"
    for batch, loss in resumed:
        assert abs(loss - reference[batch]) <= RTOL * abs(reference[batch]), \
            f"{run_name} at batch {batch}: {loss!r} vs uninterrupted {reference[batch]!r}"


@pytest.fixture(scope="module")
def reference(tiny_config) -> dict[int, float]:
    train_here(tiny_config, "elastic_ref", "trainer.max_duration=16ba")
    done = losses(tiny_config, "elastic_ref")
    assert [b for b, _ in done] == list(range(1, 17))
    folder = tiny_config.parent / "elastic_ref" / "ckpt"
    assert [p.name for p in find_checkpoints(folder)] == ["ep0-ba16", "ep0-ba12", "ep0-ba8"]  # sharded on one rank
    return dict(done)


@pytest.fixture(scope="module")
def grown(tiny_config, reference) -> Path:
    """1 -> 2 ranks; its folder, whose checkpoints two ranks wrote."""
    resume_from(tiny_config.parent / "elastic_ref" / "ckpt" / "ep0-ba8", tiny_config, "elastic_up")
    launch_ranks(tiny_config, "elastic_up", 2)
    folder = tiny_config.parent / "elastic_up" / "ckpt"
    assert sorted(p.name for p in (folder / "ep0-ba12").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    return folder


def test_one_process_run_resumes_on_two_ranks(tiny_config, reference, grown):
    assert_continues(tiny_config, "elastic_up", 8, reference)


def test_two_rank_checkpoint_resumes_in_one_process(tiny_config, reference, grown):
    resume_from(grown / "ep0-ba12", tiny_config, "elastic_down")
    train_here(tiny_config, "elastic_down", "trainer.max_duration=16ba")
    assert_continues(tiny_config, "elastic_down", 12, reference)


def test_two_rank_checkpoint_resumes_on_four_ranks(tiny_config, reference, grown):
    resume_from(grown / "ep0-ba12", tiny_config, "elastic_four")
    launch_ranks(tiny_config, "elastic_four", 4)
    assert_continues(tiny_config, "elastic_four", 12, reference)


def test_an_older_full_checkpoint_resumes_in_one_process(tiny_config, reference, monkeypatch):
    """Older versions ran one process without FSDP, writing `ep*-ba*-rank0.pt` files: the
    current one resumes them unwrapped (Composer's sharded load refuses files), same losses."""
    with monkeypatch.context() as older:
        older.setattr("mamba.training.trainer.build_parallelism", lambda *args: None)
        train_here(tiny_config, "elastic_old", "trainer.max_duration=8ba")
    folder = tiny_config.parent / "elastic_old" / "ckpt"
    assert [p.name for p in find_checkpoints(folder)] == ["ep0-ba8-rank0.pt", "ep0-ba4-rank0.pt"]
    train_here(tiny_config, "elastic_old", "trainer.max_duration=12ba")
    done = losses(tiny_config, "elastic_old")
    assert [b for b, _ in done] == list(range(1, 13))
    assert all(loss == reference[b] for b, loss in done)  # the 1-rank mesh changes no number
    assert find_checkpoints(folder)[0].name == "ep0-ba12-rank0.pt"
