"""PackedSource: one directory written by tools/pack.py, checked and cut into fixed windows.

Window i of a shard covers words [i*L, i*L + L + 1) (L = seq_len): L inputs plus the one extra
word that the last input predicts. Windows step by L, so every token after a shard's first is a
label exactly once per epoch; a shard's tail too short to fill a window is dropped (see
`dropped_tokens`). Windows never cross shards, and may cross documents: position_ids (0 at each
document start) let the model reset its state there.

Shards are opened as read-only memmaps on first use in each process (DataLoader workers included)
and only the requested windows are copied out, so a source object is cheap to build and to pickle.
Which windows are read in which order is decided by mamba.data.mixture and mamba.data.loader.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mamba import layout
from mamba.data.manifest import INDEX_NAME, check_listing, check_shard_file, check_shard_sha256, read_index

FIM_SENTINELS = ("fim_prefix", "fim_middle", "fim_suffix")


class PackedSource:
    """The windows of one packed directory. `read(windows)` -> (n, L + 1) int32 layout words."""

    def __init__(self, data_dir: str | os.PathLike, seq_len: int):
        self.data_dir = Path(data_dir)
        self.seq_len = int(seq_len)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.index = read_index(self.data_dir)
        # Manifests from before special_tokens existed record only eos_id.
        self.special_tokens: dict[str, int] = dict(self.index.get("special_tokens") or {"eos": self.index["eos_id"]})
        self.eos_id = self.special_tokens["eos"]
        self.tokenizer: dict = self.index["tokenizer"]
        shards = self.index["shards"]
        self.shard_paths = [self.data_dir / s["file"] for s in shards]
        for path, shard in zip(self.shard_paths, shards):
            check_shard_file(path, shard["tokens"])  # headers only: the hash is verify()'s
        check_listing(self.data_dir, self.index)

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
        self._window_starts = self._window_ends - windows  # (n_shards,) first window of shard k
        self._maps: list[np.ndarray | None] = [None] * len(shards)

    def __len__(self) -> int:
        return int(self._window_ends[-1])

    def read(self, windows: np.ndarray, out: np.ndarray | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """Copy the given windows (int array of indices < len(self)) out of the memmaps.

        Returns (len(windows), seq_len + 1) int32 layout words; raises on a corrupt (negative) word.
        With `out` (an (N, seq_len + 1) int32 array) the windows go straight into its rows `rows`
        (default 0, 1, ...) and `out` is returned: a batch is copied once, not gathered twice.
        """
        windows = np.asarray(windows, dtype=np.int64)
        if windows.size and (windows.min() < 0 or windows.max() >= len(self)):
            raise IndexError(f"{self.data_dir}: window index out of range 0..{len(self) - 1}: {windows}")
        shards = np.searchsorted(self._window_ends, windows, side="right")
        starts = (windows - self._window_starts[shards]) * self.seq_len  # first word of each window
        if out is None:
            out = np.empty((len(windows), self.seq_len + 1), dtype=np.int32)
        filled = range(len(windows)) if rows is None else rows.tolist()
        for row, shard, start in zip(filled, shards.tolist(), starts.tolist()):
            out[row] = self._shard(shard)[start:start + self.seq_len + 1]
        # One cheap pass over the copy (a corrupt shard has bit 31 set); name the shard if so.
        if out.size and (out if rows is None else out[rows]).min() < 0:
            for i, row in enumerate(filled):
                layout.check_words(out[row], f"{self.shard_paths[shards[i]]} (window {windows[i]})")
        return out

    def _shard(self, k: int) -> np.ndarray:
        if self._maps[k] is None:
            # A plain ndarray view of the memmap (which it keeps open): slicing np.memmap objects
            # costs more than copying a 4096-token window.
            self._maps[k] = np.load(self.shard_paths[k], mmap_mode="r").view(np.ndarray)
        return self._maps[k]

    def __getstate__(self) -> dict:
        # Workers and spawned processes reopen the memmaps themselves; never ship shard contents.
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._maps)
        return state

    def check_vocab(self, vocab_size: int) -> None:
        """Raise unless vocab_size (the model's embedding rows) covers the data and its tokenizer.

        First each shard's max_token_id (naming the shard), then the tokenizer's whole vocabulary:
        data whose largest id happens to fit would still leave the model unable to embed ids the
        same tokenizer gives other text (evaluation, generation, more data packed later). Both come
        from the manifest, so this costs nothing even on terabytes; verify() is what proves the
        manifest matches the shard bytes.
        """
        tok = self.tokenizer
        for path, shard in zip(self.shard_paths, self.index["shards"]):
            if shard["max_token_id"] >= vocab_size:
                raise ValueError(
                    f"{path}: holds token id {shard['max_token_id']}, but the model's vocab_size is "
                    f"{vocab_size}; the data was packed with tokenizer {tok.get('name')!r} of "
                    f"{tok.get('vocab_size')} entries, so set vocab_size >= {tok.get('vocab_size')} or repack"
                )
        if tok.get("vocab_size") is not None and vocab_size < tok["vocab_size"]:
            largest = max(s["max_token_id"] for s in self.index["shards"])
            raise ValueError(
                f"{self.data_dir / INDEX_NAME}: the data was packed with tokenizer {tok.get('name')!r} of "
                f"{tok['vocab_size']} entries, but the model's vocab_size is {vocab_size} (the largest id in "
                f"this data is {largest}, yet the tokenizer can give any id below {tok['vocab_size']}); "
                f"set model.vocab_size >= {tok['vocab_size']} or repack with a smaller tokenizer"
            )

    def fim_sentinels(self) -> tuple[int, int, int]:
        """(prefix, middle, suffix) sentinel ids from the manifest; raises naming what is missing."""
        missing = [name for name in FIM_SENTINELS if name not in self.special_tokens]
        if missing:
            raise ValueError(
                f"{self.data_dir / INDEX_NAME}: data.fim_rate > 0 needs the tokenizer's FIM sentinel "
                f"tokens, but special_tokens lacks {missing} (it has {sorted(self.special_tokens)}); pack "
                f"with a tokenizer that defines them (e.g. <fim_prefix>, <fim_middle>, <fim_suffix>) "
                f"or set data.fim_rate=0"
            )
        return tuple(int(self.special_tokens[name]) for name in FIM_SENTINELS)

    def verify(self, shards: list[int] | None = None) -> None:
        """Re-hash the given shards (default: all; reads them whole) and raise naming the first
        whose sha256 differs from the manifest."""
        for k in range(len(self.shard_paths)) if shards is None else shards:
            check_shard_sha256(self.shard_paths[k], self.index["shards"][k]["sha256"])


def decode_windows(words) -> dict[str, torch.Tensor]:
    """(B, L + 1) int32 layout words (a tensor on any device, or a numpy array) -> the training
    batch, each (B, L) int64 on the words' device:

        input_ids     token ids of words [0, L)
        labels        token ids of words [1, L + 1), layout.IGNORE_INDEX where that word's loss bit is 0
        position_ids  in-document positions of words [0, L) (0 marks a document start)

    Training runs it on the device, per micro batch (mamba.data.loader.as_data_spec): the host
    reads and ships 4 bytes per token, not the 24 of three int64 tensors.
    """
    ids, positions, loss = layout.decode(torch.as_tensor(words))  # (B, L + 1) int32, int32, bool
    labels = ids[:, 1:].long().masked_fill_(~loss[:, 1:], layout.IGNORE_INDEX)
    return {"input_ids": ids[:, :-1].long(), "labels": labels, "position_ids": positions[:, :-1].long()}
