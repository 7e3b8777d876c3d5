"""Autoresume over damaged checkpoints: never a silent start from batch 0; torn checkpoints skipped.

Two reference runs of 8 batches, a checkpoint every 2 (fp32 on CPU, so a resume is bit-exact):
  full     one process, in this one, as older versions ran it (no FSDP; today one process uses a
           1-rank FSDP2 mesh and writes directories): `ep0-ba{2,4,6,8}-rank0.pt` files, which a
           one-process resume keeps writing;
  sharded  `composer -n 2` with FSDP2: `ep0-ba{2,4,6,8}/` DCP directories.
Each case copies a reference folder (shutil.copytree), does the fault for real (delete, truncate,
remove a file) and relaunches the same command: it must resume from the newest intact checkpoint,
naming each one it skipped and why, and end at exactly the reference's final loss; or refuse,
naming the folder and what to do. Only two 2-rank launches in all: the reference and one resume.
"""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba.runs.checkpoints import check_checkpoint, find_checkpoints, manifest_path
from mamba.runs.metrics import read_metrics, series
from mamba.training.cli import main
from mamba.training.resume import CheckpointRefused, _rotate

REPO = Path(__file__).resolve().parents[2]
COMPOSER = Path(sys.executable).parent / "composer"
LOSS = "loss/train/total"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ckpt_faults")
    stdlib = Path(sys.modules["os"].__file__).parent
    pack = subprocess.run([sys.executable, "tools/pack.py", "--tokenizer", "bpe:300", "--out", str(work / "packed"),
                           *map(str, sorted(stdlib.glob("*.py"))[:12])], cwd=REPO, capture_output=True, text=True)
    assert pack.returncode == 0, pack.stderr[-3000:]
    return work


def command(work: Path, folder: Path, *extra: str) -> list[str]:
    """The run's config and overrides; checkpoints in `folder`, metrics in folder/../metrics.jsonl."""
    return [str(REPO / "config.yaml"), "run_name=faults", f"data.sources=[{{path: '{work / 'packed'}'}}]",
            "data.seq_len=32", "data.num_workers=0", "model.d_model=32", "model.n_layer=2", "model.vocab_size=300",
            "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_duration=8ba",
            "trainer.save_interval=2ba", "trainer.save_num_checkpoints_to_keep=-1", "trainer.device=cpu",
            "logging.progress_bar=false", "scheduler.t_warmup=2ba", "scheduler.t_max=8ba",
            f"trainer.save_folder={folder}", f"logging.metrics_file={folder.parent / 'metrics.jsonl'}", *extra]


def train_here(work: Path, folder: Path, *extra: str) -> dict[int, float]:
    """One in-process run; its {batch: loss}. The process group goes whatever happens."""
    try:
        main(command(work, folder, *extra))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return series(read_metrics(str(folder.parent / "metrics.jsonl")), LOSS)


