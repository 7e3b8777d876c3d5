"""Read a trained model back from a Composer checkpoint, in one process, without a process group.

Composer writes one of two forms (composer/callbacks/checkpoint_saver.py, utils/checkpoint.py):
  full      one file `ep{E}-ba{B}-rank0.pt`: torch.save of {"state": {"model": {...}, ...}, "rng": ...};
            the model's keys carry the ComposerModel's attribute prefix, "model.backbone...".
  sharded   a directory `ep{E}-ba{B}/` written by torch.distributed.checkpoint (FSDP2): a
            `.metadata` file plus `__{rank}_{i}.distcp` shards; the same nested dict, flattened by
            DCP into keys "state.model.model.backbone...".
and, in the save_folder, a `latest-rank0.pt` symlink to the newest one. Only the model's tensors
are read (no optimizer state). The architecture comes from the run's config.yaml
(mamba.runs.run_config), which the trainer writes into its save_folder.

A checkpoint is intact when its manifest (written by the trainer after the save completed: every
file's size and sha256) matches the files, or, for one without a manifest (a kill between the
save and the manifest, or a run of an older recipe), when it holds what torch's readers need:
a sharded directory's `.metadata` unpickles and every byte range it references exists; a full
file is a complete zip (torch.save's format; a truncated one has lost its central directory).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import zipfile
from pathlib import Path

import torch

from mamba.config.load import load_config
from mamba.config.schema import ModelConfig, TrainConfig
from mamba.files import write_json_atomic
from mamba.model.factory import build_model
from mamba.model.lm import MambaLMHeadModel
from mamba.runs.run_config import CONFIG_NAME

MODEL_PREFIX = "model."  # ComposerMambaLM keeps the plain model as its `model` attribute
DCP_MODEL_PREFIX = "state.model." + MODEL_PREFIX
_ENTRY = re.compile(r"^ep(\d+)-ba(\d+)(-rank0\.pt)?$")
LATEST = "latest-rank0.pt"
MANIFEST = "manifest.json"  # inside a sharded directory; a full file's is the hidden `.{name}.manifest.json`
HASH = "sha256"  # ~1.3 GB/s with the CPU's SHA instructions (benchmarks/checkpoint_hash.py)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or sharded directory; a save_folder resolves to its newest checkpoint
    (the `latest-rank0.pt` symlink if present, else the highest batch among `ep*-ba*` entries)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file() or is_sharded(path):
        return path
    latest = path / LATEST
    if latest.exists():
        return latest.resolve()
    found = find_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"{path}: neither a checkpoint file, a sharded checkpoint directory (.metadata) nor a "
            f"save_folder holding {LATEST} or ep*-ba* checkpoints")
    return found[0]


def find_checkpoints(folder: str | Path) -> list[Path]:
    """The run's checkpoints in a save_folder, newest first: `ep*-ba*` directories (sharded, with
    or without their .metadata) and `ep*-ba*-rank0.pt` files (full)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries = [(int(m[2]), int(m[1]), p) for p in folder.iterdir()
               if (m := _ENTRY.match(p.name)) and (p.is_dir() if m[3] is None else p.is_file())]
    return [p for *_, p in sorted(entries, reverse=True)]


def manifest_path(checkpoint: Path) -> Path:
    if checkpoint.is_dir():
        return checkpoint / MANIFEST
    return checkpoint.with_name(f".{checkpoint.name}.manifest.json")


def checkpoint_files(checkpoint: Path) -> list[Path]:
    """The files a manifest covers: every file of a sharded directory but the manifest; a full file."""
    if checkpoint.is_dir():
        return sorted(p for p in checkpoint.iterdir() if p.is_file() and p.name != MANIFEST)
    return [checkpoint]


def checkpoint_root(checkpoint: Path) -> Path:
    """The folder a manifest's file names are relative to."""
    return checkpoint if checkpoint.is_dir() else checkpoint.parent


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def write_manifest(checkpoint: Path, digests: dict[str, str]) -> None:
    """Record {file name: digest} with each file's size; written atomically and last, so a
    manifest marks its checkpoint complete."""
    files = {name: {"size": (checkpoint_root(checkpoint) / name).stat().st_size, HASH: digest}
             for name, digest in sorted(digests.items())}
    write_json_atomic(manifest_path(checkpoint), {"hash": HASH, "files": files})


def check_checkpoint(checkpoint: Path) -> str | None:
    """None when `checkpoint` is intact, else why not (for the log and the refusal message)."""
    if manifest_path(checkpoint).is_file():
        return _check_manifest(checkpoint)
    if checkpoint.is_dir():
        return _check_sharded(checkpoint)
    return _check_full(checkpoint)


