"""tools/quickstart.sh end to end, shrunk through its environment (one stdlib package, 3 steps):
it trains, ends with a greedy sample and the next commands naming this run's paths, and a re-run
of the finished quickstart launches nothing (README promises seconds) but shows the sample again."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def quickstart(out: Path) -> subprocess.CompletedProcess:
    stack = "current" if Path(sys.prefix).name == ".venv-current" else "pinned"  # the venv running the tests
    env = dict(os.environ, QUICKSTART_OUT=str(out), QUICKSTART_STEPS="3",
               QUICKSTART_INPUT=str(Path(os.__file__).parent / "json"))
    return subprocess.run(["bash", "tools/quickstart.sh", "--torch", stack], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_the_quickstart_ends_with_a_sample_and_what_to_do_next_and_a_rerun_only_samples(tmp_path):
    out = tmp_path / "qs"
    first = quickstart(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[train] batch 3/3 (100%)" in first.stderr, first.stderr[-3000:]
    sample = first.stdout.split("== a greedy sample from the trained model (prompt 'def '):\n", 1)[1]
    assert sample.startswith("def ") and len(sample.split("\n== done.")[0]) > len("def "), first.stdout[-2000:]
    for command in (f"tools/generate.py {out}/checkpoints/hf", f"tools/plot_metrics.py {out}/metrics.jsonl",
                    f"tools/export_hf.py {out}/checkpoints"):
        assert command in first.stdout, first.stdout[-2000:]
    again = quickstart(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[train]" not in again.stderr and "composer" not in again.stderr.lower(), again.stderr[-3000:]
    assert again.stdout.split("== a greedy sample", 1)[1] == first.stdout.split("== a greedy sample", 1)[1]
