"""Tokenizers behind one small interface, so packing and generation do not care which kind is used.

Kinds, chosen by a spec string:

    "byte"          built in: ids 0..255 are the UTF-8 bytes, then the special tokens below
    "bpe:N"         train a byte-level BPE of N entries on the input texts (HF `tokenizers`) and
                    save it as save_dir/tokenizer.json
    path            a HF tokenizer.json, or a directory holding one; a tokenizer_config.json beside
                    it names the BOS and EOS tokens (bos_token, eos_token), else the usual names
                    in SPECIAL_CANDIDATES are looked for
    path            a SentencePiece tokenizer.model (Llama-2, Mistral, Gemma; any file with a .model
                    suffix or that is not JSON), or a directory holding one and no tokenizer.json:
                    converted to a HF tokenizer with the same ids by mamba.data.sentencepiece (its
                    tokenizer.json is what pack writes beside the shards). BOS, EOS, pad and unk are
                    the model's own (<s>, </s>, ...); a tokenizer_config.json beside it and --eos
                    still take precedence

Every tokenizer offers encode_batch(texts) -> list of id lists, decode(ids) -> str, vocab_size,
eos_id and identity (a dict recorded in the packed dataset's index.json, so a checkpoint can be
matched with the exact tokenizer that produced its data).

write_tokenizer_files puts a tokenizer.json beside a HF model export with the two small files
`transformers.AutoTokenizer` needs (mamba.runs.export calls it).

Ids must fit the 16-bit token field of mamba.layout, so vocabularies above 65,536 are refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from mamba import layout
from mamba.files import write_atomic

CONFIG_NAME = "tokenizer_config.json"  # HF's file naming a tokenizer's special tokens
SENTENCEPIECE_NAME = "tokenizer.model"  # the name SentencePiece models ship under
EOS_TOKEN = "<|endoftext|>"
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
# Names tried, in order, to find each special token of a tokenizer.json; the manifest records the
# ids found under these keys (mamba.data.fim reads the fim_* ones).
SPECIAL_CANDIDATES = {
    "eos": (EOS_TOKEN, "</s>", "<eos>", "[EOS]", "<|end_of_text|>"),
    "bos": ("<|bos|>", "<s>", "<bos>", "[BOS]", "<|begin_of_text|>"),
    "pad": ("<|pad|>", "<pad>", "<|padding|>", "[PAD]"),
    "fim_prefix": (FIM_TOKENS[0], "<fim_prefix>", "<fim-prefix>", "<PRE>"),
    "fim_middle": (FIM_TOKENS[1], "<fim_middle>", "<fim-middle>", "<MID>"),
    "fim_suffix": (FIM_TOKENS[2], "<fim_suffix>", "<fim-suffix>", "<SUF>"),
}
EOS_CANDIDATES = SPECIAL_CANDIDATES["eos"]
# Special tokens of the byte tokenizer; their ids follow the 256 byte values.
BYTE_SPECIALS = (EOS_TOKEN, "<|bos|>", "<|pad|>") + FIM_TOKENS
# Specials a bpe:N tokenizer is trained with (ids 0..5, in this order).
BPE_SPECIALS = (EOS_TOKEN, "<|bos|>", "<|pad|>") + FIM_TOKENS


def _check_vocab_size(size: int, what: str) -> None:
    if size > layout.MAX_VOCAB_SIZE:
        raise ValueError(
            f"{what}: vocabulary of {size} entries exceeds the limit of {layout.MAX_VOCAB_SIZE} "
            f"that the packed layout's {layout.TOKEN_BITS}-bit token field can hold"
        )


class ByteTokenizer:
    """UTF-8 bytes as tokens: no training, no files, exact round trip for any text."""

    def __init__(self):
        self.vocab_size = 256 + len(BYTE_SPECIALS)
        self.special_tokens = {key: 256 + BYTE_SPECIALS.index(SPECIAL_CANDIDATES[key][0]) for key in SPECIAL_CANDIDATES}
        self.eos_id = self.special_tokens["eos"]
        self.bos_id = self.special_tokens["bos"]
        self.identity = {"kind": "byte", "name": "byte", "sha256": "byte-v1", "vocab_size": self.vocab_size}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Special-token names inside a text are plain bytes here, never the special ids.
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: list[int]) -> str:
        """Bytes are joined and decoded (invalid UTF-8 becomes U+FFFD); specials print their names.

        Ids past the vocabulary (a model's padding rows) decode to nothing, as in HF tokenizers.
        """
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            elif i < self.vocab_size:
                out.append(run.decode("utf-8", errors="replace"))
                run.clear()
                out.append(BYTE_SPECIALS[i - 256])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A HF `tokenizers.Tokenizer` loaded from a tokenizer.json file, or from `converted`: the
    tokenizer.json text made from `path` (a SentencePiece model).

    Texts are encoded without the tokenizer's post-processor (no BOS/EOS added: packing appends
    EOS itself) and with special-token names in the text treated as plain text, so a file that
    happens to contain "<|endoftext|>" does not end its document early.
    """

    def __init__(self, path: Path, kind: str, name: str, eos: str | None = None, declared: dict | None = None,
                 converted: bytes | None = None):
        from tokenizers import Tokenizer

        self.path = path
        data = path.read_bytes()  # the identity's sha256 is the source file's
        # json_bytes: what pack writes as the packed data's tokenizer.json (the exact file, or the
        # conversion, which later loads as a plain tokenizer.json for generation and export).
        self.json_bytes = data if converted is None else converted
        try:
            self._tok = Tokenizer.from_str(self.json_bytes.decode("utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a HF tokenizer.json ({e})") from None
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Ids can have holes, so the size that matters is the largest id + 1.
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        _check_vocab_size(self.vocab_size, str(path))
        # declared: {"bos"/"eos": name} from tokenizer_config.json (declared_specials); --eos wins.
        declared = dict(declared or {})
        for key, token in declared.items():
            if token not in vocab:
                raise ValueError(f"{path.parent / CONFIG_NAME}: {key}_token {token!r} is not in the vocabulary of "
                                 f"{path}; correct it there (or remove the key to use the usual names)")
        eos = eos if eos is not None else declared.get("eos")
        names = (eos,) if eos is not None else EOS_CANDIDATES
        found = [n for n in names if n in vocab]
        if not found:
            raise ValueError(
                f"{path}: no end-of-document token found (looked for {', '.join(names)}); "
                f"pass the name of the tokenizer's EOS token with --eos"
            )
        self.eos_id = vocab[found[0]]
        # Each special found by its usual names (the EOS as chosen above).
        self.special_tokens = {"eos": self.eos_id}
        for key, candidates in SPECIAL_CANDIDATES.items():
            hit = declared.get(key) or next((n for n in candidates if n in vocab), None)
            if key != "eos" and hit is not None:
                self.special_tokens[key] = vocab[hit]
        self.bos_id = self.special_tokens.get("bos")
        self.identity = {
            "kind": kind,
            "name": name,
            "path": str(path),
            "sha256": hashlib.sha256(data).hexdigest(),
            "vocab_size": self.vocab_size,
        }

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking and spreads the batch over all cores.
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def declared_specials(config: Path) -> dict[str, str]:
    """{"bos"/"eos": token name} as tokenizer_config.json `config` declares them ({} without the
    file); a value may be a string or an AddedToken dict ({"content": ...}), null means none."""
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config}: not a readable tokenizer_config.json ({e})") from None
    declared = {}
    for key in ("bos", "eos"):
        value = data.get(f"{key}_token") if isinstance(data, dict) else None
        token = value.get("content") if isinstance(value, dict) else value
        if token is not None and not isinstance(token, str):
            raise ValueError(f"{config}: {key}_token must be a token name (or {{\"content\": name}}), got {value!r}")
        if token:
            declared[key] = token
    return declared


def train_bpe(vocab_size: int, texts: Iterable[str], save_path: Path) -> None:
    """Train a byte-level BPE with BPE_SPECIALS (EOS, BOS, pad, FIM sentinels) as ids 0..5.

    The trainer starts from all 256 byte symbols, so any text (even bytes absent from the training
    texts) encodes and decodes back exactly. The file is written to a temporary name in the same
    directory and renamed, so save_path is either absent or complete.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(BPE_SPECIALS)
    if vocab_size < minimum:
        raise ValueError(f"bpe:{vocab_size}: a byte-level BPE needs at least {minimum} entries "
                         f"(256 bytes + {len(BPE_SPECIALS)} special tokens)")
    _check_vocab_size(vocab_size, f"bpe:{vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(save_path, lambda f: f.write(tok.to_str(pretty=True).encode("utf-8")))  # = tok.save's bytes


def load_tokenizer(spec: str, inputs_for_training: Iterable[str] | None = None,
                   save_dir: str | os.PathLike | None = None, eos: str | None = None):
    """Return a ByteTokenizer or HFTokenizer for `spec` (see the module docstring).

    inputs_for_training: the texts a "bpe:N" spec is trained on (any iterable of str, read once).
    save_dir: where "bpe:N" writes tokenizer.json. eos: the EOS token's name in a foreign
    tokenizer.json whose EOS is not one of EOS_CANDIDATES.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise ValueError(f"tokenizer spec {spec!r}: expected bpe:N with N an integer vocabulary size") from None
        if inputs_for_training is None or save_dir is None:
            raise ValueError(f"tokenizer spec {spec!r} trains a new tokenizer: it needs input texts and a save_dir")
        path = Path(save_dir) / "tokenizer.json"
        train_bpe(size, inputs_for_training, path)
        return HFTokenizer(path, kind="bpe", name=spec)
    path = Path(spec)
    if path.is_dir():  # its tokenizer.json if it has one, else its tokenizer.model
        json_path, model_path = path / "tokenizer.json", path / SENTENCEPIECE_NAME
        path = model_path if not json_path.is_file() and model_path.is_file() else json_path
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer spec {spec!r}: {path} does not exist; use 'byte', 'bpe:N' or a path to a "
            f"HF tokenizer.json or a SentencePiece tokenizer.model (or a directory holding one)"
        )
    declared = declared_specials(path.parent / CONFIG_NAME)
    if _is_sentencepiece(path):
        return _sentencepiece_tokenizer(path.resolve(), eos, declared)
    return HFTokenizer(path.resolve(), kind="hf", name=path.name, eos=eos, declared=declared)


