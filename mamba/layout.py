"""The int32 token layout of packed shards: the one place that knows the bit positions.

Each int32 in a shard describes one token:

    bit  31      always 0 (keeps every value non-negative, so a stray sign bit means corruption)
    bit  30      loss bit: 1 if the model is trained to predict this token
    bits 16..29  position of the token inside its document (14 bits, 0..16383)
    bits  0..15  token id (16 bits, vocabularies up to 65,536 entries)

Documents longer than MAX_POSITION + 1 tokens keep position MAX_POSITION for every token past it
(saturation). Position 0 therefore marks a document start and nothing else: a long document never
invents a boundary, and a boundary is never lost. The exact position of tokens beyond 16,383 is the
only thing not recorded.

Both the pack tool (encode) and the loader (decode) call this module; the functions work on numpy
arrays and torch tensors alike because they only use ``&``, ``|``, ``<<`` and ``>>``.
"""
from __future__ import annotations

import numpy as np

LAYOUT_VERSION = 1

TOKEN_BITS = 16
POSITION_BITS = 14
POSITION_SHIFT = TOKEN_BITS  # 16
LOSS_SHIFT = TOKEN_BITS + POSITION_BITS  # 30

MAX_TOKEN_ID = (1 << TOKEN_BITS) - 1  # 65535
MAX_VOCAB_SIZE = 1 << TOKEN_BITS  # 65536
MAX_POSITION = (1 << POSITION_BITS) - 1  # 16383

TOKEN_MASK = MAX_TOKEN_ID
POSITION_MASK = MAX_POSITION

# The label of a token that is not trained on (its loss bit is 0): the loader writes it, the model's
# loss and metrics skip it. -100 is torch's cross_entropy default ignore_index. It lives here
# because this module is the one contract that both mamba.data and mamba.model may import.
IGNORE_INDEX = -100


def encode(token_ids, positions, loss_mask) -> np.ndarray:
    """Pack three equally long 1-D sequences into int32 words.

    token_ids: ints in [0, 65535]; positions: ints >= 0 (saturated at MAX_POSITION);
    loss_mask: bools or 0/1. Raises ValueError naming the offending value on bad input.
    """
    tokens = np.asarray(token_ids, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.int64)
    loss = np.asarray(loss_mask)
    if not (tokens.shape == pos.shape == loss.shape) or tokens.ndim != 1:
        raise ValueError(
            f"encode needs three 1-D arrays of one length, got shapes "
            f"{tokens.shape}, {pos.shape}, {loss.shape}"
        )
    if tokens.size:
        if tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID:
            bad = tokens[(tokens < 0) | (tokens > MAX_TOKEN_ID)][0]
            raise ValueError(
                f"token id {bad} does not fit the layout's {TOKEN_BITS}-bit token field "
                f"(0..{MAX_TOKEN_ID}); use a vocabulary of at most {MAX_VOCAB_SIZE} entries"
            )
        if pos.min() < 0:
            raise ValueError(f"position {pos.min()} is negative; positions start at 0")
        if loss.dtype != bool and not np.isin(loss, (0, 1)).all():
            raise ValueError(f"loss_mask must hold only 0/1 or booleans, got {np.unique(loss)[:5]}")
    pos = np.minimum(pos, MAX_POSITION)
    words = tokens | (pos << POSITION_SHIFT) | (loss.astype(np.int64) << LOSS_SHIFT)
    return words.astype(np.int32)


def decode(words):
    """Unpack int32 words (numpy array or torch tensor, any shape) into (token_ids, positions, loss).

    token_ids and positions come back in the input's integer type; loss as booleans.
    """
    token_ids = words & TOKEN_MASK
    positions = (words >> POSITION_SHIFT) & POSITION_MASK
    loss = ((words >> LOSS_SHIFT) & 1) == 1
    return token_ids, positions, loss


def check_words(words, where: str) -> None:
    """Raise ValueError if any word has bit 31 set (negative int32): a sign of a corrupt shard."""
    if 0 not in words.shape and int(words.min()) < 0:  # works for numpy and torch (where .size is a method)
        raise ValueError(
            f"{where}: found a negative int32 (bit 31 set), which the layout never writes; "
            f"the shard is corrupt or not a packed shard — re-run tools/pack.py"
        )

