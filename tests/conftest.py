"""Fixtures shared by the lessons' tests."""
import pytest


@pytest.fixture
def one_rank():
    """A one-rank gloo group, torn down after the test (the all-to-all dispatcher needs a process group)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
