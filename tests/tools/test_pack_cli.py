"""tools/pack.py as a user runs it, on CPython's standard-library sources: progress on a terminal
and in a log, the skipped-inputs summary, what a failed or interrupted run leaves behind, and the
permissions of what it writes."""
import json
import os
import pty
import re
import signal
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mamba import layout
from mamba.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = [str(p) for p in sorted(STDLIB.glob("*.py"))[::6]]  # 28 modules, ~0.75 MB of real code
N = len(SMALL)


def pack_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/pack.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, **kwargs)


def test_progress_in_a_log_is_plain_lines_and_quiet_turns_it_off(tmp_path):
    run = pack_cli("--tokenizer", "bpe:400", "--out", tmp_path / "o", *SMALL)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and "\x1b" not in run.stderr  # nothing a log file would garble
    lines = run.stderr.splitlines()
    reading = [line for line in lines if line.startswith("training the tokenizer: reading")]
    tokenizing = [line for line in lines if line.startswith("tokenizing (1 worker)")]
    # Each phase: a line when it starts, one every 10 s, and one at its end.
    total = json.loads((tmp_path / "o" / "index.json").read_text())["total_tokens"]
    size = sum(os.path.getsize(p) for p in SMALL)
    assert size < 1e6 and total < 1e6  # so both print in k
    kb, tokens = f"{size / 1e3:.1f}kB", f"{total / 1e3:.1f}k"
    assert reading[0] == f"training the tokenizer: reading   0%: 0B/{kb}"
    assert reading[-1].startswith(f"training the tokenizer: reading 100%: {kb}/{kb}, ")
    assert tokenizing[0] == f"tokenizing (1 worker)   0%: 0B/{kb}, 0 tokens"
    assert tokenizing[-1].startswith(f"tokenizing (1 worker) 100%: {kb}/{kb}, {tokens} tokens at ")
    assert "wrote " in run.stderr and f"packed {N} documents" in run.stdout

    quiet = pack_cli("--tokenizer", "bpe:400", "--out", tmp_path / "q", "--quiet", *SMALL)
    assert quiet.returncode == 0 and quiet.stderr == "" and f"packed {N} documents" in quiet.stdout


