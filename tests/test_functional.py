"""`functional`: the pure masked reductions (static shapes, values outside the selection never
reach a sum or a gradient) and the task kinds' shared building blocks."""
import math

import pytest
import torch

from dnn_cool_catalyst.functional import (
    accumulation_dtype,
    expand_mask,
    masked_mean,
    masked_sum_count,
    nan_available,
    per_sample_masked,
    selected_sum_count,
    softmax_last,
    where_selected,
)


def test_expand_mask_broadcasts_a_sample_mask_over_elements():
    mask = torch.tensor([True, False, True])
    assert expand_mask(mask, torch.zeros(3)) is mask
    assert expand_mask(mask, torch.zeros(3, 4, 5)).shape == (3, 1, 1)
    assert torch.equal((torch.ones(3, 4) * expand_mask(mask, torch.zeros(3, 4))).sum(1), torch.tensor([4.0, 0.0, 4.0]))


@pytest.mark.parametrize("dtype, acc", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                        (torch.float32, torch.float32), (torch.float64, torch.float64),
                                        (torch.int64, torch.float32)])
def test_accumulation_dtype_is_at_least_float32(dtype, acc):
    assert accumulation_dtype(dtype) == acc


def test_selected_sum_count_ignores_nan_and_inf_outside_the_selection_with_zero_gradient():
    values = torch.tensor([1.0, math.nan, math.inf, 2.0], requires_grad=True)
    selected = torch.tensor([True, False, False, True])
    s, c = selected_sum_count(values, selected)
    assert float(s.detach()) == 3.0 and float(c) == 2.0
    s.backward()
    assert torch.equal(values.grad, torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_half_precision_sums_and_counts_do_not_overflow():
    values = torch.full((5000,), 60000.0, dtype=torch.float16)  # fp16 sums overflow past 65504
    s, c = selected_sum_count(values, torch.ones(5000, dtype=torch.bool))
    assert s.dtype == torch.float32 and float(s) == 3e8 and float(c) == 5000  # fp16 counts only to 2048


def test_masked_mean_is_zero_without_selected_elements_and_the_mean_otherwise():
    loss = torch.tensor([[1.0, 3.0], [5.0, math.nan]])
    available = ~torch.isnan(loss)
    assert float(masked_mean(loss, available, torch.tensor([False, False]))) == 0.0
    assert float(masked_mean(loss, available, torch.tensor([True, True]))) == 3.0
    s, c = masked_sum_count(loss, available, torch.tensor([False, True]))
    assert (float(s), float(c)) == (5.0, 1.0)


def test_where_selected_fills_per_element_per_view_and_per_sample():
    mask = torch.tensor([True, False])
    logits = torch.tensor([[1.0, 2.0], [math.inf, 3.0]])
    per_class = where_selected(logits, torch.tensor([True, False]), mask, 0.0)  # trailing class dim
    assert torch.equal(per_class, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    column = where_selected(torch.tensor([[1.0], [math.inf]]), torch.tensor([True, False]), mask, 0.0)
    assert torch.equal(column, torch.tensor([[1.0], [0.0]]))  # (N, 1) logits of (N,) elements
    other = where_selected(torch.ones(2, 3, 4), torch.ones(2, 5, dtype=torch.bool), mask, -1.0)
    assert torch.equal(other[1], torch.full((3, 4), -1.0)) and torch.equal(other[0], torch.ones(3, 4))


def test_per_sample_masked_marks_samples_outside_the_mask_nan():
    out = per_sample_masked(torch.tensor([1.0, 2.0]), torch.tensor([True, False]))
    assert out[0] == 1.0 and math.isnan(out[1])


def test_nan_available_and_softmax_last():
    assert torch.equal(nan_available(torch.tensor([0.0, math.nan, 1.0])), torch.tensor([True, False, True]))
    probs = softmax_last(torch.tensor([[[0.0, math.log(3.0)]]]))
    torch.testing.assert_close(probs, torch.tensor([[[0.25, 0.75]]]))
