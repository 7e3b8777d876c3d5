"""Which checkpoint a launch resumes from, and the manifest that marks each saved one complete.

prepare_save_folder(), before the Trainer is built: rank 0 scans save_folder
(mamba.runs.checkpoints), checks the checkpoints newest first, moves the torn ones newer than the
newest intact one into `torn/` (a WARNING each, naming why) and points `latest-rank0.pt` at the
intact one, atomically: Composer's autoresume then loads it on every rank (it reads rank 0's link;
the sharded path only checks the link exists). It refuses, on every rank, when checkpoints exist
but none is intact, or when autoresume is off and the folder holds checkpoints: starting from
batch 0 over a run's checkpoints takes trainer.start_over=true, which moves them into
`previous-<time>/` (nothing is deleted).

ManifestCheckpointSaver, Composer's CheckpointSaver plus, after each save: the manifest (each rank
hashes a share of the files; rank 0 writes it, last and atomically), then keep-N rotation that
counts only complete checkpoints, so it never deletes the last intact one.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path

from composer.callbacks import CheckpointSaver
from composer.core import State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.checkpoint.api import CheckpointException

from mamba.config.schema import ModelConfig
from mamba.model.factory import build_model
from mamba.runs.checkpoints import (LATEST, check_checkpoint, checkpoint_files, checkpoint_root, file_digest,
                                    find_checkpoints, manifest_path, saved_model_shapes, write_manifest)
from mamba.runs.run_config import CONFIG_NAME

log = logging.getLogger(__name__)


class CheckpointRefused(RuntimeError):
    """save_folder's checkpoints cannot be resumed from, and starting over was not asked for."""


def prepare_save_folder(save_folder: str, autoresume: bool, start_over: bool) -> Path | None:
    """Rank 0 decides and acts; every rank returns the checkpoint Composer's autoresume will load
    (None: training starts from batch 0), or raises (rank 0 its own error, the others a
    CheckpointRefused quoting it: they would otherwise wait for rank 0 in Composer's collectives)."""
    failure = None
    if dist.get_global_rank() == 0:
        try:
            _prepare(Path(save_folder), autoresume, start_over)
        except Exception as err:
            failure = err
    shared = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(shared, src=0)
    if failure is not None:
        raise failure
    if shared[0] is not None:
        raise CheckpointRefused(f"rank 0 stopped the launch: {shared[0]}")
    link = Path(save_folder) / LATEST  # as rank 0 left it, before the broadcast returned
    return link.parent / os.readlink(link) if autoresume and os.path.lexists(link) else None


def check_model_shapes(checkpoint: Path | None, model_cfg: ModelConfig) -> None:
    """Refuse to resume `checkpoint` into the model `model_cfg` describes when a weight's shape or
    name differs (model.d_model changed, say): torch's loader would fail deep inside its planner.
    Called before config.yaml is rewritten, so the run's own config is still there to use."""
    if checkpoint is None:
        return
    saved = saved_model_shapes(checkpoint)
    wanted = {k: tuple(v.shape) for k, v in build_model(model_cfg, device="meta").state_dict().items()}
    differ = [f"{k}: {saved[k]} saved, {wanted[k]} in this config" for k in saved.keys() & wanted.keys()
              if saved[k] != wanted[k]]
    differ += [f"{k}: in the checkpoint only" for k in saved.keys() - wanted.keys()]
    differ += [f"{k}: in this config's model only" for k in wanted.keys() - saved.keys() if k != "lm_head.weight"]
    if differ:
        raise CheckpointRefused(
            f"{checkpoint} was saved by a model of another shape than this config's model.* describes "
            f"({len(differ)} weights differ), e.g. {'; '.join(sorted(differ)[:3])}. Relaunch with the run's "
            f"own config ({checkpoint.parent / CONFIG_NAME}), or choose another trainer.save_folder for the new model.")


