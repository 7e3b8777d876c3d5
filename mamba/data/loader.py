"""The train and eval DataLoaders: weighted sources in one global sample order, resumable in O(1).

The global order (mamba.data.mixture) numbers every sample of the run: g = 0, 1, 2, ...
Rank r of W ranks takes g = start + r, start + r + W, start + r + 2W, ... and groups them into
per-rank batches of B; so after n optimizer steps the ranks together have consumed exactly
samples [start, start + n * W * B) whatever W and B are. That is what makes resume elastic:
Composer checkpoints the global sample count (`state_dict`), and a run resumed on any number of
ranks with any batch split continues at that g, repeating and skipping nothing, without touching
the batches before it.

With num_workers = K > 0, worker w of a rank builds that rank's batches w, w + K, w + 2K, ...;
torch's DataLoader (batch_size=None: the stream yields whole batches) takes batches from its
workers round-robin, so they arrive in order.

Batches leave the loader as the packed int32 words themselves, {"words": (B, seq_len + 1)}:
`as_data_spec` has Composer decode them into input_ids / labels / position_ids on the device, per
micro batch. The host's work per token is then a 4-byte copy (benchmarks/data.py), and the
host-to-device transfer is 4 bytes per token instead of 24.

Train data never ends (each source starts its next epoch when it runs out, which is logged), so
train durations are given in batches, tokens or samples, not epochs. Eval data is each eval
source's windows in file order, mixed by the eval weights, up to the first source's end.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from composer.core import DataSpec
from composer.utils import dist

from mamba import layout
from mamba.config.schema import DataConfig
from mamba.data.dataset import PackedSource, decode_windows
from mamba.data.errors import DataError
from mamba.data.fim import fim_window
from mamba.data.mixture import WeightedSchedule, WindowShuffle

log = logging.getLogger(__name__)
SHUFFLE_BLOCK = 1 << 14  # window positions whose permuted indices are computed and cached together


class MixtureStream(torch.utils.data.IterableDataset):
    """Yields this rank's samples ({"words": (seq_len + 1,) int32}; see decode_windows), batch by batch.

    length: total global samples (eval: a finite pass from g = 0), or None for the endless train
    stream. Composer calls state_dict / load_state_dict to checkpoint and restore the position.
    """

    def __init__(self, sources: list[PackedSource], weights: list[float], batch_size: int, seed: int,
                 shuffle: bool, rank: int, world_size: int, length: int | None = None,
                 fim_rate: float = 0.0, fim_spm_rate: float = 0.0):
        self.sources, self.weights = sources, [float(w) for w in weights]
        self.schedule = WeightedSchedule(self.weights)
        self.windows = [len(s) for s in sources]
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.rank, self.world_size, self.length = int(rank), int(world_size), length
        self.fim_rate, self.fim_spm_rate = float(fim_rate), float(fim_spm_rate)
        self.sentinels = sources[0].fim_sentinels() if self.fim_rate > 0 else None
        self.start = 0  # global sample to begin at (set by load_state_dict on resume)
        self._shuffle_cache: dict[tuple[int, int, int], np.ndarray] = {}  # (source, epoch, block) -> windows
        per_step = self.batch_size * self.world_size
        if length is not None and length % per_step:
            raise ValueError(f"length {length} must be a multiple of batch_size x world_size = {per_step}")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shuffle_cache"] = {}  # each worker fills its own
        return state

    def identity(self) -> dict:
        """What fixes the global order; a checkpoint records it to tell a changed mixture apart."""
        return {"sources": [str(s.data_dir.resolve()) for s in self.sources], "weights": self.weights,
                "seq_len": self.sources[0].seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "fim_rate": self.fim_rate, "fim_spm_rate": self.fim_spm_rate}

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict:
        """Composer passes the global samples consumed (all ranks) since the start of the epoch
        (from_beginning=True) or since this stream was resumed (False)."""
        sample = int(num_samples) + (0 if from_beginning else self.start)
        return {"sample": sample, "identity": self.identity()}

    def load_state_dict(self, state: dict) -> None:
        sample = state.get("sample") if isinstance(state, dict) else None
        if not isinstance(sample, int) or sample < 0:
            raise ValueError(f"data loader state {state!r} from the checkpoint has no valid 'sample' count")
        saved, now = state.get("identity"), self.identity()
        if saved != now:
            changed = sorted(k for k in now if (saved or {}).get(k) != now[k])
            log.warning("the mixture changed since the checkpoint (%s); continuing the NEW order at "
                        "global sample %d", ", ".join(f"{k}: {(saved or {}).get(k)} -> {now[k]}" for k in changed), sample)
        self.start = sample

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        per_step = self.batch_size * self.world_size
        batches = None if self.length is None else self.length // per_step
        i = worker
        while batches is None or i < batches:
            # Rank-local samples j of batch i are global samples start + rank + j * world_size.
            j = np.arange(i * self.batch_size, (i + 1) * self.batch_size, dtype=np.int64)
            yield self.batch(self.start + self.rank + j * self.world_size)  # whole: batch_size=None
            i += workers

    def batch(self, g: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of global samples g ((B,) int64), in that order."""
        source, k = self.schedule.locate(g)
        words = np.empty((len(g), self.sources[0].seq_len + 1), dtype=np.int32)
        for s in sorted(set(source.tolist())):  # (set: np.unique costs ~15 us on a few values)
            rows = np.flatnonzero(source == s)
            epoch, within = np.divmod(k[rows], self.windows[s])
            windows = within.copy()
            for e in sorted(set(epoch.tolist())):
                in_epoch = epoch == e
                if self.shuffle:
                    windows[in_epoch] = self._shuffled(s, e, within[in_epoch])
                if e > 0 and (within[in_epoch] == 0).any():
                    first = int(g[rows[in_epoch & (within == 0)][0]])
                    log.info("source %s starts epoch %d at global sample %d", self.sources[s].data_dir, e + 1, first)
            self.sources[s].read(windows, out=words, rows=None if len(rows) == len(g) else rows)
        if self.fim_rate > 0:
            for row in range(len(g)):
                words[row] = fim_window(words[row], int(g[row]), self.seed, self.fim_rate, self.fim_spm_rate,
                                        self.sentinels, self.sources[source[row]].eos_id)
        return {"words": torch.from_numpy(words)}

    def _shuffled(self, s: int, e: int, within: np.ndarray) -> np.ndarray:
        """Epoch e's permutation of source s at positions `within`. The permutation is evaluated
        for SHUFFLE_BLOCK consecutive positions at once and cached (numpy's per-call overhead on
        a handful of indices would otherwise cost more than reading the windows)."""
        cache = self._shuffle_cache
        blocks = within // SHUFFLE_BLOCK
        out = np.empty_like(within)
        for b in sorted(set(blocks.tolist())):
            if (s, e, b) not in cache:
                if len(cache) > 2 * len(self.sources):
                    cache.clear()  # keep a few blocks per source: O(sources) memory
                perm = WindowShuffle(self.windows[s], self.seed, s, e)
                first = b * SHUFFLE_BLOCK
                cache[(s, e, b)] = perm.permute(np.arange(first, min(first + SHUFFLE_BLOCK, self.windows[s])))
            rows = blocks == b
            out[rows] = cache[(s, e, b)][within[rows] - b * SHUFFLE_BLOCK]
        return out


