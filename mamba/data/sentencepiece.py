"""SentencePiece tokenizer.model files (Llama-2, Mistral, Gemma, T5) as HF `tokenizers` tokenizers.

read_model(path) reads the model's protobuf; to_hf_json(model) builds the equivalent tokenizer.json
text with the same ids, so packing, generation and HF exports all use one `tokenizers` code path.

The protobuf is decoded here, from its wire format, rather than with sentencepiece_model_pb2: the
pb2 module shipped by recent sentencepiece wheels needs a newer protobuf runtime than the one
W&B pins (protobuf<6; see setup.py), and only a dozen scalar fields are needed. So no package
beyond `tokenizers` is needed to convert a model (the tests use `sentencepiece` as the reference).

How SentencePiece's encoding (sentencepiece_processor.cc, normalizer.cc, bpe_model.cc,
unigram_model.cc) is reproduced, for ids equal to SentencePieceProcessor.encode's:

- normalizer: precompiled_charsmap (NFKC-like rules) when present; remove_extra_whitespaces drops
  leading / trailing spaces and collapses runs of spaces; add_dummy_prefix puts "▁" in front of a
  non-empty text; every space becomes "▁". All on the whole text, as SentencePiece does.
- BPE: SentencePiece merges the adjacent pair whose concatenation is the highest-scored piece,
  leftmost first, over the whole text. The HF model gets every split of each normal piece into two
  normal pieces as a merge, ranked by the piece's score: the same rule. User-defined pieces are
  taken whole and never merged: a Split pre-tokenizer isolates them (longest first) and
  ignore_merges lets the model emit them as they are.
- Unigram: the same Viterbi search over the same scores; user-defined pieces get SentencePiece's
  bonus score. Control, unknown, byte and unused pieces are not searched by SentencePiece, while
  HF's Unigram searches every vocabulary entry, so they get a score no path can choose.
- characters without a piece become byte pieces <0xNN> (byte_fallback) or one <unk> per run.
- control and unknown pieces (<s>, </s>, <unk>, ...) are special added tokens (mamba.data.tokenizer
  encodes their names in a text as plain text, as SentencePiece does).
- decoder: "▁" back to spaces, byte pieces joined into UTF-8, <unk> as unk_surface (" ⁇ "), and
  the first "▁" dropped when a dummy prefix or whitespace removal is set.

Known differences (the tests check the rest, on real text, against sentencepiece itself):
- Unigram ties: SentencePiece adds path scores in 32-bit floats, HF in 64-bit ones, so between two
  segmentations of exactly equal score (e.g. "))" ")" against ")" "))") the two can pick
  differently. Both are equally likely under the model; about 1 file in 1,000 of CPython's
  sources has such a tie with the small models of the tests.
- precompiled_charsmap (models with NFKC-like normalization, not Llama / Mistral / Gemma, which
  use none): HF's Precompiled normalizer applies rules spanning several characters only inside a
  grapheme cluster shorter than 6 UTF-8 bytes, so text in decomposed form whose composition is
  longer (e.g. Tamil "\u0b95\u0bc6\u0bbe", conjoining Hangul jamo) stays decomposed where
  SentencePiece composes it. Text in NFC is not affected. Such rules also apply inside
  user-defined pieces here, not in SentencePiece.
- BPE models with UNUSED pieces: SentencePiece merges through them and splits them again at the
  end; here they are never formed. Pieces of equal score merge by id here, by position there.
- decode prints control pieces' names (SentencePiece prints nothing); a denormalizer is not applied.
Models outside this (WORD / CHAR types, whitespace kept as " " or treated as a suffix) are refused
with a message naming the file.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SPACE = "\u2581"  # "▁": SentencePiece's visible space
# ModelProto.SentencePiece.Type (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}

# The fields used, per message: field number -> (name, kind, default as the .proto declares it).
_PIECE = {1: ("piece", "str", ""), 2: ("score", "float", 0.0), 3: ("type", "int", NORMAL)}
_TRAINER = {3: ("model_type", "int", 1), 24: ("treat_whitespace_as_suffix", "bool", False),
            35: ("byte_fallback", "bool", False), 44: ("unk_surface", "str", " \u2047 "),
            45: ("unk_piece", "str", "<unk>"), 46: ("bos_piece", "str", "<s>"), 47: ("eos_piece", "str", "</s>"),
            48: ("pad_piece", "str", "<pad>")}
_NORMALIZER = {2: ("precompiled_charsmap", "bytes", b""), 3: ("add_dummy_prefix", "bool", True),
               4: ("remove_extra_whitespaces", "bool", True), 5: ("escape_whitespaces", "bool", True)}
FLT_MIN = 1.1754943508222875e-38  # C's smallest normal float, which SentencePiece starts a max from
_WIRE = {"str": 2, "bytes": 2, "msg": 2, "float": 5, "int": 0, "bool": 0}


class Corrupt(ValueError):
    """The bytes are not a SentencePiece model (the message says where they stop making sense)."""


@dataclass
class Piece:
    piece: str
    score: float
    type: int


@dataclass
class SentencePieceModel:
    path: Path
    pieces: list[Piece]
    trainer: dict
    normalizer: dict

    @property
    def model_type(self) -> str:
        return MODEL_TYPES.get(self.trainer["model_type"], str(self.trainer["model_type"]))

    def special_ids(self) -> dict[str, int]:
        """{unk, bos, eos, pad: id} as SentencePieceProcessor's unk_id() ... pad_id() give them: the
        piece the trainer spec names (<unk>, <s>, </s>, <pad> by default) if it has the right type."""
        ids = {p.piece: i for i, p in enumerate(self.pieces)}
        out = {}
        for key, kind in (("unk", UNKNOWN), ("bos", CONTROL), ("eos", CONTROL), ("pad", CONTROL)):
            i = ids.get(self.trainer[f"{key}_piece"])
            if i is not None and self.pieces[i].type == kind:
                out[key] = i
        return out


def _varint(data: bytes, pos: int, base: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise Corrupt(f"a number runs past the end of its message at byte {base + pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise Corrupt(f"a number longer than 10 bytes ends at byte {base + pos}")


def _fields(data: bytes, base: int) -> Iterator[tuple[int, int, int | bytes, int]]:
    """(field number, wire type, value, the value's offset in the file) of each field of one
    message; base: the message's offset in the file."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos, base)
        number, wire, at = key >> 3, key & 7, base + pos
        if number == 0:
            raise Corrupt(f"field number 0 at byte {at}")
        if wire == 0:
            value, pos = _varint(data, pos, base)
        elif wire in (1, 2, 5):
            size = {1: 8, 5: 4}.get(wire)
            if size is None:
                size, pos = _varint(data, pos, base)
                at = base + pos
            if pos + size > len(data):
                raise Corrupt(f"field {number} at byte {at} runs past the end of its message")
            value, pos = data[pos:pos + size], pos + size
        else:  # 3 and 4 are protobuf's obsolete groups, which this .proto has none of; 6, 7 do not exist
            raise Corrupt(f"field {number} has wire type {wire} at byte {at}")
        yield number, wire, value, at


def _message(data: bytes, base: int, schema: dict, repeated: dict | None = None) -> dict:
    """The schema's fields of one message at offset `base` (defaults where absent); repeated:
    number -> (name, schema) of repeated sub-messages, gathered into lists. Sub-messages named in
    the schema ("msg") are returned as (bytes, offset)."""
    out = {name: default for name, _, default in schema.values()}
    for name, _ in (repeated or {}).values():
        out[name] = []
    for number, wire, value, at in _fields(data, base):
        if repeated and number in repeated:
            name, sub = repeated[number]
            if wire != 2:
                raise Corrupt(f"field {name} at byte {at} has wire type {wire}, expected 2")
            out[name].append(_message(value, at, sub))
            continue
        if number not in schema:
            continue  # a field the conversion does not need
        name, kind, _ = schema[number]
        if wire != _WIRE[kind]:
            raise Corrupt(f"field {name} at byte {at} has wire type {wire}, expected {_WIRE[kind]}")
        if kind == "str":
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise Corrupt(f"field {name} at byte {at} is not UTF-8 text") from None
        elif kind == "float":
            value = struct.unpack("<f", value)[0]
        elif kind == "msg":
            value = (value, at)
        elif kind in ("int", "bool"):
            value = value - (1 << 64) if value >= 1 << 63 else value  # int32 -1 is sent as 10 bytes
            value = bool(value) if kind == "bool" else value
        out[name] = value
    return out


def read_model(path: Path, data: bytes | None = None) -> SentencePieceModel:
    """The model in SentencePiece model file `path` (data: its bytes, if already read).

    Raises Corrupt (a ValueError) naming the file when the bytes are not a SentencePiece model,
    and ValueError when the model is one this conversion cannot reproduce exactly."""
    data = path.read_bytes() if data is None else data
    try:
        top = _message(data, 0, {2: ("trainer", "msg", (b"", 0)), 3: ("normalizer", "msg", (b"", 0))},
                       repeated={1: ("pieces", _PIECE)})
        trainer, normalizer = _message(*top["trainer"], _TRAINER), _message(*top["normalizer"], _NORMALIZER)
        pieces = [Piece(**p) for p in top["pieces"]]
        _check(pieces, trainer)
    except Corrupt as e:
        raise Corrupt(f"{path}: not a SentencePiece model ({e}); pass a tokenizer.model file as "
                      f"Llama / Mistral / Gemma checkpoints ship it, or a HF tokenizer.json") from None
    model = SentencePieceModel(path, pieces, trainer, normalizer)
    if model.model_type not in ("BPE", "UNIGRAM"):
        raise ValueError(f"{path}: SentencePiece model type {model.model_type} is not supported (only BPE "
                         f"and UNIGRAM models convert to a HF tokenizer); use a BPE or Unigram tokenizer")
    for key, bad in (("treat_whitespace_as_suffix", True), ("escape_whitespaces", False)):
        if {**trainer, **normalizer}[key] == bad:
            raise ValueError(f"{path}: SentencePiece option {key}={str(bad).lower()} is not supported by the "
                             f"conversion to a HF tokenizer; use a model trained without it")
    return model


def _check(pieces: list[Piece], trainer: dict) -> None:
    """What SentencePiece itself checks on loading (model_interface.cc), so a file it would refuse
    is refused here too rather than converted into something half-working."""
    if not pieces:
        raise Corrupt("no pieces")
    seen = set()
    for i, p in enumerate(pieces):
        if not p.piece or not NORMAL <= p.type <= BYTE:
            raise Corrupt(f"piece {i} is empty or has an unknown type {p.type}")
        if p.piece in seen:
            raise Corrupt(f"piece {p.piece!r} appears twice")
        seen.add(p.piece)
    if sum(p.type == UNKNOWN for p in pieces) != 1:
        raise Corrupt("there must be exactly one unknown piece")
    byte_pieces = {p.piece for p in pieces if p.type == BYTE}
    if byte_pieces and not trainer["byte_fallback"]:
        raise Corrupt("byte pieces, but byte_fallback is not set")
    if trainer["byte_fallback"] and byte_pieces != {f"<0x{b:02X}>" for b in range(256)}:
        raise Corrupt("byte_fallback is set, but the byte pieces are not <0x00>..<0xFF>")


def _merges(pieces: list[Piece]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule: each normal piece of two or more characters
    is the merge of any split into two normal pieces, ranked by the piece's score (higher first;
    equal scores by id). User-defined pieces never merge in SentencePiece, nor do reserved ones."""
    normal = {p.piece for p in pieces if p.type == NORMAL}
    order = sorted((i for i, p in enumerate(pieces) if p.type == NORMAL and len(p.piece) > 1),
                   key=lambda i: (-pieces[i].score, i))
    merges = []
    for i in order:
        text = pieces[i].piece
        merges.extend((text[:k], text[k:]) for k in range(1, len(text)) if text[:k] in normal and text[k:] in normal)
    return merges


def to_hf_json(model: SentencePieceModel) -> str:
    """The tokenizer.json text of a HF tokenizer giving `model`'s ids (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pieces, norm = model.pieces, model.normalizer
    fallback = model.trainer["byte_fallback"]
    unk_id = next(i for i, p in enumerate(pieces) if p.type == UNKNOWN)
    user_defined = sorted((p.piece for p in pieces if p.type == USER_DEFINED), key=len, reverse=True)
    if model.model_type == "BPE":
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        # ignore_merges: a user-defined piece, isolated by the pre-tokenizer below, is taken whole.
        tok = Tokenizer(models.BPE(vocab, _merges(pieces), unk_token=pieces[unk_id].piece, fuse_unk=True,
                                   byte_fallback=fallback, ignore_merges=bool(user_defined)))
        if user_defined:
            # SentencePiece's BPE takes user-defined pieces whole (longest first) and merges nothing
            # across them; each character is written \x{...} so no piece reads as regex syntax.
            pattern = "|".join("".join(f"\\x{{{ord(c):X}}}" for c in piece) for piece in user_defined)
            tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), "isolated")
    else:
        tok = Tokenizer(models.Unigram(_unigram_vocab(pieces), unk_id, fallback))

    steps = [normalizers.Precompiled(norm["precompiled_charsmap"])] if norm["precompiled_charsmap"] else []
    if norm["remove_extra_whitespaces"]:
        # SentencePiece strips trailing "▁" after escaping, so a literal "▁" at the end goes too.
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(f"[ {SPACE}]+\\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    steps += [normalizers.Prepend(SPACE)] if norm["add_dummy_prefix"] else []  # Prepend leaves "" alone
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])

    # An unknown piece prints as SentencePiece's unk_surface (" ⁇ "), before "▁" becomes " ".
    steps = [decoders.Replace(pieces[unk_id].piece, model.trainer["unk_surface"]), decoders.Replace(SPACE, " ")]
    steps += [decoders.ByteFallback()] if fallback else []
    steps.append(decoders.Fuse())
    if norm["add_dummy_prefix"] or norm["remove_extra_whitespaces"]:
        steps.append(decoders.Strip(" ", 1, 0))  # SentencePiece drops one leading "▁" in these cases
    tok.decoder = decoders.Sequence(steps)

    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (CONTROL, UNKNOWN)])
    return tok.to_str()


def _unigram_vocab(pieces: list[Piece]) -> list[tuple[str, float]]:
    """(piece, score) with the scores SentencePiece's Viterbi search uses (unigram_model.cc)."""
    normal = [p.score for p in pieces if p.type == NORMAL] or [0.0]
    # User-defined pieces get a bonus so that one always wins over the pieces that spell it; the
    # max there starts at FLT_MIN, so with all scores negative the bonus is about -0.1.
    top = max(max(normal), FLT_MIN)
    # Control, unknown, byte and unused pieces are not in SentencePiece's search at all. HF's
    # matches every vocabulary entry, so they get a score that loses to any other way of covering
    # their text: at most one normal piece per character, each scoring at least the lowest score.
    reserved = (max(len(p.piece) for p in pieces) + 1) * (min(min(normal), 0.0) - 10.0)
    return [(p.piece, p.score if p.type == NORMAL else
             len(p.piece.encode("utf-8")) * top - 0.1 if p.type == USER_DEFINED else reserved) for p in pieces]
