"""`runners.padding`: where accelerate's copies sit in a process's batches (the full check over
accelerate's own shards is tests/runners/test_ddp.py::test_padding_layout_keeps_every_sample_once)."""
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from dnn_cool_catalyst.runners.padding import PaddingLayout, ddp_padding_layout


def test_real_rows_counts_the_samples_before_the_end_of_the_epoch():
    layout = PaddingLayout(world=2, rank=1, batch_size=4, total=10, split=False)
    # rank 1 gets batches 1 and 3 of the stream: positions 4-7, then 12-15 (all copies)
    assert [layout.real_rows(0, 4), layout.real_rows(1, 4)] == [4, 0]
    assert PaddingLayout(world=2, rank=0, batch_size=4, total=10, split=False).real_rows(1, 4) == 2  # 8, 9 real


def test_only_padding_shards_have_a_layout():
    plain = DataLoader(range(10), batch_size=4)
    assert ddp_padding_layout(plain) is None
    inner = BatchSampler(SequentialSampler(range(10)), 4, drop_last=False)
    one = BatchSamplerShard(inner, num_processes=1, process_index=0)
    assert ddp_padding_layout(DataLoader(range(10), batch_sampler=one)) is None  # one process pads nothing
    dropping = BatchSampler(SequentialSampler(range(10)), 4, drop_last=True)
    shard = BatchSamplerShard(dropping, num_processes=2, process_index=0)
    assert ddp_padding_layout(DataLoader(range(10), batch_sampler=shard)) is None  # drop_last: no copies
    shard = BatchSamplerShard(inner, num_processes=2, process_index=1)
    assert ddp_padding_layout(DataLoader(range(10), batch_sampler=shard)) == PaddingLayout(2, 1, 4, 10, False)
