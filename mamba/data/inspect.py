"""Look inside a packed dataset: totals, token statistics, a window decoded to text, checksums.

Used by `python tools/pack.py inspect DIR`. A decoded window marks every document start with
DOC_MARK and wraps tokens without the loss bit (BOS, chat prompts) in NO_LOSS_OPEN/CLOSE, so what
the model is trained on is visible at a glance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mamba import layout
from mamba.data.manifest import TOKENIZER_NAME, check_shard_file, check_shard_sha256, read_index
from mamba.data.tokenizer import load_tokenizer

DOC_MARK = "\n⟦doc⟧"
NO_LOSS_OPEN, NO_LOSS_CLOSE = "⟨no-loss:", "⟩"


def _tokenizer(data_dir: Path, manifest: dict):
    if manifest["tokenizer"]["kind"] == "byte":
        return load_tokenizer("byte")
    path = data_dir / TOKENIZER_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the manifest names a {manifest['tokenizer']['kind']} tokenizer")
    return load_tokenizer(str(path))


def _shard(data_dir: Path, entry: dict) -> np.ndarray:
    """A shard's words as a read-only memmap, its header and size checked first: a truncated file
    is then refused naming the shard, not by numpy's "mmap length is greater than file size"."""
    path = data_dir / entry["file"]
    check_shard_file(path, entry["tokens"])
    return np.load(path, mmap_mode="r")


def summary(data_dir: str | Path, top: int = 10) -> str:
    """Totals from the manifest plus statistics computed from every shard, one shard at a time:
    distinct ids, most frequent ids (decoded), document lengths, share of tokens with the loss bit."""
    data_dir = Path(data_dir)
    m = read_index(data_dir)
    tok = _tokenizer(data_dir, m)
    vocab = max(m["tokenizer"]["vocab_size"], 1)
    hist = np.zeros(max(vocab, layout.MAX_VOCAB_SIZE), dtype=np.int64)
    trained = 0
    starts, total = [], 0
    for s in m["shards"]:
        words = _shard(data_dir, s)
        ids, positions, loss = layout.decode(np.asarray(words))
        hist += np.bincount(ids, minlength=len(hist))
        trained += int(loss.sum())
        starts.append(np.flatnonzero(positions == 0) + total)
        total += len(words)
    starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    lengths = np.diff(np.append(starts, total))
    lines = [
        f"dataset {data_dir}" + (f" (split {m['split']})" if "split" in m else ""),
        f"tokenizer {m['tokenizer']['name']} ({m['tokenizer']['kind']}, vocab {m['tokenizer']['vocab_size']}, "
        f"sha256 {m['tokenizer']['sha256'][:16]}...)",
        f"special tokens {m.get('special_tokens', {'eos': m['eos_id']})}; bos {m.get('bos', False)}, eos {m.get('eos', True)}",
        f"{m['total_documents']} documents, {m['total_tokens']} tokens in {len(m['shards'])} shards; "
        f"{len(m['sources'])} sources, {len(m['skipped'])} skipped",
        f"loss bit on {trained / max(total, 1):.1%} of tokens",
        f"document length: min {lengths.min() if len(lengths) else 0}, median {int(np.median(lengths)) if len(lengths) else 0}, "
        f"mean {lengths.mean() if len(lengths) else 0:.1f}, max {lengths.max() if len(lengths) else 0}; "
        f"{int((lengths > layout.MAX_POSITION + 1).sum())} longer than {layout.MAX_POSITION + 1} (positions saturate)",
        f"distinct token ids {int((hist > 0).sum())} of {vocab}; max id {int(np.flatnonzero(hist).max()) if total else -1}",
        "most frequent ids:",
    ]
    for i in np.argsort(-hist, kind="stable")[:top]:
        if hist[i]:
            lines.append(f"  {int(i):>6} {hist[i] / total:7.2%}  {tok.decode([int(i)])!r}")
    for s in m["skipped"]:
        lines.append(f"skipped {s['path']}: {s['reason']}")
    return "\n".join(lines)


def read_words(data_dir: Path, manifest: dict, start: int, count: int) -> np.ndarray:
    """Words [start, start + count) of the concatenated shards (memmapped, so only those are read)."""
    out, offset = [], 0
    for s in manifest["shards"]:
        lo, hi = max(start, offset), min(start + count, offset + s["tokens"])
        if lo < hi:
            out.append(_shard(data_dir, s)[lo - offset:hi - offset])
        offset += s["tokens"]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


def render_window(data_dir: str | Path, window: int, seq_len: int) -> str:
    """Words [window * seq_len, (window + 1) * seq_len) as text, marking document starts and
    tokens without the loss bit."""
    data_dir = Path(data_dir)
    m = read_index(data_dir)
    if window < 0 or seq_len < 1 or window * seq_len >= m["total_tokens"]:
        raise ValueError(f"--window {window} with --seq-len {seq_len} starts past the dataset's "
                         f"{m['total_tokens']} tokens")
    tok = _tokenizer(data_dir, m)
    ids, positions, loss = layout.decode(read_words(data_dir, m, window * seq_len, seq_len).astype(np.int64))
    # Runs of tokens sharing (document, loss bit) are decoded together so multi-token
    # characters come out whole.
    cut = np.flatnonzero((positions[1:] == 0) | (loss[1:] != loss[:-1])) + 1
    parts = []
    for lo, hi in zip(np.r_[0, cut], np.r_[cut, len(ids)]):
        text = tok.decode(ids[lo:hi].tolist())
        if positions[lo] == 0:
            parts.append(DOC_MARK)
        parts.append(text if loss[lo] else f"{NO_LOSS_OPEN}{text}{NO_LOSS_CLOSE}")
    head = f"window {window} = tokens [{window * seq_len}, {window * seq_len + len(ids)}); " \
           f"{DOC_MARK.strip()} marks a document start, {NO_LOSS_OPEN}...{NO_LOSS_CLOSE} tokens without loss\n"
    return head + "".join(parts)


def verify(data_dir: str | Path) -> list[str]:
    """Check every shard's header, size and sha256 against the manifest (the loader's checks, see
    mamba.data.manifest); return the problems, one per bad shard (empty if none)."""
    data_dir = Path(data_dir)
    problems = []
    for s in read_index(data_dir)["shards"]:
        path = data_dir / s["file"]
        try:
            check_shard_file(path, s["tokens"])
            check_shard_sha256(path, s["sha256"])
        except (OSError, ValueError) as e:
            problems.append(str(e))
    return problems
