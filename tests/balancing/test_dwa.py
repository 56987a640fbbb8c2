"""DynamicWeightAverage: w_t = K softmax(r_t / T), r_t = L_t(-1) / L_t(-2) over each task's present periods."""
import math

import pytest
import torch

from dnn_cool_catalyst import balancing


def _weights(b, losses, present):
    b(torch.tensor(losses), present, update=True)
    return [round(w, 6) for w in b.last_weights.tolist()]


def _expected(ra, rb):
    ea, eb = math.exp(ra / 2), math.exp(rb / 2)
    return [2 * ea / (ea + eb), 2 * eb / (ea + eb)]


def test_epoch_means_give_the_ratios_and_an_absent_epoch_keeps_the_history():
    b = balancing.DynamicWeightAverage().bind(["a", "b"])
    assert (b.temperature, b.period) == (2.0, None)  # the paper's T, per epoch
    assert _weights(b, [4.0, 1.0], [True, True]) == [1.0, 1.0]  # no history: w = 1
    assert _weights(b, [2.0, 1.0], [True, True]) == [1.0, 1.0]
    b.epoch_end()  # epoch 1: a's mean 3, b's 1
    assert _weights(b, [1.0, 0.0], [True, False]) == [1.0, 0.0]  # one completed epoch: still 1
    assert _weights(b, [2.0, 0.0], [True, False]) == [1.0, 0.0]
    b.epoch_end()  # epoch 2: a's mean 1.5; b never present, its history unchanged
    assert b.seen.tolist() == [2, 1] and b.history[1].tolist() == [0.0, 1.0]
    # r_a = 1.5 / 3, r_b = 1 (one completed period)
    assert _weights(b, [1.0, 1.0], [True, True]) == pytest.approx(_expected(0.5, 1.0), abs=1e-6)


def test_per_step_periods_skip_the_steps_where_a_task_was_absent():
    b = balancing.DynamicWeightAverage(period=1).bind(["a", "b"])
    _weights(b, [4.0, 1.0], [True, True])
    _weights(b, [0.0, 3.0], [False, True])  # a absent: its history stays [., 4]
    assert b.seen.tolist() == [1, 2] and b.history[0].tolist() == [0.0, 4.0]
    _weights(b, [2.0, 3.0], [True, True])  # a's second present step
    # r_a = 2/4 over its present steps (not 0/4 or 2/0), r_b = 3/3
    assert _weights(b, [1.0, 1.0], [True, True]) == pytest.approx(_expected(0.5, 1.0), abs=1e-6)
    # one task present: K = 1 and its weight is 1, the absent one 0
    assert _weights(b, [0.0, 5.0], [False, True]) == [0.0, 1.0]


def test_temperature_and_period_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        balancing.DynamicWeightAverage(temperature=0)
    with pytest.raises(ValueError, match="period"):
        balancing.DynamicWeightAverage(period=0)
