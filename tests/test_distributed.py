"""`distributed`: process-group facts without a group, inside a one-process gloo group, and unwrap."""
import torch
import torch.distributed as dist
from torch import nn

from dnn_cool_catalyst import distributed


def test_without_a_group_one_process_whose_rank_torchrun_may_set(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.initialized()
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main_process()
    assert distributed.collective_device() == torch.device("cpu")
    monkeypatch.setenv("RANK", "3")  # torchrun sets it before the group exists
    assert distributed.rank() == 3 and not distributed.is_main_process()


def test_inside_a_gloo_group(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "5")  # the group's rank wins over the environment
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.initialized()
        assert distributed.world_size() == 1 and distributed.world_size(dist.group.WORLD) == 1
        assert distributed.rank() == 0 and distributed.is_main_process()
        assert distributed.collective_device(torch.device("cpu")) == torch.device("cpu")  # gloo: the CPU
    finally:
        dist.destroy_process_group()
    assert not distributed.initialized()


def test_unwrap_removes_every_data_parallel_layer():
    inner = nn.Linear(2, 2)
    assert distributed.unwrap(inner) is inner
    assert distributed.unwrap(nn.DataParallel(nn.DataParallel(inner))) is inner

