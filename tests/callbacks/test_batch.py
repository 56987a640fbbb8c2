"""ChunkBuffer: batches kept as references, concatenated in order, detached; mismatched batches named.
StackedLossTerms: the runner's loss terms as a mapping over one tensor."""
from types import SimpleNamespace

import pytest
import torch

from dnn_cool_catalyst.callbacks.batch import ChunkBuffer, StackedLossTerms, labelled_batch


def test_chunks_concatenate_in_order_detached_and_bounded():
    buffer = ChunkBuffer(max_elements=30)
    w = torch.ones(3, requires_grad=True)
    for i in range(3):
        logits = torch.full((2, 3), float(i)) * w  # part of a graph, as training logits are
        buffer.add(2, {"logits": {"a": logits}, "targets": {"a": torch.tensor([i, i])}})
    assert len(buffer) == 6 and buffer.elements == 24 and not buffer.full  # 8 elements per batch
    buffer.add(2, {"logits": {"a": torch.zeros(2, 3)}, "targets": {"a": torch.full((2,), 3)}})
    assert buffer.full
    chunk = buffer.take()
    assert len(buffer) == 0 and buffer.elements == 0 and buffer.take() == {}
    assert chunk["targets"]["a"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert chunk["logits"]["a"].shape == (8, 3) and not chunk["logits"]["a"].requires_grad


def test_batches_with_other_parts_are_refused_by_name():
    buffer = ChunkBuffer()
    buffer.add(2, {"logits": {"a": torch.zeros(2), "b": torch.zeros(2)}})
    buffer.add(2, {"logits": {"a": torch.zeros(2)}})
    with pytest.raises(KeyError, match="differ in their parts.*'b'"):
        buffer.take()


def test_stacked_loss_terms_read_rows_as_pairs():
    stacked = torch.tensor([[1.5, 3.0], [0.0, 0.0], [2.0, 4.0]])
    terms = StackedLossTerms(("a", "b.c", "d"), stacked)
    assert list(terms) == ["a", "b.c", "d"] and len(terms) == 3 and "b.c" in terms and "x" not in terms
    s, c = terms["d"]
    assert float(s) == 2.0 and float(c) == 4.0
    assert {p: (float(s), float(c)) for p, (s, c) in terms.items()} == {"a": (1.5, 3.0), "b.c": (0.0, 0.0), "d": (2.0, 4.0)}
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        StackedLossTerms(("a", "b", "c"), torch.zeros(2, 2))


def test_labelled_batch_parts_size_and_when_there_is_nothing_to_measure():
    x = {"index": torch.arange(3)}
    runner = SimpleNamespace(batch={"inputs": x, "targets": {"a": torch.zeros(3)}, "outputs": {"logits": {}}})
    batch = labelled_batch(runner, "Mine")
    inputs, targets, outputs = batch
    assert inputs is x and set(targets) == {"a"} and outputs == {"logits": {}} and batch.size == 3
    assert labelled_batch(runner, "Mine", active=False) is None
    runner.batch["targets"] = {}  # an inference loader: no labels
    assert labelled_batch(runner, "Mine") is None
    runner.batch = {"logits": {}}
    with pytest.raises(KeyError, match="Mine needs runner.batch"):
        labelled_batch(runner, "Mine")
