"""DynamicWeightAverage: w_t = K softmax(r_t / T), r_t = L_t(-1) / L_t(-2) over each task's present steps."""
import math

import pytest
import torch

from dnn_cool_catalyst import balancing


def _weights(b, losses, present):
    b(torch.tensor(losses), present, update=True)
    return [round(w, 6) for w in b.last_weights.tolist()]


def test_weights_from_the_last_two_present_steps():
    b = balancing.DynamicWeightAverage().bind(["a", "b"])
    assert b.temperature == 2.0  # the paper's T
    assert _weights(b, [4.0, 1.0], [True, True]) == [1.0, 1.0]  # no history: w = 1
    assert _weights(b, [2.0, 1.0], [True, True]) == [1.0, 1.0]  # one step of history: still 1
    # r_a = 2/4 = 0.5, r_b = 1/1 = 1: w = 2 exp(r/2) / sum exp(r/2)
    ea, eb = math.exp(0.25), math.exp(0.5)
    got = _weights(b, [1.0, 1.0], [True, True])
    assert got == pytest.approx([2 * ea / (ea + eb), 2 * eb / (ea + eb)], abs=1e-6)


def test_history_skips_the_steps_where_a_task_was_absent():
    b = balancing.DynamicWeightAverage().bind(["a", "b"])
    _weights(b, [4.0, 1.0], [True, True])
    _weights(b, [0.0, 3.0], [False, True])  # a absent: its history stays [., 4]
    assert b.seen.tolist() == [1, 2] and b.history[0].tolist() == [0.0, 4.0]
    _weights(b, [2.0, 3.0], [True, True])  # a's second present step
    # r_a = 2/4 over its present steps (not 0/4 or 2/0), r_b = 3/3
    ea, eb = math.exp(0.25), math.exp(0.5)
    got = _weights(b, [1.0, 1.0], [True, True])
    assert got == pytest.approx([2 * ea / (ea + eb), 2 * eb / (ea + eb)], abs=1e-6)
    # one task present: K = 1 and its weight is 1, the absent one 0
    assert _weights(b, [0.0, 5.0], [False, True]) == [0.0, 1.0]


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        balancing.DynamicWeightAverage(temperature=0)