def _prepare(folder: Path, autoresume: bool, start_over: bool) -> None:
    found = find_checkpoints(folder)
    link = folder / LATEST
    if start_over and (found or os.path.lexists(link)):
        _move_aside(folder, found, link)
        return
    if not found:
        if os.path.lexists(link):
            log.warning("%s points at %s, which is gone, and %s holds no checkpoint: removing the link "
                        "and training from batch 0", link, os.readlink(link), folder)
            link.unlink()
        return
    if not autoresume:
        raise CheckpointRefused(
            f"{folder} holds {len(found)} checkpoint(s) of this run (newest {found[0].name}) but "
            f"trainer.autoresume is false, so training would start from batch 0 over them. Set "
            f"trainer.autoresume=true to continue the run, trainer.start_over=true to move them into "
            f"{folder}/previous-<time>/ and start over, or choose another trainer.save_folder.")
    torn = []
    for checkpoint in found:
        reason = check_checkpoint(checkpoint)
        if reason is None:
            _resume_from(folder, checkpoint, torn, link)
            return
        log.warning("autoresume: skipping checkpoint %s: %s", checkpoint, reason)
        torn.append((checkpoint, reason))
    listing = "\n".join(f"  {c.name}: {r}" for c, r in torn)
    raise CheckpointRefused(
        f"{folder} holds {len(torn)} checkpoint(s) of this run and none is intact:\n{listing}\n"
        f"Restore an intact checkpoint into {folder} (from a copy) and relaunch, or set "
        f"trainer.start_over=true to move them into {folder}/previous-<time>/ and train from batch 0.")


