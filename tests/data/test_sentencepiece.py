"""SentencePiece tokenizer.model files as tokenizers: small models trained here by sentencepiece
itself on CPython's standard library, converted by mamba.data.sentencepiece, and every encoding
checked id for id against sentencepiece's own encoder, on real source files and on text that
exercises its corners (non-ASCII and unseen characters, runs of spaces, tabs and newlines, the
names of its special pieces)."""
import hashlib
import json
import re
import shutil
import sysconfig
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from mamba import layout
from mamba.data.pack import pack
from mamba.data.tokenizer import load_tokenizer, write_tokenizer_files

spm = pytest.importorskip("sentencepiece")  # the reference; the conversion itself needs only `tokenizers`

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# The standard library's own sources (not the third-party packages installed beside them).
SOURCES = [p for p in sorted(STDLIB.rglob("*.py")) if not any(d.endswith("-packages") for d in p.parts)]


def utf8(paths: list[Path]) -> list[Path]:
    """The files that are UTF-8 (a few of the test suite's are deliberately not)."""
    def ok(path):
        try:
            path.read_bytes().decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False
    return [p for p in paths if ok(p)]


DOCS = [p.read_text(encoding="utf-8") for p in utf8(SOURCES[::10])]
# Characters no model here has seen (so byte pieces or <unk>), whitespace that normalization
# rewrites, SentencePiece's own piece names written as text, and empty / blank documents.
CORNERS = [
    "naïve café — “quoted” ½ Straße ☕ 中文 日本語 한국어 😀 Ελληνικά русский",
    "  leading\t\ttabs  and   runs of  spaces\n\n\n   trailing   \n",
    "a\r\nb\rc\x0bd\x0ce\u00a0f\u3000g",
    "<s> </s> <unk> <pad> <0x41> <sep>def<ctl> \u2581\u2581x\u2581",
    "def f(x):\n\treturn x  # def\n",
    "", " ", "\n\n", "x",
]
TEXTS = DOCS + CORNERS

# Trainer options per model; each is trained once for the module.
MODELS = {
    # Llama-2 / Mistral style: BPE, bytes for unseen characters, text not normalized, spaces kept.
    "bpe_llama": dict(model_type="bpe", vocab_size=1000, byte_fallback=True, normalization_rule_name="identity",
                      remove_extra_whitespaces=False, split_digits=True),
    # SentencePiece's defaults (NFKC, extra spaces removed, <unk> for unseen characters), with
    # user-defined pieces (taken whole, even inside words) and a control piece.
    "bpe_nfkc_symbols": dict(model_type="bpe", vocab_size=800, user_defined_symbols=["<sep>", "def"],
                             control_symbols=["<ctl>"]),
    # T5 style: Unigram with the defaults, and a pad piece.
    "unigram": dict(model_type="unigram", vocab_size=1000, pad_id=3),
    # Unigram with byte fallback, no normalization, no dummy prefix, a user-defined piece.
    "unigram_bytes": dict(model_type="unigram", vocab_size=1500, byte_fallback=True, normalization_rule_name="identity",
                          remove_extra_whitespaces=False, add_dummy_prefix=False, user_defined_symbols=["<sep>"]),
}


def train(out: Path, name: str, **options) -> Path:
    corpus = out / "corpus.txt"
    if not corpus.exists():  # ~300 kB of other stdlib modules than most of DOCS
        corpus.write_text("".join(p.read_text(encoding="utf-8") for p in utf8(SOURCES[3::40]))[:300_000])
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / name), minloglevel=2,
                                   max_sentence_length=100_000, num_threads=1, **options)
    return out / f"{name}.model"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("spm")
    return {name: train(out, name, **options) for name, options in MODELS.items()}


def reference(path: Path):
    return spm.SentencePieceProcessor(model_file=str(path))


def assert_same_or_equal_score(sp, ours: list[list[int]], theirs: list[list[int]], unigram: bool) -> None:
    """ids equal, text by text; for Unigram also allowed: another segmentation of the same text with
    exactly the same total score (SentencePiece sums scores in 32-bit floats, so which of two tied
    paths it keeps depends on rounding; see mamba.data.sentencepiece). Ties stay rare."""
    ties = 0
    for text, a, b in zip(TEXTS, ours, theirs):
        if a == b:
            continue
        assert unigram, f"ids differ on {text[:60]!r}"
        pieces = ["".join(map(sp.id_to_piece, ids)) for ids in (a, b)]
        scores = [sum(Fraction(sp.get_score(i)) for i in ids) for ids in (a, b)]
        assert pieces[0] == pieces[1] and scores[0] == scores[1], f"ids differ on {text[:60]!r}, not a tie"
        ties += 1
    assert ties <= len(TEXTS) // 100


@pytest.mark.parametrize("name", MODELS)
def test_encode_and_decode_match_sentencepiece(models, name):
    sp, tok = reference(models[name]), load_tokenizer(str(models[name]))
    theirs = sp.encode(TEXTS)  # no BOS / EOS: SentencePieceProcessor adds none unless asked
    assert_same_or_equal_score(sp, tok.encode_batch(TEXTS), theirs, unigram=name.startswith("unigram"))
    for text, ids in zip(TEXTS, theirs):
        assert tok.decode(ids) == sp.decode(ids), text[:60]
    unseen = theirs[TEXTS.index(CORNERS[0])]  # the model's way with characters it has no piece for
    if MODELS[name].get("byte_fallback"):
        assert sum(map(sp.is_byte, unseen)) >= len("中文日本語한국어😀".encode("utf-8"))
    else:
        assert sp.unk_id() in unseen and " \u2047 " in tok.decode(unseen)  # " ⁇ ", SentencePiece's <unk>
    # The piece names in a text are text: no special id comes out of them.
    names = theirs[TEXTS.index(CORNERS[3])]
    assert not {i for i in range(sp.get_piece_size()) if sp.is_control(i)} & set(names)
    if "<sep>" in MODELS[name].get("user_defined_symbols", []):
        assert sp.piece_to_id("<sep>") in names


