"""`tools/pack.py inspect`: summary, a decoded window with boundaries and loss marks, --verify."""
import json
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mamba.data import inspect
from mamba.data.pack import pack

REPO = Path(__file__).resolve().parents[2]


def _packed(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    out = tmp_path / "o"
    pack([tmp_path / "a.txt", tmp_path / "b.jsonl"], out, tokenizer="byte", shard_tokens=20)
    return out


def test_window_shows_boundaries_and_loss(tmp_path):
    out = _packed(tmp_path)
    text = inspect.render_window(out, 0, 100)
    body = text.split("\n", 1)[1]
    assert body == ("\n⟦doc⟧first document\n<|endoftext|>"
                    "\n⟦doc⟧⟨no-loss:<|user|>\nhi\n<|assistant|>\n⟩hello\n<|endoftext|>")
    second = inspect.render_window(out, 1, 15)  # starts at document 0's EOS: no start mark there
    assert second.split("\n", 1)[1] == "<|endoftext|>\n⟦doc⟧⟨no-loss:<|user|>\nhi\n<|⟩"


def test_summary_and_verify(tmp_path):
    out = _packed(tmp_path)
    s = inspect.summary(out)
    assert "2 documents, 49 tokens in 3 shards" in s and "document length: min 16, median 24, mean 24.5, max 33" in s
    assert "loss bit on 46.9% of tokens" in s  # 16 + 7 (hello, newline, EOS) of 49
    assert "special tokens {'eos': 256" in s
    assert inspect.verify(out) == []
    shard = out / "shard_00001.npy"
    words = np.load(shard)
    words[3] ^= 1  # flip one bit of one token
    np.save(shard, words)
    [problem] = inspect.verify(out)
    assert "shard_00001.npy: sha256 differs" in problem


def test_verify_reports_each_bad_shard_like_the_loader(tmp_path):
    """--verify runs the loader's checks (mamba.data.manifest): a truncated and a missing shard
    are each reported, not raised."""
    out = _packed(tmp_path)
    shard = out / "shard_00000.npy"
    shard.write_bytes(shard.read_bytes()[:-4])
    (out / "shard_00002.npy").unlink()
    truncated, missing = inspect.verify(out)
    assert "shard_00000.npy: file is" in truncated and "truncated" in truncated
    assert "shard_00002.npy: shard listed in index.json is missing" in missing


def test_other_layout_version_refused(tmp_path):
    out = _packed(tmp_path)
    index = json.loads((out / "index.json").read_text())
    index["layout_version"] = 99
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="layout_version 99"):
        inspect.summary(out)


def test_cli(tmp_path):
    out = _packed(tmp_path)
    run = subprocess.run([sys.executable, "tools/pack.py", "inspect", str(out), "--window", "0", "--seq-len", "20",
                          "--verify"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "⟦doc⟧first document" in run.stdout and "every shard matches" in run.stdout
    (out / "shard_00002.npy").unlink()
    run = subprocess.run([sys.executable, "tools/pack.py", "inspect", str(out), "--verify"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr


def test_cli_window_prints_only_the_window(tmp_path):
    out = _packed(tmp_path)
    window = subprocess.run([sys.executable, "tools/pack.py", "inspect", str(out), "--window", "0", "--seq-len", "20"],
                            cwd=REPO, capture_output=True, text=True)
    assert window.returncode == 0 and window.stdout.startswith("window 0 = tokens [0, 20)")
    assert "dataset" not in window.stdout and "documents" not in window.stdout
    summary = subprocess.run([sys.executable, "tools/pack.py", "inspect", str(out)], cwd=REPO, capture_output=True,
                             text=True)
    assert summary.stdout.startswith(f"dataset {out}\n") and "⟦doc⟧" not in summary.stdout


def test_cli_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`inspect ... | head -1`: the reader stops after one line of ~1 MB of decoded stdlib text."""
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:20]
    pack(stdlib, tmp_path / "o", tokenizer="byte")
    proc = subprocess.Popen([sys.executable, "tools/pack.py", "inspect", str(tmp_path / "o"), "--window", "0",
                             "--seq-len", "1000000"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"window 0 = tokens [0, ")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    # Ended by SIGPIPE, as `yes | head -1` is (the shell shows 141), or exit 0; no traceback.
    assert proc.wait() in (0, -signal.SIGPIPE) and err == ""


def test_missing_directory_is_named_as_such(tmp_path):
    missing = subprocess.run([sys.executable, "tools/pack.py", "inspect", str(tmp_path / "nope")], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and f"{tmp_path / 'nope'}: no such directory" in missing.stderr
    assert "index.json" not in missing.stderr.split(";")[0] and "Traceback" not in missing.stderr
    empty = subprocess.run([sys.executable, "tools/pack.py", "inspect", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True)
    assert empty.returncode == 1 and f"{tmp_path / 'index.json'}: missing" in empty.stderr


def test_cli_names_a_truncated_shard(tmp_path):
    """numpy alone says "mmap length is greater than file size"; the user must learn which shard."""
    out = _packed(tmp_path)
    shard = out / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:-4])
    expected = f"{shard}: file is {shard.stat().st_size} bytes, but 20 tokens need {shard.stat().st_size + 4}; " \
               f"the shard is truncated"
    run = subprocess.run([sys.executable, "tools/pack.py", "inspect", str(out), "--verify"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 1 and f"FAILED {expected}" in run.stdout and "Traceback" not in run.stderr, run
    for extra in ([], ["--window", "1", "--seq-len", "20"]):
        run = subprocess.run([sys.executable, "tools/pack.py", "inspect", str(out), *extra], cwd=REPO,
                             capture_output=True, text=True)
        assert run.returncode == 1 and f"pack.py inspect: error: {expected}" in run.stderr, run