def train_two_ranks(work: Path, folder: Path) -> tuple[dict[int, float], str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([str(COMPOSER), "-n", "2", "--master_port", str(free_port()), "mamba/train.py",
                           *command(work, folder)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return series(read_metrics(str(folder.parent / "metrics.jsonl")), LOSS), proc.stdout + proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def full(work) -> tuple[Path, dict[int, float]]:
    folder = work / "full" / "ckpt"
    with pytest.MonkeyPatch.context() as older:
        older.setattr("mamba.training.trainer.build_parallelism", lambda *args: None)
        losses = train_here(work, folder)
    assert sorted(losses) == list(range(1, 9))
    assert [p.name for p in find_checkpoints(folder)] == [f"ep0-ba{b}-rank0.pt" for b in (8, 6, 4, 2)]
    assert all(manifest_path(p).is_file() for p in find_checkpoints(folder))
    return folder, losses


@pytest.fixture(scope="module")
def sharded(work) -> tuple[Path, dict[int, float]]:
    folder = work / "sharded" / "ckpt"
    losses, _ = train_two_ranks(work, folder)
    assert sorted(losses) == list(range(1, 9))
    assert [p.name for p in find_checkpoints(folder)] == [f"ep0-ba{b}" for b in (8, 6, 4, 2)]
    return folder, losses


def case(reference: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(reference, folder, symlinks=True)
    return folder


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_dangling_link_resumes_from_the_newest_intact_checkpoint(work, full, tmp_path, caplog):
    """The newest checkpoint lost (deleted by hand), the link left dangling: Composer alone would
    say "No previous autoresume checkpoint found" and train from batch 1 over ba2..ba6."""
    folder = case(full[0], tmp_path)
    (folder / "ep0-ba8-rank0.pt").unlink()
    assert not (folder / "latest-rank0.pt").exists() and os.path.lexists(folder / "latest-rank0.pt")
    with caplog.at_level(logging.WARNING, logger="mamba.training.resume"):
        losses = train_here(work, folder)
    assert sorted(losses) == [7, 8] and losses[8] == full[1][8]
    assert "resuming from" in caplog.text and "ep0-ba6-rank0.pt" in caplog.text


def test_truncated_newest_is_skipped_with_a_warning_and_moved_aside(work, full, tmp_path, caplog):
    folder = case(full[0], tmp_path)
    truncate(folder / "ep0-ba8-rank0.pt")
    with caplog.at_level(logging.WARNING, logger="mamba.training.resume"):
        losses = train_here(work, folder)
    assert sorted(losses) == [7, 8] and losses[8] == full[1][8]
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "ep0-ba8-rank0.pt" in skipped[0] and "the manifest says" in skipped[0], skipped
    assert (folder / "torn" / "ep0-ba8-rank0.pt").is_file()  # kept for the user, out of the run's way
    assert check_checkpoint(folder / "ep0-ba8-rank0.pt") is None  # saved again by the resumed run


def test_checks_without_a_manifest_catch_what_torch_would_fail_on(full, sharded, tmp_path):
    """Checkpoints of an older recipe, or a kill between the save and its manifest: the reader's
    own requirements are checked (the zip's central directory; .metadata and its byte ranges)."""
    full_copy, shard_copy = case(full[0], tmp_path / "f"), case(sharded[0], tmp_path / "s")
    for checkpoint in [*find_checkpoints(full_copy), *find_checkpoints(shard_copy)]:
        manifest_path(checkpoint).unlink()
        assert check_checkpoint(checkpoint) is None, checkpoint
    truncate(full_copy / "ep0-ba8-rank0.pt")
    assert "not a complete torch.save zip" in check_checkpoint(full_copy / "ep0-ba8-rank0.pt")
    truncate(shard_copy / "ep0-ba8" / "__1_0.distcp")
    assert "__1_0.distcp is truncated" in check_checkpoint(shard_copy / "ep0-ba8")
    (shard_copy / "ep0-ba6" / "__0_0.distcp").unlink()
    assert "__0_0.distcp is missing" in check_checkpoint(shard_copy / "ep0-ba6")
    (shard_copy / "ep0-ba4" / ".metadata").unlink()
    assert "no .metadata" in check_checkpoint(shard_copy / "ep0-ba4")
    (shard_copy / "ep0-ba2" / ".metadata").write_bytes(b"\x80\x04torn")
    assert ".metadata is unreadable" in check_checkpoint(shard_copy / "ep0-ba2")


def test_a_manifest_catches_changed_bytes_of_the_same_size(sharded, tmp_path):
    folder = case(sharded[0], tmp_path)
    shard = folder / "ep0-ba8" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "does not match its sha256" in check_checkpoint(folder / "ep0-ba8")
    manifest = json.loads(manifest_path(folder / "ep0-ba6").read_text())
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}, manifest


def test_two_ranks_fall_back_past_two_torn_checkpoints(work, sharded, tmp_path):
    """ba8 lost rank 1's shard, ba6 its .metadata: both ranks resume from ba4 and end at the
    uninterrupted run's loss, bit for bit."""
    folder = case(sharded[0], tmp_path)
    (folder / "ep0-ba8" / "__1_0.distcp").unlink()
    (folder / "ep0-ba6" / ".metadata").unlink()
    losses, out = train_two_ranks(work, folder)
    assert sorted(losses) == [5, 6, 7, 8] and losses[8] == sharded[1][8]
    assert "skipping checkpoint" in out and "__1_0.distcp is missing" in out and ".metadata is missing" in out, out[-3000:]
    assert sorted(p.name for p in (folder / "torn").iterdir()) == ["ep0-ba6", "ep0-ba8"]


def test_all_torn_refuses_naming_the_folder_and_each_checkpoint(work, sharded, tmp_path):
    folder = case(sharded[0], tmp_path)
    for checkpoint in find_checkpoints(folder):
        truncate(checkpoint / "__0_0.distcp")
    before = [p.name for p in find_checkpoints(folder)]
    with pytest.raises(CheckpointRefused, match=r"(?s)none is intact.*ep0-ba8: __0_0.distcp has \d+ bytes.*"
                                                r"ep0-ba2.*trainer.start_over=true") as refused:
        train_here(work, folder)
    assert str(folder) in str(refused.value)
    # nothing moved, nothing deleted, the link untouched
    assert [p.name for p in find_checkpoints(folder)] == before and not (folder / "torn").exists()
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba8"


def test_autoresume_off_over_checkpoints_refuses(work, full, tmp_path):
    folder = case(full[0], tmp_path)
    with pytest.raises(CheckpointRefused, match=r"autoresume is false.*trainer.start_over=true"):
        train_here(work, folder, "trainer.autoresume=false")


def test_start_over_moves_the_checkpoints_aside_and_keep_n_keeps_complete_ones(work, full, tmp_path):
    folder = case(full[0], tmp_path)
    losses = train_here(work, folder, "trainer.start_over=true", "trainer.max_duration=4ba",
                        "trainer.save_num_checkpoints_to_keep=1")
    assert sorted(losses) == [1, 2, 3, 4] and losses[1] == full[1][1]
    [aside] = folder.glob("previous-*")
    assert sorted(p.name for p in aside.iterdir() if not p.name.startswith(".")) == sorted(
        ["latest-rank0.pt", *(f"ep0-ba{b}-rank0.pt" for b in (2, 4, 6, 8))])
    assert [p.name for p in find_checkpoints(folder)] == ["ep0-ba4"]  # keep 1: ba2 deleted; a new run shards


def test_keep_n_never_deletes_the_last_intact_checkpoint(full, tmp_path):
    """A newest checkpoint without a manifest (not known complete) does not count toward N."""
    folder = case(full[0], tmp_path)
    manifest_path(folder / "ep0-ba8-rank0.pt").unlink()
    truncate(folder / "ep0-ba8-rank0.pt")
    _rotate(folder, 1)
    assert [p.name for p in find_checkpoints(folder)] == ["ep0-ba8-rank0.pt", "ep0-ba6-rank0.pt"]
