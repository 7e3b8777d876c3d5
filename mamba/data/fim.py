"""Fill-in-the-middle at load time (Bavarian et al. 2022, "Efficient Training of Language Models to
Fill in the Middle", arXiv:2207.14255), applied per document fragment of a training window.

The paper's "context-level" FIM, which it found better than FIM before packing: the window (L + 1
words read from a shard) is split where a document starts (position 0); each piece is one
document, or the part of one that lies in this window. With probability `rate` a piece's tokens
(without a final EOS, which stays last) are cut at two uniformly drawn token boundaries into
prefix / middle / suffix and reordered with the tokenizer's sentinels:

    PSM  <PRE> prefix <SUF> suffix <MID> middle [EOS]
    SPM  <PRE> <SUF> suffix <MID> prefix middle [EOS]      (probability spm_rate)

SPM is the paper's variant in which prefix and middle stay adjacent (its appendix; the form
bigcode's Megatron-LM and StarCoder use). Cuts are at token boundaries: at load time there is no
tokenizer to cut characters as the paper does.

Fixed windows: each transformed piece is 3 tokens longer, so the transformed window is cut back to
L + 1 words at its end. Pieces that end inside the window stay whole (a permutation of their
tokens plus three sentinels); only the tail of the window's last piece(s) is not trained on.
Positions restart at 0 where the original piece started at 0 and count up through the
transformed piece, so documents stay isolated; loss bits move with their tokens, sentinels get 1.

All randomness is hash_uniform(seed, global sample, piece, draw): the same sample is transformed
identically whatever the rank, worker or resume point.
"""
from __future__ import annotations

import numpy as np

from mamba import layout
from mamba.data.mixture import hash_uniform


def fim_window(words: np.ndarray, sample: int, seed: int, rate: float, spm_rate: float,
               sentinels: tuple[int, int, int], eos_id: int) -> np.ndarray:
    """One window's (L + 1,) int32 layout words -> the FIM-transformed (L + 1,) int32 words.

    sample: the global sample index (keys the random draws); sentinels: (prefix, middle, suffix) ids.
    """
    n = len(words)
    ids, positions, loss = layout.decode(words.astype(np.int64))
    starts = np.flatnonzero(positions == 0)
    starts = np.concatenate([[0], starts[starts > 0], [n]])  # piece p is [starts[p], starts[p + 1])
    pieces = np.arange(len(starts) - 1)
    do_fim, use_spm, cut_a, cut_b = (hash_uniform(seed, sample, pieces, d) for d in range(4))
    do_fim, use_spm = do_fim < rate, use_spm < spm_rate

    # Gather indices into ids extended by the three sentinels at n, n + 1, n + 2.
    pre, mid, suf = n, n + 1, n + 2
    order, lengths = [], []
    for p in pieces.tolist():
        begin, end = int(starts[p]), int(starts[p + 1])
        content_end = end - 1 if ids[end - 1] == eos_id else end  # a final EOS stays last
        span = content_end - begin
        if not do_fim[p] or span == 0:
            order.append(np.arange(begin, end))
            lengths.append(end - begin)
            continue
        lo, hi = sorted(begin + int(u * (span + 1)) for u in (cut_a[p], cut_b[p]))  # cuts in 0..span
        prefix, middle, suffix = np.arange(begin, lo), np.arange(lo, hi), np.arange(hi, content_end)
        tail = np.arange(content_end, end)  # the EOS, if the piece ends with one
        if use_spm[p]:
            parts = ([pre, suf], suffix, [mid], prefix, middle, tail)
        else:
            parts = ([pre], prefix, [suf], suffix, [mid], middle, tail)
        order.append(np.concatenate(parts))
        lengths.append(end - begin + 3)
    index = np.concatenate(order)[:n]
    lengths = np.array(lengths)
    # Each (possibly transformed) piece counts positions up from where the original piece began.
    first = np.repeat(positions[starts[:-1]], lengths)[:n]
    offset = (np.arange(len(index)) - np.repeat(np.cumsum(lengths) - lengths, lengths)[:n])
    ext_ids = np.concatenate([ids, np.asarray(sentinels, dtype=np.int64)])
    ext_loss = np.concatenate([loss, np.ones(3, dtype=bool)])
    return layout.encode(ext_ids[index], first + offset, ext_loss[index])