def open_sources(entries: list[dict], key: str, seq_len: int, vocab_size: int, verify: bool) -> list[PackedSource]:
    """PackedSource per config entry, with the checks that must pass before training starts."""
    sources = []
    for i, entry in enumerate(entries):
        try:
            source = PackedSource(entry["path"], seq_len)
            source.check_vocab(vocab_size)
        except (OSError, ValueError) as e:  # missing, torn, another layout, token ids past the vocab
            raise DataError(f"{key}[{i}].path: {e}") from None
        if sources and source.tokenizer.get("sha256") != sources[0].tokenizer.get("sha256"):
            raise DataError(
                f"{key}[{i}].path={entry['path']} was packed with tokenizer {source.tokenizer}, but "
                f"{key}[0].path={entries[0]['path']} with {sources[0].tokenizer}; every source must use "
                f"the same tokenizer, so repack one of them"
            )
        sources.append(source)
    if verify:  # every rank hashes its share of the shards: a full read of the data, split W ways
        shards = [(s, k) for s in sources for k in range(len(s.shard_paths))]
        for s, k in shards[dist.get_global_rank()::dist.get_world_size()]:
            try:
                s.verify([k])
            except (OSError, ValueError) as e:  # names the shard whose bytes changed
                raise DataError(f"data.verify: {e}") from None
    return sources


def as_data_spec(loader: torch.utils.data.DataLoader) -> DataSpec:
    """The loader as Composer consumes it: words decoded on the device per micro batch, tokens
    counted as seq_len per sample ("total", for token durations) and by loss bit ("loss_generating",
    which weights the micro batches of a step when the Trainer accumulates on tokens)."""
    return DataSpec(loader, microbatch_transforms=lambda batch: decode_windows(batch["words"]),
                    get_num_tokens_in_batch=count_tokens)