def _is_sentencepiece(path: Path) -> bool:
    """Whether to read `path` as a SentencePiece model: by its suffix (.model or .json), else by
    its content: a tokenizer.json is a JSON object, "{" first; a model is a protobuf, whose first
    byte is a field's key ("{" would be field 15 as a group, which the format does not have)."""
    if path.suffix in (".model", ".json"):
        return path.suffix == ".model"
    with open(path, "rb") as f:
        return not f.read(64).lstrip().startswith(b"{")


def _sentencepiece_tokenizer(path: Path, eos: str | None, declared: dict[str, str]) -> HFTokenizer:
    """The HF tokenizer converted from SentencePiece model `path`, with the model's own BOS, EOS and
    pad (tokenizer_config.json's `declared` names and --eos still take precedence) and its unk."""
    from mamba.data import sentencepiece

    model = sentencepiece.read_model(path)
    ids = model.special_ids()
    own = {key: model.pieces[i].piece for key, i in ids.items() if key != "unk"}
    tok = HFTokenizer(path, kind="sentencepiece", name=path.name, eos=eos, declared={**own, **declared},
                      converted=sentencepiece.to_hf_json(model).encode("utf-8"))
    if "unk" in ids:
        tok.special_tokens["unk"] = ids["unk"]
    return tok


