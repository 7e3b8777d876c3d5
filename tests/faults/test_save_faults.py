"""Faults while a checkpoint is written, and a relaunch over another model's checkpoints.

The run is test_checkpoints.py's (8 batches, a checkpoint every 2, one process, fp32 on CPU, so a
resume is bit-exact against the uninterrupted reference run).

kill -9 during a save: the run is a real `python mamba/train.py` process that SIGKILLs itself
at a chosen file-system step of the batch-4 save, seen by a Python audit hook (open, os.rename,
os.remove fire one before the operation happens): exact, repeatable kill points, where a timer
would land anywhere. The relaunch must resume from the newest intact checkpoint at that moment
(batch 2 while batch 4's is incomplete, batch 4 once its .metadata is in place) and end at the
reference's final loss.
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launching import ENV
from mamba.config.load import load_config
from mamba.runs.checkpoints import find_checkpoints, manifest_path
from mamba.training.resume import CheckpointRefused, CheckpointSaveFailed
from test_checkpoints import REPO, command, full, train_here, work  # noqa: F401 (fixtures: the data, .pt run)

# python -c KILL_AT EVENT REGEX NTH script args...: run the script, SIGKILL at the NTH audit event
# EVENT whose first two arguments (path, mode / source, target) match REGEX.
KILL_AT = """
import os, re, runpy, signal, sys
event, pattern, nth = sys.argv[1], re.compile(sys.argv[2]), int(sys.argv[3])
seen = 0
def hook(name, args):
    global seen
    if name == event and pattern.search(" ".join(map(str, args[:2]))):
        seen += 1
        if seen == nth:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
KILL_POINTS = {  # name: (event, regex, nth, the batch the relaunch resumes from)
    "shard being written": ("open", r"ep0-ba4/__0_0\.distcp [wa]", 1, 2),
    "shard written, before .metadata": ("os.rename", r"ep0-ba4/\.metadata", 1, 2),
    # Composer removes the latest link, then makes the new one: killed in between, no link at all
    "no latest link": ("os.remove", r"latest-rank0\.pt", 2, 4),
    "before the manifest": ("open", r"ep0-ba4/\.manifest\.json\.tmp\d+ w", 1, 4),
    "next save begun": ("open", r"ep0-ba6/__0_0\.distcp [wa]", 1, 4),
}


@pytest.fixture(scope="module")
def reference(work) -> dict[int, float]:  # noqa: F811
    losses = train_here(work, work / "reference" / "ckpt")
    assert sorted(losses) == list(range(1, 9))
    return losses


def metrics_of(folder: Path) -> Path:
    return folder.parent / "metrics.jsonl"


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_during_a_save_resumes_from_the_newest_intact_checkpoint(work, reference, tmp_path, point):  # noqa: F811
    event, regex, nth, resumed = KILL_POINTS[point]
    folder = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_AT, event, regex, str(nth), "mamba/train.py",
                           *command(work, folder)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not [c for c in find_checkpoints(folder) if c.name == "ep0-ba8"]  # killed mid-run
    metrics_of(folder).unlink()  # the relaunch's batches alone
    losses = train_here(work, folder)
    assert sorted(losses) == list(range(resumed + 1, 9)) and losses[8] == reference[8], (point, losses)
    assert [c.name for c in find_checkpoints(folder)] == [f"ep0-ba{b}" for b in (8, 6, 4, 2)]
    # a torn batch-4 checkpoint was moved aside, for whoever wants to look, and saved again
    assert (folder / "torn" / "ep0-ba4").is_dir() == (resumed == 2), point


@pytest.fixture
def small_disk(tmp_path):
    """A 1000 KiB tmpfs as the save folder: one checkpoint of the run (~0.7 MB) fits, two do not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the save folder needs root")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_fails_the_save_clearly_and_the_relaunch_resumes(work, reference, small_disk):  # noqa: F811
    with pytest.raises(CheckpointSaveFailed) as failed:
        train_here(work, small_disk)
    message = str(failed.value)
    assert f"saving a checkpoint into {small_disk} failed: the disk is full" in message
    assert "trainer.save_folder on a larger disk" in message
    assert [c.name for c in find_checkpoints(small_disk)] == ["ep0-ba4", "ep0-ba2"]
    assert manifest_path(small_disk / "ep0-ba2").is_file() and not (small_disk / "ep0-ba4" / ".metadata").exists()
    # space freed (the same tmpfs, grown: its files stay), then the same command again
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    metrics_of(small_disk).unlink()
    losses = train_here(work, small_disk)
    assert sorted(losses) == list(range(3, 9)) and losses[8] == reference[8]
    assert (small_disk / "torn" / "ep0-ba4").is_dir()


@pytest.mark.parametrize("form, newest", [("reference", "ep0-ba8"), ("full", "ep0-ba8-rank0.pt")])
def test_another_model_shape_over_the_checkpoints_is_refused_naming_the_weight(work, tmp_path, request, form, newest):  # noqa: F811
    """Both checkpoint forms: a directory (.metadata's shapes) and an older recipe's .pt file."""
    request.getfixturevalue(form)  # the run that writes work/<form>/ckpt
    folder = tmp_path / "ckpt"
    shutil.copytree(work / form / "ckpt", folder, symlinks=True)
    with pytest.raises(CheckpointRefused) as refused:
        train_here(work, folder, "model.d_model=48")
    message = str(refused.value)
    assert f"{folder / newest} was saved by a model of another shape" in message
    assert "backbone.embedding.weight: (304, 32) saved, (304, 48) in this config" in message
    assert f"the run's own config ({folder / 'config.yaml'})" in message and "another trainer.save_folder" in message
    assert load_config(folder / "config.yaml").model.d_model == 32  # not overwritten by the refused launch