def _check_manifest(checkpoint: Path) -> str | None:
    try:
        manifest = json.loads(manifest_path(checkpoint).read_text())
        files, algorithm = manifest["files"], manifest["hash"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{manifest_path(checkpoint).name} is unreadable ({err})"
    for name, want in files.items():
        path = checkpoint_root(checkpoint) / name
        if not path.is_file():
            return f"{name} is missing (the manifest lists it)"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['size']}"
        with open(path, "rb") as f:
            if hashlib.file_digest(f, algorithm).hexdigest() != want[algorithm]:
                return f"{name} does not match its {algorithm} in the manifest (its bytes changed)"
    return None


def _check_sharded(checkpoint: Path) -> str | None:
    """What torch.distributed.checkpoint's FileSystemReader would fail on: the .metadata, and every
    (file, offset, length) it references."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (checkpoint / ".metadata").is_file():
        return "no .metadata (rank 0 writes it last, after every rank's shards: the save did not finish)"
    try:
        storage = FileSystemReader(str(checkpoint)).read_metadata().storage_data
    except Exception as err:  # a torn pickle raises anything from EOFError to UnpicklingError
        return f".metadata is unreadable ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing (.metadata references it)"
        if path.stat().st_size < end:
            return f"{name} is truncated ({path.stat().st_size} bytes; .metadata needs {end})"
    return None


def _check_full(checkpoint: Path) -> str | None:
    try:
        with zipfile.ZipFile(checkpoint) as archive:
            size = checkpoint.stat().st_size
            if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                return "truncated (a zip entry runs past the end of the file)"
    except (zipfile.BadZipFile, OSError) as err:
        return f"not a complete torch.save zip ({err}): truncated or overwritten"
    return None


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The plain model's state dict (keys "backbone...", "lm_head.weight") of a checkpoint."""
    path = resolve_checkpoint(path)
    if is_sharded(path):
        return _load_sharded(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    try:
        model_state = state["state"]["model"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: not a Composer checkpoint (no state['state']['model'])") from None
    out = {k[len(MODEL_PREFIX):]: v for k, v in model_state.items() if k.startswith(MODEL_PREFIX)}
    if not out:
        raise ValueError(f"{path}: the checkpoint's model holds no '{MODEL_PREFIX}*' keys; not a ComposerMambaLM")
    return out


def _load_sharded(path: Path) -> dict[str, torch.Tensor]:
    """Assemble the full model tensors from every rank's shards.

    DCP's load fills preallocated tensors of the global shapes recorded in `.metadata`; with no
    process group initialised it runs in this process alone (`dcp.load` falls back to no_dist).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(DCP_MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{path}: sharded checkpoint holds no '{DCP_MODEL_PREFIX}*' tensors; not a ComposerMambaLM")
    dcp.load(state, storage_reader=reader)
    return {k[len(DCP_MODEL_PREFIX):]: v for k, v in state.items()}


def saved_model_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """The plain model's tensor shapes in a checkpoint (keys "backbone..."), without reading its
    weights: a sharded directory's .metadata, or a full file's tensors memory-mapped."""
    if checkpoint.is_dir():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = FileSystemReader(str(checkpoint)).read_metadata()
        return {k[len(DCP_MODEL_PREFIX):]: tuple(m.size) for k, m in metadata.state_dict_metadata.items()
                if k.startswith(DCP_MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)}
    state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    return {k[len(MODEL_PREFIX):]: tuple(v.shape) for k, v in state["state"]["model"].items()
            if k.startswith(MODEL_PREFIX)}


def find_run_config(checkpoint: str | Path) -> Path:
    """The run's config.yaml: in the checkpoint's folder, or the folder above it."""
    checkpoint = Path(checkpoint)
    folders = [checkpoint] if checkpoint.is_dir() and not is_sharded(checkpoint) else []
    folders += [checkpoint.parent, checkpoint.parent.parent]
    resolved = resolve_checkpoint(checkpoint)
    folders += [resolved.parent, resolved.parent.parent]
    for folder in folders:
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    raise FileNotFoundError(
        f"no {CONFIG_NAME} next to checkpoint {checkpoint} (looked in {', '.join(str(f) for f in dict.fromkeys(folders))}); "
        f"pass the run's config with --config")


def load_model_from_checkpoint(checkpoint: str | Path, config: str | Path | None = None) -> tuple[MambaLMHeadModel, TrainConfig]:
    """Build the model the run trained (architecture from its config.yaml) and load its weights."""
    cfg = load_config(config if config is not None else find_run_config(checkpoint))
    return model_with_weights(cfg.model, load_model_state(checkpoint), f"checkpoint {checkpoint}"), cfg


def model_with_weights(model_cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> MambaLMHeadModel:
    """The CPU model `model_cfg` describes, holding the plain-model state dict `state` (from
    `source`, named in errors), in eval mode. A tied model's state may lack lm_head.weight."""
    # The state replaces every weight, so any initial import (init_from) would only be read in vain.
    model = build_model(dataclasses.replace(model_cfg, init_from=None), device="cpu")
    if model.config.tie_embeddings and "backbone.embedding.weight" in state:
        state = {"lm_head.weight": state["backbone.embedding.weight"], **state}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the config's model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; pass the run's own config with --config")
    model.tie_weights()
    return model.eval()
