"""A data error on one rank reaches the console first, naming the rank and the file.

Composer's launcher shows rank 0's output live and the other ranks' only after it has torn them
all down, so rank 1's clear error used to surface as rank 0's "Connection closed by peer". One
real `composer -n 2` launch where only rank 1's copy of the data has a truncated shard (each rank
reads `copy$RANK`, which the launcher expands per rank: local copies on each node, one torn).
"""
import re
import shutil

from launching import launch

EXCEPTION = re.compile(r"[A-Za-z]+(Error|Exception)\b")


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
    errors = [line for line in out.splitlines() if EXCEPTION.search(line)]
    assert errors, out[-4000:]
    first = errors[0]
    assert first.startswith("rank 1: ValueError: ") and str(shard) in first and "truncated" in first, out[-6000:]
