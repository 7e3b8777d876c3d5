"""Fill-in-the-middle on windows of real text: permutation + sentinels, isolation, rates, errors."""
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mamba import layout
from mamba.data.dataset import PackedSource
from mamba.data.dataset import decode_windows
from mamba.data.fim import fim_window
from mamba.data.loader import MixtureStream
from mamba.data.pack import pack
from mamba.data.tokenizer import ByteTokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
_SPECIALS = ByteTokenizer().special_tokens  # the byte tokenizer's sentinels follow the 256 bytes
PRE, MID, SUF = _SPECIALS["fim_prefix"], _SPECIALS["fim_middle"], _SPECIALS["fim_suffix"]
EOS = _SPECIALS["eos"]


def tokenizer_without_sentinels(path: Path) -> Path:
    """A word-level tokenizer.json whose only special token is EOS (no FIM sentinels)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "[UNK]", "import", "json", "def", "return"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """CPython's json and email.mime packages (real documents of ~1,000..16,000 bytes), byte-tokenized."""
    out = tmp_path_factory.mktemp("fim") / "json"
    pack([STDLIB / "json", STDLIB / "email" / "mime"], out, shard_tokens=1 << 20)
    assert json.loads((out / "index.json").read_text())["special_tokens"]["fim_prefix"] == PRE
    return PackedSource(out, seq_len=4096)


def pieces(ids: np.ndarray, positions: np.ndarray) -> list[tuple[int, int]]:
    starts = [0] + [i for i in np.flatnonzero(positions == 0).tolist() if i > 0] + [len(ids)]
    return list(zip(starts[:-1], starts[1:]))


def undo(piece: list[int]) -> tuple[list[int], str]:
    """Invert one transformed piece: (original token order, "PSM" or "SPM"); asserts the form."""
    tail = piece[-1:] if piece[-1] == EOS else []
    body = piece[:len(piece) - len(tail)]
    assert body.count(PRE) == body.count(MID) == body.count(SUF) == 1 and body[0] == PRE
    s, m = body.index(SUF), body.index(MID)
    if s == 1:  # SPM: <PRE> <SUF> suffix <MID> prefix middle
        return body[m + 1:] + body[2:m] + tail, "SPM"
    return body[1:s] + body[m + 1:] + body[s + 1:m] + tail, "PSM"  # prefix middle suffix


def test_fim_pieces_are_permutations_plus_sentinels(source):
    starts = [(layout.decode(w)[1] == 0).sum() for w in source.read(np.arange(len(source)))]
    words = source.read([int(np.argmax(starts))])[0]  # the window holding the most documents
    ids, positions, loss = (np.asarray(a) for a in layout.decode(words.astype(np.int64)))
    # Give every 5th token loss bit 0 so we can see loss bits travel with their tokens.
    loss[::5] = False
    words = layout.encode(ids, positions, loss)
    old_pieces = pieces(ids, positions)
    assert len(old_pieces) >= 3  # several documents in the window: isolation is being tested
    modes = set()
    for sample in range(6):  # several draws, so both PSM and SPM occur
        out = fim_window(words, sample=sample, seed=3, rate=1.0, spm_rate=0.5, sentinels=(PRE, MID, SUF), eos_id=EOS)
        assert out.shape == words.shape and out.dtype == np.int32
        new_ids, new_pos, new_loss = (np.asarray(a) for a in layout.decode(out.astype(np.int64)))
        new_pieces = pieces(new_ids, new_pos)
        assert len(new_pieces) == len(old_pieces)  # no document start invented or lost
        shift = 0  # tokens added by the pieces before
        for (a, b), (c, d) in zip(old_pieces[:-1], new_pieces[:-1]):  # pieces ending inside the window
            assert c == a + shift
            if ids[a:b].tolist() == [EOS]:  # a lone EOS (the end of a document cut by the window start)
                assert new_ids[c:d].tolist() == [EOS]  # has nothing to reorder
                continue
            assert d - c == b - a + 3
            shift += 3
            original, mode = undo(new_ids[c:d].tolist())
            modes.add(mode)
            assert original == ids[a:b].tolist()
            # Positions restart at the original piece's first position and count up by one.
            assert new_pos[c:d].tolist() == list(range(positions[a], positions[a] + d - c))
            # The loss bits are a permutation of the originals plus three set bits for the sentinels.
            assert sorted(new_loss[c:d].tolist()) == sorted(loss[a:b].tolist() + [True] * 3)
            pairs = sorted(zip(new_ids[c:d].tolist(), new_loss[c:d].tolist()))
            sentinel_pairs = [(PRE, True), (MID, True), (SUF, True)]
            assert pairs == sorted(list(zip(ids[a:b].tolist(), loss[a:b].tolist())) + sentinel_pairs)
        # The window keeps its length: each earlier transformed piece grew by 3, so the last one starts
        # later and is cut at the window's end (the only tokens not trained on).
        assert new_pieces[-1][0] == old_pieces[-1][0] + shift
    assert modes == {"PSM", "SPM"}


def test_fim_rates_and_determinism(source):
    words = source.read(np.arange(len(source)))
    transformed, spm, total = 0, 0, 0
    for g in range(300):
        w = words[g % len(words)]
        out = fim_window(w, g, seed=1, rate=0.5, spm_rate=0.25, sentinels=(PRE, MID, SUF), eos_id=EOS)
        assert np.array_equal(out, fim_window(w, g, 1, 0.5, 0.25, (PRE, MID, SUF), EOS))
        ids, positions, _ = layout.decode(out.astype(np.int64))
        for c, d in pieces(ids, positions):
            if ids[c:d].tolist() == [EOS]:
                continue  # a lone EOS has nothing to reorder
            total += 1
            if PRE in ids[c:d]:
                transformed += 1
                spm += int(ids[c + 1] == SUF)
        assert np.array_equal(fim_window(w, g, 1, 0.0, 0.5, (PRE, MID, SUF), EOS), w)  # rate 0: untouched
    assert total >= 500
    assert abs(transformed / total - 0.5) < 0.06 and abs(spm / transformed - 0.25) < 0.06
    # Another sample index or seed draws differently.
    assert not np.array_equal(fim_window(words[0], 0, 1, 0.5, 0.5, (PRE, MID, SUF), EOS),
                              fim_window(words[0], 1, 1, 0.5, 0.5, (PRE, MID, SUF), EOS))


def test_stream_applies_fim_and_needs_sentinels(source, tmp_path):
    stream = MixtureStream([source], [1], batch_size=2, seed=0, shuffle=False, rank=0, world_size=1, fim_rate=1.0)
    batch = decode_windows(stream.batch(np.arange(2))["words"])
    assert (batch["input_ids"] == PRE).any() and (batch["labels"] == MID).any()
    assert batch["input_ids"].shape == (2, 4096)
    plain = tmp_path / "plain"
    pack([STDLIB / "json" / "tool.py"], plain, tokenizer=str(tokenizer_without_sentinels(tmp_path / "words.json")))
    with pytest.raises(ValueError, match=r"plain/index.json: data.fim_rate > 0 needs the tokenizer's FIM sentinel"):
        MixtureStream([PackedSource(plain, 64)], [1], 2, 0, False, 0, 1, fim_rate=0.1)