def test_progress_on_a_terminal_is_one_line_updated_in_place(tmp_path):
    """stderr on a real pseudo-terminal: each phase is one line rewritten with '\\r', ended once."""
    parent, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "tools/pack.py", "--tokenizer", "bpe:400", "--out", str(tmp_path / "o"),
                             *SMALL], cwd=REPO, stdout=subprocess.PIPE, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(parent, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(parent)
    assert proc.wait() == 0
    screen = b"".join(chunks).decode().replace("\r\n", "\n")  # the terminal turns "\n" into "\r\n"
    lines = screen.split("\n")
    tokenizing = next(line for line in lines if "tokenizing (1 worker)" in line)
    # One terminal line holding every redraw of the phase, from 0% to 100%.
    draws = [d.rstrip() for d in tokenizing.split("\r") if d.strip()]
    assert draws[0].startswith("tokenizing (1 worker)   0%") and draws[-1].startswith("tokenizing (1 worker) 100%")
    assert all(d.startswith("tokenizing (1 worker)") for d in draws)
    assert any(line.startswith("wrote ") for line in lines)  # a lasting message gets its own line
    assert f"packed {N} documents".encode() in proc.stdout.read()


def _bad_tree(root: Path) -> Path:
    """Real stdlib modules, 5 empty __init__.py files and 2 Latin-1 files (not UTF-8)."""
    for i, path in enumerate(SMALL[:4]):
        pkg = root / f"pkg{i}"
        pkg.mkdir(parents=True)
        (pkg / Path(path).name).write_bytes(Path(path).read_bytes())
        (pkg / "__init__.py").write_bytes(b"")
    (root / "__init__.py").write_bytes(b"")
    for name in ("notes.txt", "old.txt"):
        (root / name).write_bytes("café crème\n".encode("latin-1"))
    return root


def test_skipped_inputs_are_summarised_and_listed_in_full_elsewhere(tmp_path):
    src = _bad_tree(tmp_path / "src")
    out = tmp_path / "o"
    run = pack_cli("--tokenizer", "byte", "--on-bad-input", "skip", "--out", out, "--quiet", src)
    assert run.returncode == 0, run.stderr
    summary = [line for line in run.stdout.splitlines() if line.startswith(("skipped", "  "))]
    assert summary[0] == (f"skipped 7 inputs or records (all listed in index.json's \"skipped\" and by "
                          f"`tools/pack.py inspect {out}`):")
    empties = sorted(str(p) for p in src.rglob("__init__.py"))
    assert summary[1] == f"  5 empty input: {', '.join(empties[:3])}, ..."
    assert summary[2] == f"  2 not valid UTF-8: {src / 'notes.txt'}, {src / 'old.txt'}"
    assert len(summary) == 3
    listed = json.loads((out / "index.json").read_text())["skipped"]
    assert sorted(s["path"] for s in listed) == sorted(empties + [str(src / "notes.txt"), str(src / "old.txt")])
    inspected = pack_cli("inspect", out).stdout
    assert all(f"skipped {s['path']}: {s['reason']}" in inspected for s in listed)


@pytest.mark.parametrize("case", ["bad input", "missing input", "tokenizer error", "val split"])
def test_a_failed_pack_leaves_nothing_behind(tmp_path, case):
    src = _bad_tree(tmp_path / "src")
    new = tmp_path / "new" / "deeper" / "out"
    args = {"bad input": ["--tokenizer", "bpe:300", src],
            "missing input": ["--tokenizer", "byte", tmp_path / "nope"],
            "tokenizer error": ["--tokenizer", "bpe:100", SMALL[0]],  # smaller than 256 bytes + specials
            "val split": ["--tokenizer", "byte", "--val-fraction", "0.5", src]}[case]
    run = pack_cli("--out", new, *args)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    run = pack_cli("--out", existing, *args)
    assert run.returncode == 1 and os.listdir(existing) == []  # there before: kept, as it was


def _interrupt(out: Path, args: list, when) -> subprocess.CompletedProcess:
    """Run pack, send SIGINT (Ctrl-C) once `when(stderr line)` holds; return the finished process."""
    proc = subprocess.Popen([sys.executable, "tools/pack.py", "--out", str(out), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if when(line):
            proc.send_signal(signal.SIGINT)
            break
    stdout, rest = proc.communicate()
    assert len(seen) and when(seen[-1]), "the run finished before it could be interrupted"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(seen) + rest)


def test_ctrl_c_keeps_only_what_a_re_run_resumes(tmp_path):
    inputs = ["--on-bad-input", "skip", *sorted(STDLIB.glob("*.py")), *sorted(STDLIB.glob("*/*.py"))]  # ~25 MB
    # Before anything is journaled (tokenizing the first 4 MiB; a shard holds 16M tokens): nothing is left.
    load_tokenizer("bpe:400", inputs_for_training=[Path(p).read_text() for p in SMALL[:3]], save_dir=tmp_path)
    out = tmp_path / "a" / "packed"
    run = _interrupt(out, ["--tokenizer", tmp_path / "tokenizer.json", *inputs], lambda line: "tokenizing" in line)
    assert run.returncode == 130 and "Traceback" not in run.stderr
    assert "interrupted; nothing was finished, nothing is left behind" in run.stderr
    assert not (tmp_path / "a").exists()
    # After the first chunk's shards are journaled: they are kept, and the same command resumes.
    out = tmp_path / "b"
    args = ["--tokenizer", "byte", "--shard-tokens", 1_000_000, *inputs]
    run = _interrupt(out, args, lambda line: line.startswith("wrote") and "shard_00006" in line)
    assert run.returncode == 130 and "Traceback" not in run.stderr
    assert f"interrupted; what is finished is kept in {out}: run the same command again to resume" in run.stderr
    assert (out / ".pack_progress.json").is_file() and not (out / "index.json").exists()
    again = pack_cli("--out", out, *args)
    assert again.returncode == 0 and again.stderr.startswith(f"resuming {out}: ")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_packed_files_follow_the_umask(tmp_path, umask):
    """What a teammate reads (shards, index.json, tokenizer.json, train/ and val/) gets the
    permissions of the umask, as any file a user makes."""
    out = tmp_path / "o"
    run = pack_cli("--tokenizer", "bpe:400", "--val-fraction", "0.2", "--out", out, "--quiet", *SMALL,
                   preexec_fn=lambda: os.umask(umask))
    assert run.returncode == 0, run.stderr
    paths = [out, *out.rglob("*")]
    assert {p.name for p in paths} >= {"train", "val", "index.json", "tokenizer.json", "shard_00000.npy"}
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == (0o777 if p.is_dir() else 0o666) & ~umask, p


@pytest.fixture
def small_fs(tmp_path):
    """A 17 MiB tmpfs: a real filesystem that fills up, mounted for the test (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=17m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_keeps_what_is_finished_and_the_re_run_resumes(small_fs, tmp_path):
    """~4.8M byte tokens in 2 MB shards: the first 4 MiB chunk's 8 shards (16 MB) are written and
    journaled, a shard of the second chunk no longer fits in 17 MiB. After space is freed (the
    tmpfs grown), the same command resumes and ends with the bytes of an uninterrupted run."""
    args = ["--tokenizer", "byte", "--shard-tokens", 500_000, *sorted(STDLIB.glob("*.py"))]
    out = small_fs / "packed"
    run = pack_cli("--out", out, *args)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"pack\.py: error: {re.escape(str(out))}/shard_000\d\d\.npy: No space left on device "
                        rf"\(errno ENOSPC\); the disk is full: what is finished is kept in {re.escape(str(out))}, "
                        rf"free space there and run the same command again to resume", error), error
    journal = json.loads((out / ".pack_progress.json").read_text())
    kept = journal["writers"]["train"]["shards"]
    assert len(kept) >= 1 and sorted(p.name for p in out.glob("shard_*.npy"))[:len(kept)] == [s["file"] for s in kept]
    assert not (out / "index.json").exists() and not list(out.glob(".*.tmp*"))  # no half-written file left
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    again = pack_cli("--out", out, *args)
    assert again.returncode == 0 and again.stderr.startswith(f"resuming {out}: {len(kept)} shards already written")
    reference = tmp_path / "reference"
    assert pack_cli("--out", reference, "--quiet", *args).returncode == 0
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files and len(files) > len(kept) + 1
    assert all((out / name).read_bytes() == (reference / name).read_bytes() for name in files)


def test_strip_html_packs_a_page_as_its_text(tmp_path):
    """--strip-html reaches the reader: the packed document is the page's text, not its markup."""
    import pydoc

    page = tmp_path / "json.html"
    page.write_text(pydoc.html.page("json", pydoc.html.document(json)))
    texts = {}
    for flag in ("--strip-html", None):
        out = tmp_path / f"out{flag}"
        run = pack_cli("--tokenizer", "byte", "--quiet", "--out", out, page, *([flag] if flag else []))
        assert run.returncode == 0, run.stderr
        ids, _, _ = layout.decode(np.load(out / "shard_00000.npy"))
        texts[flag] = load_tokenizer("byte").decode(ids.tolist())
    assert "<a href" in texts[None] and "<a href" not in texts["--strip-html"]
    assert "JSON (JavaScript Object Notation)" in texts["--strip-html"]
    assert len(texts["--strip-html"]) < len(texts[None]) / 2


def test_a_directory_holding_only_a_sentencepiece_model(tmp_path):
    """--tokenizer DIR with only a tokenizer.model (as Llama / Mistral checkpoints ship it): each
    document is sentencepiece's own encoding plus </s>, and a tokenizer.json lands beside the shards."""
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("".join(Path(p).read_text(encoding="utf-8") for p in SMALL[1::4]))
    model = tmp_path / "llama" / "tokenizer"
    model.parent.mkdir()
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(model), model_type="bpe",
                                   vocab_size=500, byte_fallback=True, minloglevel=2, num_threads=1)
    (model.parent / "tokenizer.vocab").unlink()  # the directory holds tokenizer.model alone
    run = pack_cli("--tokenizer", model.parent, "--out", tmp_path / "o", "--quiet", *SMALL[:4])
    assert run.returncode == 0, run.stderr
    assert "tokenizer tokenizer.model (sentencepiece, vocab 500)" in run.stdout
    sp = spm.SentencePieceProcessor(model_file=str(model.parent / "tokenizer.model"))
    shards = json.loads((tmp_path / "o" / "index.json").read_text())["shards"]
    ids, positions, _ = layout.decode(np.concatenate([np.load(tmp_path / "o" / s["file"]) for s in shards]))
    docs = [d.tolist() for d in np.split(ids, np.flatnonzero(positions == 0)[1:])]
    texts = [Path(p).read_text(encoding="utf-8") for p in SMALL[:4]]
    assert docs == [e + [sp.eos_id()] for e in sp.encode(texts)]
    assert load_tokenizer(str(tmp_path / "o")).encode_batch(["naïve 中文"]) == sp.encode(["naïve 中文"])
