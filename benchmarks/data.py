"""Data throughput, one table: `python benchmarks/data.py`.

bench_loader: training windows per second through mamba.data on ONE core (one process, one torch
thread), against the limit of copying the same windows' bytes out of the memmap with nothing
else done. Issue 4's target: >= 1e8 tokens/s/core and within 2x of the plain read.
The shard is written once and read once before timing, so both sides read from the page cache.

The loader's batches are the packed int32 words themselves: the decode into three int64 tensors
(input_ids, labels, position_ids: 24 bytes per token written for 4 read, ~7x the memory traffic
of the copy) runs on the training device per micro batch (mamba.data.loader.as_data_spec), where
it is a few elementwise kernels. Its CPU rate is printed too, for CPU training.

bench_pack: tools/pack.py against the raw tokenizer rate; bench_parts: the same pack split in two
parts run at once (the many-machine pack, --part I/N), against one process.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mamba import layout
from mamba.data.manifest import write_index
from mamba.data.mixture import WindowShuffle
from mamba.data.shards import ShardWriter

# torch and the loader (which imports Composer) are imported inside bench_loader only: pack's
# worker processes are spawned and re-import this module, and importing torch and Composer in
# each of them costs seconds, which the 2-worker pack rate would otherwise include.

SEQ_LEN, BATCH = 4096, 56  # the default recipe's per-rank batch: 896 windows over 2 nodes x 8 GPUs
TOKENS = 1 << 25  # 32M tokens = 128 MiB of shards
SENTINELS = {"eos": 0, "fim_prefix": 1, "fim_middle": 2, "fim_suffix": 3}


def _best_rates(fns: list, tokens_per_call: int, seconds: float = 4.0) -> list[float]:
    """Tokens per second of each fn's fastest call (the least disturbed by other load). The fns
    are called in turn, so a drift in the machine's speed affects all of them alike."""
    for fn in fns:
        fn()  # warm-up
    best, end = [float("inf")] * len(fns), time.perf_counter() + seconds
    while time.perf_counter() < end:
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return [tokens_per_call / b for b in best]


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

        loader = iter(stream_loader(stream, num_workers=0))
        plain_rate, loaded, iterated = _best_rates([plain, lambda: stream.batch(next_g()), lambda: next(loader)],
                                                   per_call)
        rows.append(("1 core: memmap read of the same windows (limit)", plain_rate, "int32 copy only"))
        rows.append(("1 core: schedule + shuffle + read (the loader's work)", loaded,
                     f"{plain_rate / loaded:.2f}x of the limit; target >= 1e8 and <= 2x"))
        rows.append(("1 core: the same through the DataLoader", iterated,
                     f"{plain_rate / iterated:.2f}x; num_workers=0: what the trainer iterates"))
        batch = stream.batch(next_g())["words"]
        decode, fim_read = _best_rates([lambda: decode_windows(batch), lambda: fim.batch(next_g())], per_call)
        rows.append(("1 core: decode to input_ids/labels/position_ids", decode,
                     "runs on the training device per micro batch, not in the loader"))
        rows.append(("1 core: read with data.fim_rate=0.5", fim_read, "FIM is per document, in numpy"))
    return rows


# ~32 MB of CPython's own sources (the stdlib and its tests): real code text, on every machine.
# Enough that starting pack's worker processes (~0.3 s, once per run) is a few percent of a run.
PACK_BYTES = 32 << 20
# Text per tokenizing job, as pack's default (4 MB): 8 jobs for this corpus, enough to keep 2
# workers busy past their start-up; a real corpus is thousands of them.
PACK_CHUNK_BYTES = 4 << 20
PACK_ROUNDS = 3


def _pack_inputs() -> tuple[list[Path], int, list[str]]:
    """The first PACK_BYTES of CPython's own .py sources that are UTF-8: (files, bytes, texts)."""
    import sysconfig

    files, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= PACK_BYTES:
            break
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(path)
        size += path.stat().st_size
    return files, size, [p.read_text(encoding="utf-8") for p in files]


def _train_tokenizer(texts: list[str], out: Path) -> None:
    """out/tokenizer.json: a byte-level BPE of 8,192 trained on the first 1 MB of the texts."""
    from mamba.data.tokenizer import load_tokenizer

    sample = texts[: next(i for i in range(len(texts)) if sum(map(len, texts[:i])) > 1 << 20)]
    load_tokenizer("bpe:8192", inputs_for_training=sample, save_dir=out)


