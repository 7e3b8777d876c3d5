"""Fixtures shared across test folders."""
import pytest
import torch


@pytest.fixture
def one_rank_gloo():
    """A 1-rank gloo process group in this process (real fully_shard and DCP, no launcher). An
    in-process train() leaves Composer's own 1-rank group behind; that one serves as well."""
    if torch.distributed.is_initialized():
        assert torch.distributed.get_world_size() == 1, "a multi-rank group leaked into the test process"
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()
