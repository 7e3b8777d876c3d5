"""How the fault tests launch runs: the launch line, a tiny config on 60 packed stdlib modules."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMPOSER = Path(sys.executable).parent / "composer"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_ok(args: list[str]) -> None:
    proc = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def write_tiny_config(work: Path) -> Path:
    """<work>/tiny.yaml: a 2-layer model, a checkpoint every 4 batches into <work>/<run_name>/ckpt,
    metrics in <work>/<run_name>/metrics.jsonl, data in <work>/packed."""
    stdlib = Path(sys.modules["os"].__file__).parent
    run_ok([sys.executable, "tools/pack.py", "--tokenizer", "bpe:512", "--out", str(work / "packed"),
            *map(str, sorted(stdlib.glob("*.py"))[:60])])
    path = work / "tiny.yaml"
    run_ok([sys.executable, "create_mamba_config.py", "--preset", "tiny", "--data", str(work / "packed"),
            "--out", str(path), "model.d_model=64", "model.n_layer=2", "data.seq_len=64",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "scheduler.t_warmup=4ba",
            "scheduler.t_max=2000ba", "trainer.max_duration=2000ba", "trainer.save_interval=4ba",
            "logging.progress_bar=false", f"trainer.save_folder={work}/{{run_name}}/ckpt",
            f"logging.metrics_file={work}/{{run_name}}/metrics.jsonl"])
    return path


def launch(config: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    """`composer -n 2 mamba/train.py CONFIG ...` (nproc=0: `python mamba/train.py`, one process
    and no launcher), its stdout and stderr merged."""
    if nproc:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        head = [str(COMPOSER), "-n", str(nproc), "--master_port", str(port)]
    else:
        head = [sys.executable]
    return subprocess.Popen([*head, "mamba/train.py", str(config), *overrides], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(done, what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc is None or proc.poll() is None, f"run ended before {what}:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)