def bench_parts() -> list[tuple[str, float, str]]:
    """A many-machine pack on one box: the same inputs as bench_pack packed by one `tools/pack.py`
    process, then as 2 parts by two processes at once (--part 0/2 and 1/2, as two array tasks
    would), each --workers 1, timed from launch to the merged index.json (the last part merges).
    On a cluster each part has a machine to itself; here the two share the box's cores, so the
    ratio shows what the split costs or gains where cores are shared, not a cluster's speed-up."""
    import subprocess
    import sys

    files, _, texts = _pack_inputs()
    script = Path(__file__).resolve().parent.parent / "tools" / "pack.py"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _train_tokenizer(texts, tmp)
        args = ["--tokenizer", str(tmp / "tokenizer.json"), "--quiet", "--shard-tokens", str(1 << 20)]
        seconds = {1: [], 2: []}
        for round_ in range(PACK_ROUNDS):
            for count in (1, 2):
                out = tmp / f"out{round_}-{count}"
                t = time.perf_counter()
                procs = [subprocess.Popen([sys.executable, str(script), *args, "--out", str(out), *map(str, files),
                                           *(["--part", f"{i}/{count}"] if count > 1 else [])],
                                          stdout=subprocess.DEVNULL) for i in range(count)]
                if any(p.wait() for p in procs):
                    raise RuntimeError(f"tools/pack.py failed packing {count} part(s) into {out}")
                seconds[count].append(time.perf_counter() - t)
        tokens = json.loads((tmp / "out0-1" / "index.json").read_text())["total_tokens"]
    one, two = tokens / min(seconds[1]), tokens / min(seconds[2])
    return [("pack.py, 1 process (the whole input)", one, f"best of {PACK_ROUNDS}, process start included"),
            ("pack.py, 2 parts at once + merge", two, f"{two / one:.2f}x of 1 process on this box's "
                                                     f"{os.cpu_count()} cores (best of {PACK_ROUNDS})")]


def bench_pack() -> list[tuple[str, float, str]]:
    """tools/pack.py end to end (read, tokenize, layout, write + fsync + sha256 of shards) with 1
    and 2 workers, against the raw `tokenizers` batch-encode rate on the same texts (the limit;
    issue 4's target: pack >= 80% of it). The tokenizer is a byte-level BPE of 8,192 trained on
    the first 1 MB.

    This VM's speed drifts by up to 1.5x from minute to minute, so the limit and the pack runs are
    timed in rounds, one of each per round, and each ratio is the median of its per-round ratios
    (rates: the best round)."""
    import statistics

    from tokenizers import Tokenizer

    from mamba.data.pack import pack

    files, size, texts = _pack_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _train_tokenizer(texts, tmp)
        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        tok.encode_special_tokens = True
        tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False)) + len(texts)
        runs = iter(range(100))

        def packer(workers: int):
            return lambda: pack(files, tmp / f"out{next(runs)}", tokenizer=str(tmp / "tokenizer.json"),
                                workers=workers, shard_tokens=1 << 20, chunk_bytes=PACK_CHUNK_BYTES)

        timed = {"limit": lambda: tok.encode_batch_fast(texts, add_special_tokens=False),
                 "offsets": lambda: tok.encode_batch(texts, add_special_tokens=False),
                 "pack1": packer(1), "pack2": packer(2)}
        seconds = {name: [] for name in timed}
        for _ in range(PACK_ROUNDS):
            for name, fn in timed.items():
                t = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - t)
        # The fixed cost of --workers 2 (spawn, import, load the tokenizer): its run on one small
        # file minus the --workers 1 run of it.
        small = min(files, key=lambda p: p.stat().st_size or float("inf"))
        startup = []
        for _ in range(PACK_ROUNDS):
            one = []
            for workers in (1, 2):
                t = time.perf_counter()
                pack([small], tmp / f"out{next(runs)}", tokenizer=str(tmp / "tokenizer.json"), workers=workers)
                one.append(time.perf_counter() - t)
            startup.append(one[1] - one[0])

    def rate(name):
        return tokens / min(seconds[name])

    def of_limit(name):
        return statistics.median(lim / t for lim, t in zip(seconds["limit"], seconds[name]))

    rows = [(f"tokenizers encode_batch_fast, {size / 1e6:.0f} MB (limit)", rate("limit"), "all cores, no I/O"),
            ("tokenizers encode_batch (with offsets)", rate("offsets"), f"{of_limit('offsets'):.0%} of the limit")]
    start = statistics.median(startup)
    startup_note = {1: "", 2: f"; starting the workers: {start:.2f} s, "
                              f"{start / statistics.median(seconds['pack2']):.0%} of a run"}
    for workers in (1, 2):
        rows.append((f"pack.py end to end, --workers {workers}", rate(f"pack{workers}"),
                     f"{of_limit(f'pack{workers}'):.0%} of the limit (median of {PACK_ROUNDS} rounds); "
                     f"target >= 80%{startup_note[workers]}"))
    return rows


def main() -> None:
    table = []
    for fn in (bench_pack, bench_parts, bench_loader):
        table += [(fn.__name__, *row) for row in fn()]
    print(f"{'benchmark':<14} {'what':<52} {'tokens/s':>10}  note")
    for bench, what, rate, note in table:
        print(f"{bench:<14} {what:<52} {rate:>10.3g}  {note}")


if __name__ == "__main__":
    main()
