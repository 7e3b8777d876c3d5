"""mamba/train.py's command line (mamba.training.cli.main), in this process: usage, config errors,
and a tiny run that ends with the trainer closed and the process group released."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba.training.cli import USAGE, main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv,code", [([], 2), (["--help"], 0)])
def test_usage(argv, code, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code and USAGE in capsys.readouterr().out


def test_the_script_runs_as_composer_launches_it():
    """`composer ... mamba/train.py` runs the file as a script, with mamba/ first on sys.path."""
    run = subprocess.run([sys.executable, "mamba/train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0 and USAGE in run.stdout, run.stderr[-2000:]


def test_the_package_folder_never_shadows_installed_modules(tmp_path):
    """With mamba/ first on sys.path (a script inside it was run), importing the package drops it:
    `import config` must then find an installed top-level `config`, not mamba/config/."""
    (tmp_path / "config.py").write_text("WHERE = 'installed'\n")
    # The folder of the package this interpreter imports (found without importing it), put first
    # as running a script inside it would.
    code = ("import importlib.util, os, sys; "
            "sys.path.insert(0, os.path.dirname(importlib.util.find_spec('mamba').origin)); "
            "import mamba, config; print(getattr(config, 'WHERE', config.__file__))")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0 and run.stdout.strip() == "installed", run.stdout + run.stderr[-2000:]


def test_a_misspelled_key_exits_with_the_key_and_a_close_match(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([str(REPO / "config.yaml"), "trainer.max_durtion=10ba"])
    message = str(exit_info.value.code)
    assert message.startswith("config error:") and "max_durtion" in message and "max_duration" in message


def test_a_finished_run_leaves_no_process_group(packed, tmp_path):
    """NCCL warns at exit when a process group is left behind; main() must destroy it."""
    main([str(REPO / "config.yaml"), "run_name=cli", f"data.sources=[{{path: '{packed}'}}]",
          "data.seq_len=32", "data.num_workers=0", "model.d_model=32", "model.n_layer=2", "model.vocab_size=300",
          "trainer.global_batch_size=2", "trainer.micro_batch_size=2", "trainer.max_duration=2ba",
          "trainer.save_interval=2ba", "trainer.device=cpu", "logging.progress_bar=false",
          f"trainer.save_folder={tmp_path / 'ckpt'}", "scheduler.t_warmup=1ba", "logging.metrics_file=null"])
    assert (tmp_path / "ckpt" / "latest-rank0.pt").exists()
    assert not torch.distributed.is_initialized()


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """12 stdlib modules packed with a 300-entry BPE."""
    out = tmp_path_factory.mktemp("cli") / "packed"
    stdlib = Path(sys.modules["os"].__file__).parent
    pack = subprocess.run([sys.executable, "tools/pack.py", "--tokenizer", "bpe:300", "--out", str(out),
                           *map(str, sorted(stdlib.glob("*.py"))[:12])], cwd=REPO, capture_output=True, text=True)
    assert pack.returncode == 0, pack.stderr[-3000:]
    return out


def train_tiny(data: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python mamba/train.py` of a 2-layer model on `data`, its stderr a pipe (as in a log file)."""
    return subprocess.run(
        [sys.executable, "mamba/train.py", str(REPO / "config.yaml"), "run_name=tiny",
         f"data.sources=[{{path: '{data}'}}]", "data.seq_len=32", "model.d_model=32", "model.n_layer=2",
         "model.vocab_size=300", "trainer.global_batch_size=2", "trainer.micro_batch_size=2", "trainer.max_duration=5ba",
         "trainer.save_interval=5ba", "trainer.device=cpu", f"trainer.save_folder={tmp_path / 'ckpt'}",
         "scheduler.t_warmup=1ba", "logging.metrics_file=null", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("where,vocab,message", [
    ("missing", 300, "{data}: no such directory; give a packed dataset directory"),
    ("empty", 300, "{data}/index.json: missing"),
    ("packed", 200, "{data}/shard_00000.npy: holds token id 299, but the model's vocab_size is 200"),
])
def test_a_data_error_is_one_line_without_a_traceback(packed, tmp_path, where, vocab, message):
    data = {"missing": tmp_path / "nope", "empty": tmp_path, "packed": packed}[where]
    run = train_tiny(data, tmp_path / "run", f"model.vocab_size={vocab}")
    assert run.returncode != 0
    assert f"data error: data.sources[0].path: {message.format(data=data)}" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]


def test_mamba_debug_shows_the_traceback_of_a_data_error(tmp_path):
    run = subprocess.run([sys.executable, "mamba/train.py", str(REPO / "config.yaml"),
                          f"data.sources=[{{path: '{tmp_path / 'nope'}'}}]", "trainer.device=cpu",
                          f"trainer.save_folder={tmp_path / 'ckpt'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "MAMBA_DEBUG": "1"})
    assert run.returncode != 0 and "Traceback" in run.stderr and "DataError" in run.stderr, run.stderr[-3000:]


def test_progress_in_a_log_file_is_one_plain_line_per_interval(packed, tmp_path):
    """stderr is a pipe here, as in a Slurm log: no progress bar's carriage returns, one line per
    logging.log_interval (2 batches) plus the first and the last, each with loss, lr and rate."""
    run = train_tiny(packed, tmp_path, "logging.progress_bar=true", "logging.log_interval=2ba")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\r" not in run.stderr and "\x1b[" not in run.stderr, "progress bar debris in a log file"
    for known in ("FSDP2 Config/APIs are experimental", "TypedStorage is deprecated"):  # mamba/known_warnings.py
        assert known not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("[train]")]
    assert [line.split()[2] for line in lines] == ["1/5", "2/5", "4/5", "5/5"], run.stderr[-3000:]
    for line in lines:
        assert " loss " in line and " lr " in line and " tok/s" in line and " elapsed" in line, line
    assert "left" in lines[1] and "(100%)" in lines[-1], lines