def count_tokens(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """{"total", "loss_generating"} of a batch of words, or of a decoded batch."""
    if "words" in batch:
        words = batch["words"]  # (B, L + 1): the first word of a window is never a target
        targets = int(((words[:, 1:] >> layout.LOSS_SHIFT) & 1).sum())
        return {"total": words.shape[0] * (words.shape[1] - 1), "loss_generating": targets}
    labels = batch["labels"]
    return {"total": labels.numel(), "loss_generating": int((labels != layout.IGNORE_INDEX).sum())}


def batch_shape(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(batch size, tokens per sequence the model sees) of a batch of words (B, L + 1), or of a
    decoded batch (input_ids (B, L)); ComposerMambaLM.flops_per_batch reads it (the trainer passes it)."""
    if "words" in batch:
        return batch["words"].shape[0], batch["words"].shape[1] - 1
    batch_size, seq_len = batch["input_ids"].shape
    return batch_size, seq_len


def build_train_dataloader(cfg: DataConfig, batch_size: int, vocab_size: int, seed: int) -> DataSpec:
    """This rank's endless stream of `batch_size`-window batches from cfg.sources (see module doc)."""
    sources = open_sources(cfg.sources, "data.sources", cfg.seq_len, vocab_size, cfg.verify)
    if cfg.fim_rate > 0:
        for i, source in enumerate(sources):
            try:
                sentinels = source.fim_sentinels()
            except ValueError as e:  # names the index.json without sentinels
                raise DataError(f"data.sources[{i}].path: {e}") from None
            if max(sentinels) >= vocab_size:  # they may never occur in the data, so check_vocab misses them
                raise DataError(f"data.sources[{i}].path: FIM sentinel ids {sentinels} from {source.data_dir}/index.json "
                                f"do not fit model.vocab_size={vocab_size}; raise vocab_size or set data.fim_rate=0")
    stream = MixtureStream(sources, [e.get("weight", 1.0) for e in cfg.sources], batch_size, seed, cfg.shuffle,
                           dist.get_global_rank(), dist.get_world_size(), fim_rate=cfg.fim_rate,
                           fim_spm_rate=cfg.fim_spm_rate)
    if dist.get_global_rank() == 0:
        period = stream.schedule
        for s, source in enumerate(sources):
            log.info("source %s: %d windows of %d tokens (%d tokens dropped), %d of every %d samples",
                     source.data_dir, len(source), cfg.seq_len, source.dropped_tokens,
                     period.counts[s], period.period)
    return as_data_spec(stream_loader(stream, cfg.num_workers))


def build_eval_dataloader(cfg: DataConfig, batch_size: int, vocab_size: int) -> DataSpec | None:
    """One deterministic pass over cfg.eval_sources (None if there are none), split over ranks.

    Windows are read in file order, mixed by the eval weights, until the first source has no
    window left; the tail that would not fill a last global batch is left out, so that every rank
    runs the same number of batches (FSDP needs that). No shuffle, no FIM.
    """
    if not cfg.eval_sources:
        return None
    sources = open_sources(cfg.eval_sources, "data.eval_sources", cfg.seq_len, vocab_size, cfg.verify)
    weights = [e.get("weight", 1.0) for e in cfg.eval_sources]
    schedule = WeightedSchedule(weights)
    available = min(schedule.first_sample(s, len(source)) for s, source in enumerate(sources))
    per_step = batch_size * dist.get_world_size()
    length = available // per_step * per_step
    if not length:
        raise DataError(
            f"data.eval_sources hold {available} windows of data.seq_len={cfg.seq_len} in their mixture, "
            f"fewer than one global batch ({per_step}); add eval data or lower the batch size"
        )
    if dist.get_global_rank() == 0:
        log.info("eval pass of %d windows (%d left out of the last global batch)", length, available - length)
    stream = MixtureStream(sources, weights, batch_size, seed=0, shuffle=False, rank=dist.get_global_rank(),
                           world_size=dist.get_world_size(), length=length)
    return as_data_spec(stream_loader(stream, cfg.num_workers))


def stream_loader(stream: MixtureStream, num_workers: int) -> torch.utils.data.DataLoader:
    # batch_size=None: the stream builds each batch whole (one copy out of the memmaps) and the
    # DataLoader passes it on as it is, instead of splitting it into rows and stacking them again.
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
