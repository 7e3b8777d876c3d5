"""What the installed torch can do, found by trying it: the one place that knows torch differs.

The recipe runs on two stacks (README "Stacks"): the torch Composer 0.32.1 pins (2.7.0) and the
current one (2.14.1 tested). Where they behave differently the code asks here, and each answer is
the behaviour itself, tried once per process, never a version string compared: a backported fix, a
vendor build or the next release then gets the right answer too.

Gloo and ReduceOp.AVG. FSDP2 averages gradients over ranks by asking the collective for
ReduceOp.AVG (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, fp32/bf16 reduce dtypes).
NCCL always honoured it; gloo, the CPU backend, learned it later. Seen on the two stacks, with two
ranks holding 1 and 2 (the mean is 1.5):
  torch 2.7.0    reduce-scatter(AVG) -> 3.0 (a silent SUM)   all-reduce(AVG) -> RuntimeError
  torch 2.14.1   reduce-scatter(AVG) -> 1.5                  all-reduce(AVG) -> 1.5
`gloo_averaging()` runs that very experiment on a private two-rank gloo pair in two threads of this
process (no launcher, no process group of the run's touched; a few milliseconds).
"""
from __future__ import annotations

import datetime
import functools
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GlooAveraging:
    """Whether gloo's collectives honour ReduceOp.AVG (module doc)."""
    reduce_scatter: bool  # False: it sums instead, silently (FSDP2's gradient shards come out world-size times too large)
    all_reduce: bool      # False: it raises (FSDP2 cannot average across replicas: HYBRID_SHARD, NO_SHARD)


@functools.cache
def gloo_averaging() -> GlooAveraging:
    """Try ReduceOp.AVG on two gloo ranks (threads of this process) holding 1 and 2: the mean is 1.5."""
    store = dist.HashStore()
    results: dict[int, tuple[float | None, float | None]] = {}

    def rank(r: int) -> None:
        group = dist.ProcessGroupGloo(dist.PrefixStore("mamba-capabilities", store), r, 2,
                                      datetime.timedelta(seconds=60))
        # reduce-scatter: each rank holds [r+1, r+1] (2,); rank r receives element r of the reduction
        out = torch.empty(1)
        options = dist.ReduceScatterOptions()
        options.reduceOp = dist.ReduceOp.AVG
        group._reduce_scatter_base(out, torch.full((2,), r + 1.0), options).wait()
        scattered = out.item()
        summed = torch.tensor([r + 1.0])
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.AVG
        try:
            group.allreduce([summed], options).wait()
            reduced = summed.item()
        except RuntimeError:  # "Cannot use ReduceOp.AVG with Gloo"
            reduced = None
        results[r] = (scattered, reduced)

    threads = [threading.Thread(target=rank, args=(r,), name=f"gloo-probe-{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(results) != 2:
        raise RuntimeError("the gloo ReduceOp.AVG probe did not finish on both of its threads (see their tracebacks above)")
    scattered, reduced = results[0]
    return GlooAveraging(reduce_scatter=scattered == 1.5, all_reduce=reduced == 1.5)
