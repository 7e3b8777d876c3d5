"""Packing on many machines: `--part I/N` packs a share of the inputs, merge joins the parts
(mamba.data.parts). Real stdlib sources; each pack is compared with a single-machine pack of the
same inputs: the merged token stream (every layout word: token, position, loss bit) must be the
single pack's whatever N, with and without a validation split; only shard boundaries may differ.
"""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mamba.data import parts
from mamba.data.dataset import PackedSource
from mamba.data.pack import pack

REPO = Path(__file__).resolve().parents[2]
SHARD_TOKENS = 50_000
OPTIONS = dict(tokenizer="byte", shard_tokens=SHARD_TOKENS, val_fraction=0.1, seed=3)


@pytest.fixture(scope="module")
def files():
    """~40 stdlib modules of very different sizes (about 1.5 MB), so the parts balance bytes, not counts."""
    found = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[::4][:40]
    assert len(found) == 40
    return found


@pytest.fixture(scope="module")
def single(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "packed"
    return out, pack(files, out, **OPTIONS)


def stream(data_dir: Path) -> np.ndarray:
    """Every layout word of a packed dataset, shards in index.json order."""
    index = json.loads((data_dir / "index.json").read_text())
    return np.concatenate([np.load(data_dir / s["file"]) for s in index["shards"]])


@pytest.mark.parametrize("count", [1, 2, 3])
def test_merged_parts_are_the_single_machine_dataset(files, single, tmp_path, count):
    one, reference = single
    out = tmp_path / "parts"
    for index in range(count):
        pack(files, out, part=(index, count), **OPTIONS)
        if index < count - 1:  # not every part is finished yet
            assert parts.merge(out, quiet_if_incomplete=True) is None
    merged = parts.merge(out)
    assert merged["parts"] == [f"../part-{i:05d}-of-{count:05d}/train" for i in range(count)]
    for split, ref in (("train", reference), ("val", reference["val_manifest"])):
        got = merged if split == "train" else merged["val_manifest"]
        assert np.array_equal(stream(out / split), stream(one / split)), split
        for key in ("total_tokens", "total_documents", "sources", "skipped", "tokenizer", "special_tokens"):
            assert got[key] == ref[key], (split, key)
        assert len(got["shards"]) >= len(ref["shards"])  # each part's last shard is short
        if count == 1:  # one part: even the shard boundaries are the single pack's
            assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in ref["shards"]]
        # The loader opens it like any pack (checking every shard's header), windows and all.
        source = PackedSource(out / split, 128)
        assert 0 < source.read(np.arange(len(source))).shape[0] == len(source)
    # Parts balance bytes: no part holds more than 2/3 of the tokens of 2 parts, or 1/2 of 3.
    sizes = [sum(s["tokens"] for s in merged["shards"] if s["file"].startswith(f"../part-{i:05d}"))
             for i in range(count)]
    assert max(sizes) <= merged["total_tokens"] * {1: 1, 2: 2 / 3, 3: 1 / 2}[count], sizes


KILLED_PART = """
import sys
from mamba.data.pack import pack
def step(message):  # wait for the test's go-ahead after each line, so it kills at a known point
    print(message, flush=True)
    sys.stdin.readline()
pack(sys.argv[1:-1], sys.argv[-1], tokenizer="byte", shard_tokens=5_000, chunk_bytes=20_000, part=(1, 2),
     progress=step)
"""


