"""Real-size vocabularies through the pack tool, built offline (no hub access on CI machines):

- GPT-NeoX-like, 50,280 entries (Mamba's): byte-level BPE with <|endoftext|> = 0, <|padding|> = 1
- Falcon-like, 65,024 entries (the default config's): byte-level BPE with 11 specials before
  <|endoftext|> = 11
- Llama-like SentencePiece, 32,000 entries: Unigram with byte fallback, <unk> <s> </s> = 0 1 2

Each is a BPE/Unigram trained or written here on stdlib text, then filled to the exact size
(BPE: extra model entries, then one ordinary added token as the highest id, the way GPT-NeoX's
top ids are added tokens), so the highest id (up to 65,023) is a real, encodable token that must
come back exactly through the 16-bit token field. (Adding tens of thousands of added tokens one
by one takes minutes in `tokenizers`, so the filler goes into the model's vocabulary instead.)
"""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mamba import layout
from mamba.data.pack import pack
from mamba.data.tokenizer import load_tokenizer, write_tokenizer_files

TEXTS = [p.read_text(encoding="utf-8") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40:4]]


def _top_up(tok, size: int):
    """Fill the model vocabulary with entries no merge produces up to size - 1, then add one
    ordinary added token <|extra_{size - 1}|> as the highest id. Returns the new Tokenizer."""
    from tokenizers import AddedToken, Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), size - 1):
        vocab[f"<|filler_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens([AddedToken(f"<|extra_{size - 1}|>", special=False)])
    assert tok.get_vocab_size(with_added_tokens=True) == size
    return tok


def byte_bpe(path: Path, size: int, specials: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=1500, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    _top_up(tok, size).save(str(path))
    return path


def llama_unigram(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    words = sorted({w for t in TEXTS for w in t.split()})[:20_000]
    pieces += [("▁", -2.0)] + [(f"▁{w}", -5.0 - len(w)) for w in words] + [(c, -8.0) for c in sorted(set("".join(TEXTS)))
                                                                        if not c.isspace()]
    pieces = list(dict(pieces).items())
    pieces += [(f"▁filler{i}", -30.0) for i in range(len(pieces), 32_000)]  # named by their ids
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    assert tok.get_vocab_size(with_added_tokens=True) == 32_000
    tok.save(str(path))
    return path


def _hf_special_ids(tok_path: Path, tmp_path: Path) -> tuple[dict, tuple]:
    """write_tokenizer_files' ids for config.json, and (eos, bos, pad, unk) ids as AutoTokenizer
    reads them from the files a HF export ships."""
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    out.mkdir()
    ids = write_tokenizer_files(tok_path, out)
    hf = AutoTokenizer.from_pretrained(out)
    return ids, (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id, hf.unk_token_id)


def _pack_and_check(tok_path: Path, tmp_path: Path, top_text: str, add_bos=False):
    docs = TEXTS[:3] + [f"tail {top_text} end\n"]
    for i, text in enumerate(docs):
        (tmp_path / f"d{i}.txt").write_text(text)
    m = pack(sorted(tmp_path.glob("d*.txt")), tmp_path / "o", tokenizer=str(tok_path.parent), add_bos=add_bos,
             shard_tokens=5_000)
    tok = load_tokenizer(str(tmp_path / "o"))
    words = np.concatenate([np.load(tmp_path / "o" / s["file"]) for s in m["shards"]])
    ids, positions, _ = layout.decode(words)
    starts = np.flatnonzero(positions == 0)
    head = int(add_bos)
    decoded = [tok.decode(d[head:-1].tolist()) for d in np.split(ids, starts[1:])]
    assert decoded == docs
    return m, tok, ids


@pytest.mark.parametrize("size,specials,eos_id", [
    (50_280, ["<|endoftext|>", "<|padding|>"], 0),
    (65_024, [f">>SPECIAL{i}<<" for i in range(11)] + ["<|endoftext|>"], 11),
])
def test_byte_level_bpe_full_size(tmp_path, size, specials, eos_id):
    (tmp_path / "tok").mkdir()
    path = byte_bpe(tmp_path / "tok" / "tokenizer.json", size, specials)
    m, tok, ids = _pack_and_check(path, tmp_path, f"<|extra_{size - 1}|>")
    assert tok.vocab_size == m["tokenizer"]["vocab_size"] == size
    assert m["special_tokens"]["eos"] == eos_id
    assert ids.max() == size - 1 and m["shards"][-1]["max_token_id"] == size - 1  # the top id survives 16 bits
    if size == 50_280:
        assert m["special_tokens"]["pad"] == 1
        # GPT-NeoX's files: its own pad; no BOS and no unknown token (byte level), so EOS there.
        assert _hf_special_ids(path, tmp_path) == ({"eos": 0, "bos": 0, "pad": 1}, (0, 0, 1, 0))


def test_sentencepiece_llama_32000(tmp_path):
    (tmp_path / "tok").mkdir()
    path = llama_unigram(tmp_path / "tok" / "tokenizer.json")
    m, tok, ids = _pack_and_check(path, tmp_path, "naïve ☕ 中文 filler31999", add_bos=True)
    assert (tok.vocab_size, m["special_tokens"]) == (32_000, {"eos": 2, "bos": 1})
    assert ids[0] == 1 and 31_999 in ids  # BOS first; the last piece is used
    assert any(3 <= i < 259 for i in ids)  # byte fallback pieces for characters not in the vocabulary
    # Llama's files: its own <s> and <unk> (Unigram's unk_id); no pad token, so EOS there.
    assert _hf_special_ids(path, tmp_path) == ({"eos": 2, "bos": 1, "pad": 2}, (2, 1, 2, 0))


def test_vocab_limit_and_missing_bos(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>"))
    _top_up(tok, 65_537).save(str(tmp_path / "big.json"))
    with pytest.raises(ValueError, match=r"big\.json: vocabulary of 65537 entries exceeds the limit of 65536"):
        pack([tmp_path / "big.json"], tmp_path / "o", tokenizer=str(tmp_path / "big.json"))
    small = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>"))
    small.save(str(tmp_path / "small.json"))
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(ValueError, match="--bos needs a BOS token"):
        pack([tmp_path / "a.txt"], tmp_path / "o", tokenizer=str(tmp_path / "small.json"), add_bos=True)


def _docs(out: Path) -> list[np.ndarray]:
    """The token ids of each packed document in `out`."""
    m = json.loads((out / "index.json").read_text())
    ids, positions, _ = layout.decode(np.concatenate([np.load(out / s["file"]) for s in m["shards"]]))
    return np.split(ids, np.flatnonzero(positions == 0)[1:])


def test_tokenizer_config_declares_bos_and_eos(tmp_path):
    """A HF tokenizer directory's tokenizer_config.json names its BOS and EOS ("<s>", "</s>" here),
    over the usual names the vocabulary also holds (<|endoftext|>, <|bos|>); --bos, --no-eos and
    --eos still decide."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|bos|>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "add_bos_token": True}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    inputs = [str(p) for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40:8]]
    repo = Path(__file__).resolve().parents[2]

    def pack_cli(out: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "tools/pack.py", "--tokenizer", str(tok_dir), "--out",
                               str(tmp_path / out), "--quiet", *flags, *inputs], cwd=repo, capture_output=True,
                              text=True)

    assert pack_cli("bos", "--bos").returncode == 0
    m = json.loads((tmp_path / "bos" / "index.json").read_text())
    assert (m["special_tokens"]["bos"], m["special_tokens"]["eos"]) == (2, 3)
    docs = _docs(tmp_path / "bos")
    assert len(docs) == len(inputs) and all(d[0] == 2 and d[-1] == 3 and not {0, 1} & set(d.tolist()) for d in docs)
    assert pack_cli("no_eos", "--no-eos").returncode == 0
    assert all(d[0] != 2 and 3 not in d for d in _docs(tmp_path / "no_eos"))
    assert pack_cli("eos", "--eos", "<|endoftext|>").returncode == 0
    assert all(d[-1] == 0 for d in _docs(tmp_path / "eos"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|begin_of_text|>"}))
    run = pack_cli("bad", "--bos")
    assert run.returncode == 1 and (f"{tok_dir / 'tokenizer_config.json'}: bos_token '<|begin_of_text|>' is not in "
                                    f"the vocabulary of {tok_dir / 'tokenizer.json'}") in run.stderr, run.stderr
