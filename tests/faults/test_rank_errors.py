"""A data error reaches the console first, naming the rank and the file, without a traceback.

Composer's launcher shows rank 0's output live and the other ranks' only after it has torn them
all down, so rank 1's clear error used to surface as rank 0's "Connection closed by peer". One
real `composer -n 2` launch where only rank 1's copy of the data has a truncated shard (each rank
reads `copy$RANK`, which the launcher expands per rank: local copies on each node, one torn).
"""
import re
import shutil

from launching import launch

# An error line: a Python exception's, or the one line a data or config error is reported as.
ERROR = re.compile(r"[A-Za-z]+(Error|Exception)\b|^rank \d+: (data|config) error: ")


def test_a_truncated_shard_on_rank_1_is_the_first_error_shown(tiny_config):
    work = tiny_config.parent
    for rank in (0, 1):
        shutil.copytree(work / "packed", work / f"copy{rank}")
    shard = sorted((work / "copy1").glob("*.npy"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    run = launch(tiny_config, "run_name=torn", f"data.sources=[{{path: '{work}/copy$RANK'}}]")
    out, _ = run.communicate(timeout=300)
    assert run.returncode != 0, out[-4000:]
    errors = [line for line in out.splitlines() if ERROR.search(line)]
    assert errors, out[-4000:]
    first = errors[0]
    assert first.startswith("rank 1: data error: ") and str(shard) in first and "truncated" in first, out[-6000:]


def test_a_missing_data_directory_is_one_line_on_every_rank_without_a_traceback(tiny_config):
    """An error every rank meets (the config names a directory that is not there): the console's
    first error line says the directory is missing; a rank that gets to it says it once (the
    launcher may stop the other rank first, when the first one exits); no Python traceback."""
    missing = tiny_config.parent / "no-such-dir"
    run = launch(tiny_config, "run_name=nodata", f"data.sources=[{{path: '{missing}'}}]")
    out, _ = run.communicate(timeout=300)
    assert run.returncode != 0, out[-4000:]
    errors = [line for line in out.splitlines() if ERROR.search(line)]
    assert errors and re.match(r"rank [01]: data error: ", errors[0]) and f"{missing}: no such directory" in errors[0], \
        out[-4000:]
    for rank in (0, 1):  # rank 1's line shows in its own output block, printed by the launcher
        assert len([line for line in errors if line.startswith(f"rank {rank}: ")]) <= 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