def test_a_killed_part_re_runs_alone_and_a_finished_one_is_not_redone(files, tmp_path):
    options = dict(tokenizer="byte", shard_tokens=5_000, chunk_bytes=20_000)
    reference = pack(files, tmp_path / "one", **options)
    out = tmp_path / "parts"
    pack(files, out, part=(0, 2), **options)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PART, *map(str, files), str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    written = 0
    for line in proc.stdout:
        written += line.startswith("wrote")
        if written == 10:
            proc.kill()  # SIGKILL: no handler runs
            break
        proc.stdin.write("\n")
        proc.stdin.flush()
    proc.wait()
    assert written == 10, "the part finished before it could be killed"
    with pytest.raises(ValueError, match=r"part 1/2 not finished \(no index.json\); run its pack task again "
                                         r"\(the same command with --part 1/2\): it resumes"):
        parts.merge(out)
    first = parts.part_dir(out, 0, 2) / "shard_00000.npy"
    before = first.stat().st_mtime_ns
    messages = []
    again = pack(files, out, part=(0, 2), progress=messages.append, **options)  # the whole array re-run
    assert messages == [] and first.stat().st_mtime_ns == before and again["part"]["index"] == 0
    pack(files, out, part=(1, 2), progress=messages.append, **options)
    assert messages[0].startswith(f"resuming {parts.part_dir(out, 1, 2)}: ") and "0 shards" not in messages[0]
    merged = parts.merge(out)
    assert np.array_equal(stream(out), stream(tmp_path / "one")) and merged["sources"] == reference["sources"]


def test_parts_of_different_packs_are_refused(files, tmp_path):
    out = tmp_path / "parts"
    pack(files, out, part=(0, 2), tokenizer="byte")
    pack(files, out, part=(1, 2), tokenizer="byte", add_bos=True)
    with pytest.raises(ValueError, match=r"part-00001-of-00002/index.json: not part 1/2 of the same pack as "
                                         r".*part-00000-of-00002 \(differs in bos, options\)"):
        parts.merge(out)
    with pytest.raises(FileExistsError, match="holds a part packed from other inputs or with other options"):
        pack(files, out, part=(0, 2), tokenizer="byte", seed=1)
    pack(files[:-1], tmp_path / "p3", part=(0, 3), tokenizer="byte")
    pack(files[:-1], tmp_path / "p3", part=(1, 3), tokenizer="byte")
    pack(files, tmp_path / "p3", part=(2, 3), tokenizer="byte")  # one input more: another input list
    with pytest.raises(ValueError, match=r"not part 2/3 of the same pack .*\(differs in inputs\)"):
        parts.merge(tmp_path / "p3")
    with pytest.raises(ValueError, match="every part must use one tokenizer, so train it once"):
        pack(files, tmp_path / "bpe", part=(0, 2), tokenizer="bpe:300")
    with pytest.raises(ValueError, match=r"--part 2/3: no inputs fall in this part \(2 inputs"):
        pack(files[:2], tmp_path / "few", part=(2, 3), tokenizer="byte")


def run_pack(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/pack.py", *map(str, args)], cwd=REPO, capture_output=True, text=True)


def test_cli_parts_merge_when_the_last_one_finishes(files, single, tmp_path):
    out = tmp_path / "parts"
    args = ["--tokenizer", "byte", "--shard-tokens", SHARD_TOKENS, "--val-fraction", 0.1, "--seed", 3, "--out", out]
    for index in (2, 0):
        run = run_pack("--part", f"{index}/3", *args, *files)
        assert run.returncode == 0, run.stderr
        assert f"in {out}/part-{index:05d}-of-00003 (" in run.stdout
        assert f"part {index}/3 done; the last part to finish merges them into {out}" in run.stdout
    refused = run_pack("merge", out)
    assert refused.returncode == 1 and f"{out}: part 1/3 not finished" in refused.stderr
    run = run_pack("--part", "1/3", *args, *files)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == (f"merged 3 parts into {out}: {single[1]['total_documents']} documents, "
                                           f"{single[1]['total_tokens']} tokens in "
                                           f"{len(json.loads((out / 'train/index.json').read_text())['shards'])} shards")
    assert np.array_equal(stream(out / "val"), stream(single[0] / "val"))
    verify = run_pack("inspect", "--verify", out / "train")
    assert verify.returncode == 0 and "every shard matches" in verify.stdout, verify.stdout + verify.stderr
    bad = run_pack("--part", "3/3", *args, *files)
    assert bad.returncode == 2 and "--part '3/3': expected I/N with 0 <= I < N" in bad.stderr
    assert run_pack("merge", tmp_path / "none").stderr.endswith(
        f"no part-I-of-N directories; pack with tools/pack.py --part I/N --out {tmp_path / 'none'} first\n")
