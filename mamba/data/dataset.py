"""PackedDataset: fixed-length training windows over the shards written by mamba.data.pack.

Window i of a shard covers words [i*L, i*L + L + 1) (L = seq_len): L inputs plus the one extra
word that the last input predicts. Windows step by L, so every token after a shard's first is a
label exactly once; a shard's tail too short to fill a window is dropped (see `dropped_tokens`).
Windows never cross shards, and may cross documents: position_ids (0 at each document start) let
the model reset its state there.

Shards are opened as read-only memmaps on first use in each process (DataLoader workers included)
and are never read whole, so a dataset object is cheap to build and to pickle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mamba import layout
from mamba.data.pack import INDEX_NAME, sha256_file

IGNORE_INDEX = -100  # label value that torch's cross_entropy skips
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _check_shard_file(path: Path, tokens: int) -> None:
    """Raise unless `path` is a 1-D int32 .npy of exactly `tokens` words; reads only the header."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in index.json is missing; re-run tools/pack.py")
    with open(path, "rb") as f:
        try:
            shape, _, dtype = _HEADER_READERS[np.lib.format.read_magic(f)](f)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: not a readable .npy shard ({e!r})") from None
        data_offset = f.tell()
    if dtype != np.int32 or shape != (tokens,):
        raise ValueError(f"{path}: holds a {dtype} array of shape {shape}, index.json says ({tokens},) int32")
    size, expected = os.path.getsize(path), data_offset + 4 * tokens
    if size != expected:
        raise ValueError(
            f"{path}: file is {size} bytes, but {tokens} tokens need {expected}; the shard is "
            f"truncated or was modified after packing, re-run tools/pack.py"
        )


class PackedDataset(torch.utils.data.Dataset):
    """Map-style dataset of windows; item i is a dict of (seq_len,) int64 tensors:

        input_ids     token ids of words [0, L) of the window
        labels        token ids of words [1, L + 1), IGNORE_INDEX where that word's loss bit is 0
        position_ids  in-document positions of words [0, L)
    """

    def __init__(self, data_dir: str | os.PathLike, seq_len: int):
        self.data_dir = Path(data_dir)
        self.seq_len = int(seq_len)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        index_path = self.data_dir / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{index_path}: missing, so {self.data_dir} is not a complete packed dataset; "
                f"run tools/pack.py (index.json is written last, when every shard is in place)"
            )
        self.index = json.loads(index_path.read_text(encoding="utf-8"))
        version = self.index.get("layout_version")
        if version != layout.LAYOUT_VERSION:
            raise ValueError(
                f"{index_path}: layout_version {version}, but this code reads version "
                f"{layout.LAYOUT_VERSION}; repack the data with this version's tools/pack.py"
            )
        self.eos_id = self.index["eos_id"]
        shards = self.index["shards"]
        self.shard_paths = [self.data_dir / s["file"] for s in shards]
        for path, shard in zip(self.shard_paths, shards):
            _check_shard_file(path, shard["tokens"])

        tokens = np.array([s["tokens"] for s in shards], dtype=np.int64).reshape(-1)
        windows = np.maximum(tokens - 1, 0) // self.seq_len  # (n_shards,)
        if not windows.sum():
            raise ValueError(
                f"{self.data_dir}: no shard holds seq_len + 1 = {self.seq_len + 1} tokens (largest: "
                f"{int(tokens.max(initial=0))}); pack more text or use a shorter seq_len"
            )
        self.num_tokens = int(tokens.sum())
        # Tokens in no window: whole shards shorter than L + 1, and each shard's short tail.
        self.dropped_tokens = int((tokens - np.where(windows > 0, windows * self.seq_len + 1, 0)).sum())
        self._window_ends = np.cumsum(windows)  # (n_shards,) windows in shards 0..k together
        self._maps: list[np.ndarray | None] = [None] * len(shards)

    def __len__(self) -> int:
        return int(self._window_ends[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        shard = int(np.searchsorted(self._window_ends, i, side="right"))
        first = int(self._window_ends[shard - 1]) if shard else 0
        start = (i - first) * self.seq_len
        # np.array copies just this window out of the memmap, widened to int64 for torch.
        words = np.array(self._shard(shard)[start:start + self.seq_len + 1], dtype=np.int64)
        layout.check_words(words, f"{self.shard_paths[shard]} (window {i})")
        ids, positions, loss = layout.decode(torch.from_numpy(words))  # (L + 1,) each
        labels = ids[1:].clone()
        labels[~loss[1:]] = IGNORE_INDEX
        return {"input_ids": ids[:-1], "labels": labels, "position_ids": positions[:-1]}

    def _shard(self, k: int) -> np.ndarray:
        if self._maps[k] is None:
            self._maps[k] = np.load(self.shard_paths[k], mmap_mode="r")
        return self._maps[k]

    def __getstate__(self) -> dict:
        # Workers and spawned processes reopen the memmaps themselves; never ship shard contents.
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._maps)
        return state

    def check_vocab(self, vocab_size: int) -> None:
        """Raise naming the shard if it holds a token id >= vocab_size (the model's embedding rows).

        Uses each shard's max_token_id from the manifest, so it costs nothing even on terabytes;
        verify() is what proves the manifest matches the shard bytes.
        """
        for path, shard in zip(self.shard_paths, self.index["shards"]):
            if shard["max_token_id"] >= vocab_size:
                tok = self.index["tokenizer"]
                raise ValueError(
                    f"{path}: holds token id {shard['max_token_id']}, but the model's vocab_size is "
                    f"{vocab_size}; the data was packed with tokenizer {tok.get('name')!r} of "
                    f"{tok.get('vocab_size')} entries, so set vocab_size >= {tok.get('vocab_size')} or repack"
                )

    def verify(self) -> None:
        """Re-hash every shard (reads all of them) and raise naming the first that does not match."""
        for path, shard in zip(self.shard_paths, self.index["shards"]):
            actual = sha256_file(path)
            if actual != shard["sha256"]:
                raise ValueError(
                    f"{path}: sha256 {actual} differs from {shard['sha256']} in index.json; the shard "
                    f"is corrupt or was modified after packing, re-run tools/pack.py"
                )