def _resume_from(folder: Path, checkpoint: Path, torn: list[tuple[Path, str]], link: Path) -> None:
    """Move the torn checkpoints newer than `checkpoint` out of the way (the run will save at their
    batches again) and point the latest link at `checkpoint`."""
    for bad, reason in torn:
        target = folder / "torn" / bad.name
        target.parent.mkdir(exist_ok=True)
        if target.exists():
            target = target.with_name(f"{bad.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        manifest = None if bad.is_dir() else manifest_path(bad)  # a directory's moves with it
        os.replace(bad, target)
        if manifest is not None and manifest.exists():
            os.replace(manifest, manifest_path(target))
        log.warning("autoresume: moved torn checkpoint %s to %s (%s)", bad.name, target, reason)
    if os.path.lexists(link) and os.readlink(link) == checkpoint.name:
        log.info("autoresume: resuming from %s", checkpoint)  # which one, for whoever reads the log
        return
    if torn or os.path.lexists(link):
        log.warning("autoresume: resuming from %s (%s pointed at %s)", checkpoint, link.name,
                    os.readlink(link) if os.path.lexists(link) else "nothing")
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(checkpoint.name, tmp)
    os.replace(tmp, link)  # atomic: the link is the old one or the new one, never absent


def _move_aside(folder: Path, found: list[Path], link: Path) -> None:
    """trainer.start_over: the run's checkpoints, their manifests, the latest link and torn/ go to
    a fresh `previous-<time>/`, so training starts from batch 0 and nothing is lost."""
    aside = folder / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    moved = [*found, *(manifest_path(c) for c in found if not c.is_dir() and manifest_path(c).exists()),
             *(p for p in (link, folder / "torn") if os.path.lexists(p))]
    for path in moved:
        os.replace(path, aside / path.name)
    log.warning("trainer.start_over: moved %d checkpoint(s) of %s into %s; training starts from batch 0 "
                "(delete that folder yourself once it is not needed)", len(found), folder, aside)


class ManifestCheckpointSaver(CheckpointSaver):
    """Composer's CheckpointSaver with no rotation of its own (num_checkpoints_to_keep=-1): after
    each save (every rank calls _save_checkpoint; it ends with a barrier once all files are
    written) the manifest is written, then `keep` complete checkpoints are kept (-1: all)."""

    def __init__(self, folder: str, save_interval: str, keep: int):
        super().__init__(folder=folder, save_interval=save_interval, num_checkpoints_to_keep=-1,
                         # Trainer's own names for a local folder; its autoresume needs the latter set
                         remote_file_name=str(Path(folder) / "ep{epoch}-ba{batch}-rank{rank}.pt"),
                         latest_remote_file_name=str(Path(folder) / "latest-rank{rank}.pt"))
        self.keep = keep
        self.save_folder = Path(folder)

    def _save_checkpoint(self, state: State, logger: Logger) -> None:
        try:
            self._save_and_seal(state, logger)
        # torch's own words for a full disk: "unexpected pos 704 vs 598", in a CheckpointException
        # (a BaseException, so it is named here on its own)
        except (Exception, CheckpointException) as err:
            raise CheckpointSaveFailed(_save_failure(self.save_folder, err)) from err

    def _save_and_seal(self, state: State, logger: Logger) -> None:
        super()._save_checkpoint(state, logger)
        saved = [self.saved_checkpoints[-1] if dist.get_global_rank() == 0 else None]
        dist.broadcast_object_list(saved, src=0)  # rank 0 always writes (the .metadata or the file)
        checkpoint = Path(saved[0]).parent if state.fsdp_sharded_state_dict_enabled else Path(saved[0])
        started = time.perf_counter()
        files = checkpoint_files(checkpoint)
        share = files[dist.get_global_rank()::dist.get_world_size()]
        mine = {p.relative_to(checkpoint_root(checkpoint)).as_posix(): file_digest(p) for p in share}
        digests = {name: d for part in dist.all_gather_object(mine) for name, d in part.items()}
        if dist.get_global_rank() == 0:
            write_manifest(checkpoint, digests)
            log.info("manifest of %s: %d files, %.1f MB hashed in %.2f s", checkpoint.name, len(files),
                     sum(p.stat().st_size for p in files) / 1e6, time.perf_counter() - started)
            if self.keep >= 0:
                _rotate(checkpoint.parent, max(self.keep, 1))
        dist.barrier()


class CheckpointSaveFailed(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the ones before it are intact."""


def _save_failure(folder: Path, err: BaseException) -> str:
    """What happened and what to do. A full disk is told by errno where an OSError reaches us, else
    by the free space left: less than a complete checkpoint of this run takes."""
    free = shutil.disk_usage(folder).free
    sizes = [sum(p.stat().st_size for p in checkpoint_files(c)) for c in find_checkpoints(folder)
             if manifest_path(c).is_file()]
    chain, full = err, False
    while chain is not None:
        full |= isinstance(chain, OSError) and chain.errno == errno.ENOSPC
        chain = chain.__cause__ or chain.__context__
    what = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if full or (sizes and free < max(sizes)):
        return (f"saving a checkpoint into {folder} failed: the disk is full ({free / 1e6:.1f} MB free; a "
                f"checkpoint of this run takes {max(sizes, default=0) / 1e6:.1f} MB) [{what}]. The checkpoints "
                f"before it are intact: free space there or set trainer.save_folder on a larger disk (copy "
                f"the folder over), then relaunch; autoresume continues from the newest intact one.")
    return (f"saving a checkpoint into {folder} failed [{what}]; the checkpoints before it are intact: fix "
            f"the cause and relaunch, autoresume continues from the newest intact one.")


def _rotate(folder: Path, keep: int) -> None:
    """Delete the checkpoints older than the `keep`-th newest complete one (manifest written), so
    a torn newer one never counts and the last intact one is never deleted."""
    complete = 0
    for checkpoint in find_checkpoints(folder):
        if complete >= keep:
            log.info("deleting checkpoint %s (trainer.save_num_checkpoints_to_keep=%d)", checkpoint, keep)
            manifest_path(checkpoint).unlink(missing_ok=True)
            shutil.rmtree(checkpoint) if checkpoint.is_dir() else checkpoint.unlink()
        elif manifest_path(checkpoint).is_file():
            complete += 1
