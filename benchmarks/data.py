"""Data throughput, one table: `python benchmarks/data.py`.

bench_loader: training windows per second through mamba.data on ONE core (one process, one torch
thread), against the limit of copying the same windows' bytes out of the memmap with nothing
else done. Issue 4's target: >= 1e8 tokens/s/core and within 2x of the plain read.
The shard is written once and read once before timing, so both sides read from the page cache.

The loader's batches are the packed int32 words themselves: the decode into three int64 tensors
(input_ids, labels, position_ids: 24 bytes per token written for 4 read, ~7x the memory traffic
of the copy) runs on the training device per micro batch (mamba.data.loader.as_data_spec), where
it is a few elementwise kernels. Its CPU rate is printed too, for CPU training.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mamba import layout
from mamba.data.mixture import WindowShuffle
from mamba.data.pack import ShardWriter, write_index

# torch and the loader (which imports Composer) are imported inside bench_loader only: pack's
# worker processes are spawned and re-import this module, and importing torch and Composer in
# each of them costs seconds, which the 2-worker pack rate would otherwise include.

SEQ_LEN, BATCH = 4096, 56  # the default recipe's per-rank batch: 896 windows over 2 nodes x 8 GPUs
TOKENS = 1 << 25  # 32M tokens = 128 MiB of shards
SENTINELS = {"eos": 0, "fim_prefix": 1, "fim_middle": 2, "fim_suffix": 3}


def _best_rate(fn, tokens_per_call: int, seconds: float = 2.0) -> float:
    """Tokens per second of the fastest of repeated calls (the least disturbed by other load)."""
    fn()  # warm-up
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return tokens_per_call / best


def _write_source(root: Path):
    """Documents of 100..8000 tokens with a 50,280-entry vocabulary, as tools/pack.py lays them
    out, opened as a PackedSource and read once into the page cache."""
    from mamba.data.dataset import PackedSource

    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 8000, size=TOKENS // 4000)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), TOKENS)]
    total = int(lengths.sum())
    positions = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids = rng.integers(4, 50280, size=total)
    writer = ShardWriter(root, shard_tokens=1 << 24)
    writer.add(layout.encode(ids, positions, np.ones(total, dtype=bool)))
    identity = {"kind": "synthetic", "name": "random", "sha256": "none", "vocab_size": 50280}
    write_index(root, writer.close(), identity, eos_id=0)
    index = root / "index.json"  # record FIM sentinels, as a tokenizer that defines them would
    manifest = json.loads(index.read_text())
    manifest["special_tokens"] = SENTINELS
    index.write_text(json.dumps(manifest))
    source = PackedSource(root, SEQ_LEN)
    for k in range(len(source.shard_paths)):  # into the page cache
        np.asarray(source._shard(k)).sum()
    return source


def bench_loader() -> list[tuple[str, float, str]]:
    """Rows of (what, tokens/s, note), all on one core; main() prints every bench_* function's rows."""
    import torch

    from mamba.data.dataset import decode_windows
    from mamba.data.loader import MixtureStream, stream_loader

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = _write_source(Path(tmp))
        stream = MixtureStream([source], [1.0], BATCH, seed=0, shuffle=True, rank=0, world_size=1)
        fim = MixtureStream([source], [1.0], BATCH, seed=0, shuffle=True, rank=0, world_size=1, fim_rate=0.5)
        per_call = BATCH * SEQ_LEN
        state = {"g": 0, "plain": 0}

        def next_g():
            state["g"] += BATCH
            return np.arange(state["g"] - BATCH, state["g"])

        # The limit: the windows of the stream's first epoch, in its shuffled order, copied out of
        # the memmap with nothing else done. (shard, first word) of each is computed beforehand.
        order = WindowShuffle(len(source), 0, 0, 0).permute(np.arange(len(source)))
        shard = np.searchsorted(source._window_ends, order, side="right")
        first = (order - source._window_starts[shard]) * SEQ_LEN
        where = list(zip(shard.tolist(), first.tolist()))
        maps = [source._shard(k) for k in range(len(source.shard_paths))]

        def plain():
            # Into a new array each time, as the loader must: the trainer keeps the batch it gets.
            out = np.empty((BATCH, SEQ_LEN + 1), dtype=np.int32)
            i = state["plain"] % (len(where) - BATCH)
            state["plain"] += BATCH
            for row, (k, start) in enumerate(where[i:i + BATCH]):
                out[row] = maps[k][start:start + SEQ_LEN + 1]

        plain_rate = _best_rate(plain, per_call)
        rows.append(("1 core: memmap read of the same windows (limit)", plain_rate, "int32 copy only"))
        loaded = _best_rate(lambda: stream.batch(next_g()), per_call)
        rows.append(("1 core: schedule + shuffle + read (the loader's work)", loaded,
                     f"{plain_rate / loaded:.2f}x of the limit; target >= 1e8 and <= 2x"))
        loader = iter(stream_loader(stream, num_workers=0))
        rows.append(("1 core: the same through the DataLoader", _best_rate(lambda: next(loader), per_call),
                     "num_workers=0: what the trainer iterates"))
        batch = stream.batch(next_g())["words"]
        rows.append(("1 core: decode to input_ids/labels/position_ids", _best_rate(lambda: decode_windows(batch), per_call),
                     "runs on the training device per micro batch, not in the loader"))
        rows.append(("1 core: read with data.fim_rate=0.5", _best_rate(lambda: fim.batch(next_g()), per_call),
                     "FIM is per document, in numpy"))
    return rows