@pytest.mark.parametrize("name", MODELS)
def test_special_ids_are_the_models_own(models, name):
    sp, tok = reference(models[name]), load_tokenizer(str(models[name]))
    expected = {key: i for key, i in [("eos", sp.eos_id()), ("bos", sp.bos_id()), ("pad", sp.pad_id()),
                                      ("unk", sp.unk_id())] if i >= 0}
    assert tok.special_tokens == expected and (tok.eos_id, tok.bos_id) == (sp.eos_id(), sp.bos_id())
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.identity["kind"] == "sentencepiece"
    assert tok.identity["sha256"] == hashlib.sha256(models[name].read_bytes()).hexdigest()
    if name == "unigram":
        assert "pad" in tok.special_tokens


def test_a_directory_with_tokenizer_model_and_what_overrides_its_specials(models, tmp_path):
    sp = reference(models["bpe_nfkc_symbols"])
    d = tmp_path / "llama"
    d.mkdir()
    shutil.copyfile(models["bpe_nfkc_symbols"], d / "tokenizer.model")
    tok = load_tokenizer(str(d))
    assert (tok.identity["name"], tok.identity["path"]) == ("tokenizer.model", str((d / "tokenizer.model").resolve()))
    assert tok.encode_batch(DOCS[:5]) == sp.encode(DOCS[:5])
    # --eos, then tokenizer_config.json, take precedence over the model's own </s>.
    assert load_tokenizer(str(d), eos="<ctl>").eos_id == sp.piece_to_id("<ctl>")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<ctl>", "bos_token": {"content": "</s>"}}))
    tok = load_tokenizer(str(d))
    assert (tok.eos_id, tok.bos_id) == (sp.piece_to_id("<ctl>"), sp.eos_id())
    # A model file under another name is recognised by its content.
    shutil.copyfile(models["bpe_nfkc_symbols"], tmp_path / "spm.bin")
    assert load_tokenizer(str(tmp_path / "spm.bin")).encode_batch(DOCS[:3]) == sp.encode(DOCS[:3])
    # A directory that also has a tokenizer.json uses that.
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer.json").write_bytes(tok.json_bytes)
    assert load_tokenizer(str(d)).identity["kind"] == "hf"


@pytest.mark.parametrize("model_type", ["word", "char"])
def test_word_and_char_models_are_refused(tmp_path, model_type):
    path = train(tmp_path, model_type, model_type=model_type, vocab_size=500)
    with pytest.raises(ValueError, match=re.escape(f"{path}: SentencePiece model type {model_type.upper()} "
                                                   f"is not supported")):
        load_tokenizer(str(path))


def test_a_corrupt_model_is_refused_naming_the_file(models, tmp_path):
    truncated = tmp_path / "tokenizer.model"
    truncated.write_bytes(models["bpe_llama"].read_bytes()[:3000])
    text = tmp_path / "notes.model"
    text.write_text(DOCS[0])
    for path in (truncated, text):
        with pytest.raises(ValueError, match=re.escape(f"{path}: not a SentencePiece model (")):
            load_tokenizer(str(path))
    with pytest.raises(ValueError, match=re.escape(f"{truncated}: not a SentencePiece model (")):
        load_tokenizer(str(tmp_path))  # the directory holds only that file


@pytest.mark.parametrize("name", ["bpe_llama", "unigram"])
def test_packed_documents_are_sentencepieces_own_ids(models, tmp_path, name):
    """pack with a tokenizer.model: each packed document is, token for token, sentencepiece's
    encoding of the file plus </s>; the tokenizer.json written beside the shards encodes the same
    and exports for transformers' AutoTokenizer with the model's special tokens."""
    from transformers import AutoTokenizer

    files = [p for p in utf8(SOURCES[5::60]) if p.stat().st_size]  # pack skips empty files
    sp = reference(models[name])
    manifest = pack(files, tmp_path / "o", tokenizer=str(models[name]), shard_tokens=20_000)
    assert len(manifest["shards"]) > 2 and manifest["tokenizer"]["kind"] == "sentencepiece"
    assert manifest["special_tokens"]["eos"] == sp.eos_id()
    words = np.concatenate([np.load(tmp_path / "o" / s["file"]) for s in manifest["shards"]])
    ids, positions, _ = layout.decode(words)
    docs = [d.tolist() for d in np.split(ids, np.flatnonzero(positions == 0)[1:])]
    texts = [p.read_bytes().decode("utf-8") for p in files]
    expected = [e + [sp.eos_id()] for e in sp.encode(texts)]
    if name == "bpe_llama":
        assert docs == expected
    else:
        assert len(docs) == len(texts) and [d[-1] for d in docs] == [sp.eos_id()] * len(docs)
        assert_same_or_equal_score(sp, [d[:-1] for d in docs], [e[:-1] for e in expected], unigram=True)
    packed = load_tokenizer(str(tmp_path / "o"))  # the converted tokenizer.json, as generation loads it
    assert packed.encode_batch(texts) == [d[:-1] for d in docs]
    export = tmp_path / "hf"
    export.mkdir()
    ids = write_tokenizer_files(tmp_path / "o", export)
    assert ids == {"eos": sp.eos_id(), "bos": sp.bos_id(), "pad": sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()}
    hf = AutoTokenizer.from_pretrained(export)
    assert hf.unk_token_id == sp.unk_id()
    assert [hf(t, add_special_tokens=False).input_ids for t in texts[:4]] == [d[:-1] for d in docs[:4]]