def write_tokenizer_files(tokenizer_path: Path, out: Path) -> dict[str, int | None]:
    """Copy tokenizer.json into `out` and describe it for AutoTokenizer: its EOS, and its own BOS,
    pad and unknown tokens where it has them (else the EOS, as GPT-2's files do). Returns the ids
    {eos, bos, pad} so named (None without an EOS), for the model's config.json."""
    from tokenizers import Tokenizer

    src = tokenizer_path / "tokenizer.json" if tokenizer_path.is_dir() else tokenizer_path
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer_path}: no tokenizer.json there")
    shutil.copyfile(src, out / "tokenizer.json")
    tok = Tokenizer.from_file(str(src))

    def own(key: str) -> str | None:
        return next((n for n in SPECIAL_CANDIDATES[key] if tok.token_to_id(n) is not None), None)

    model = json.loads(src.read_text(encoding="utf-8"))["model"]
    # BPE, WordPiece and WordLevel name their unknown token; Unigram (SentencePiece) gives its id.
    unk = model.get("unk_token") or (model["vocab"][model["unk_id"]][0] if model.get("unk_id") is not None else None)
    eos = own("eos")
    names = {"eos": eos, "bos": own("bos") or eos, "pad": own("pad") or eos, "unk": unk or eos}
    special = {f"{key}_token": name for key, name in names.items() if name is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
         "model_input_names": ["input_ids", "attention_mask"], **special},  # Mamba takes no token_type_ids
        indent=2) + "\n")
    return {key: None if names[key] is None else tok.token_to_id(names[key]) for key in ("eos", "bos", "pad")}
