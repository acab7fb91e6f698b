"""The multi-process test harness itself."""

import pytest
import torch
import torch.distributed as dist

from braid.parallel.testing import run_distributed


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fails_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()
    return rank


@pytest.mark.distributed
def test_all_reduce_over_gloo():
    assert run_distributed(_all_reduce_rank, 2) == [1.0, 1.0]


@pytest.mark.distributed
def test_rank_error_is_reported():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_distributed(_fails_on_rank_one, 2, timeout=20)