PACK_BYTES = 4 << 20  # ~4 MB of CPython stdlib sources: real code text, on every machine


def bench_pack() -> list[tuple[str, float, str]]:
    """tools/pack.py end to end (read, tokenize, layout, write + fsync + sha256 of shards) with 1
    and 2 workers, against the raw `tokenizers` batch-encode rate on the same texts (the limit;
    issue 4's target: pack >= 80% of it). The tokenizer is a byte-level BPE of 8,192 trained on
    the first 1 MB; each rate is the best of two runs."""
    import sysconfig

    from tokenizers import Tokenizer

    from mamba.data.pack import pack
    from mamba.data.tokenizer import load_tokenizer

    files, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or size >= PACK_BYTES:
            continue
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(path)
        size += path.stat().st_size
    texts = [p.read_text(encoding="utf-8") for p in files]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = texts[: next(i for i in range(len(texts)) if sum(map(len, texts[:i])) > 1 << 20)]
        load_tokenizer("bpe:8192", inputs_for_training=sample, save_dir=tmp)
        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        tok.encode_special_tokens = True
        tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False)) + len(texts)

        def best(fn):
            times = []
            for _ in range(2):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return tokens / min(times)

        raw = best(lambda: tok.encode_batch_fast(texts, add_special_tokens=False))
        rows.append((f"tokenizers encode_batch_fast, {size / 1e6:.0f} MB (limit)", raw, "all cores, no I/O"))
        rows.append(("tokenizers encode_batch (with offsets)", best(lambda: tok.encode_batch(texts, add_special_tokens=False)),
                     "all cores"))
        for workers in (1, 2):
            runs = iter(range(10))

            def run():
                out = tmp / f"w{workers}_{next(runs)}"
                pack(files, out, tokenizer=str(tmp / "tokenizer.json"), workers=workers, shard_tokens=1 << 20)

            rate = best(run)
            rows.append((f"pack.py end to end, --workers {workers}", rate, f"{rate / raw:.0%} of the limit; target >= 80%"))
    return rows


def main() -> None:
    table = []
    for fn in (bench_pack, bench_loader):
        table += [(fn.__name__, *row) for row in fn()]
    print(f"{'benchmark':<14} {'what':<52} {'tokens/s':>10}  note")
    for bench, what, rate, note in table:
        print(f"{bench:<14} {what:<52} {rate:>10.3g}  {note}")


if __name__ == "__main__":
    main()
