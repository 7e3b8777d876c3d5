"""What a checkpoint manifest costs: GB/s of hashing a checkpoint-sized file, per algorithm, next
to a plain read of the same file. Prints a table; asserts nothing.

    python benchmarks/checkpoint_hash.py [--gib 1] [--dir /path/on/the/checkpoint/filesystem]

The file is random bytes written to --dir (default: a temporary directory) and read once before
timing, so the numbers are the page-cache case: hashing right after a save, as the trainer does
(mamba.training.resume.ManifestCheckpointSaver), and verifying at resume on a warm cache. A cold
read from a network filesystem is usually slower than any of these hashes; the time a manifest
adds to a save is then about size / (ranks x rate), each rank hashing its share of the files.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib
from pathlib import Path

CHUNK = 1 << 24


def rate(path: Path, digest) -> float:
    """GB/s of one pass over the file, feeding each chunk to `digest` (None: read only)."""
    started = time.perf_counter()
    with open(path, "rb") as f:
        if isinstance(digest, str):
            hashlib.file_digest(f, digest)
        else:
            value = 0
            while chunk := f.read(CHUNK):
                value = digest(chunk, value) if digest else value
    return path.stat().st_size / 1e9 / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "shard.bin"
        with open(path, "wb") as f:
            for _ in range(int(args.gib * (1 << 30)) // CHUNK):
                f.write(os.urandom(CHUNK))
        rate(path, None)  # into the page cache
        rows = [("read only", rate(path, None)), ("crc32 (zlib)", rate(path, zlib.crc32))]
        rows += [(name, rate(path, name)) for name in ("sha256", "sha1", "blake2b", "md5")]
    print(f"| hashing {args.gib:g} GiB | GB/s | s per 10 GB |\n|---|---|---|")
    for name, gbps in rows:
        print(f"| {name} | {gbps:.2f} | {10 / gbps:.1f} |")


if __name__ == "__main__":
    main()
