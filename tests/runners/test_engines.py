"""`runners.engines.choose_engine`: the engine a run of a flow gets."""
import pytest
from catalyst import dl

from dnn_cool_catalyst.runners.engines import BalancedDataParallelEngine, choose_engine


def test_given_engine_is_kept(security_flow):
    engine = dl.CPUEngine()
    assert choose_engine(engine, security_flow, security_flow.get_loss()) is engine


def test_no_engine_gets_the_available_one(security_flow):
    assert isinstance(choose_engine(None, security_flow, security_flow.get_loss(), cpu=True), dl.CPUEngine)


def test_balancing_makes_a_balanced_engine_with_the_flow(security_flow):
    engine = choose_engine(None, security_flow, security_flow.get_loss(), balance_dataparallel_memory=True)
    assert isinstance(engine, BalancedDataParallelEngine) and engine.flow is security_flow
    given = BalancedDataParallelEngine()
    assert choose_engine(given, security_flow, security_flow.get_loss()).flow is security_flow


def test_balancing_refuses_other_engines_and_plain_criteria(security_flow):
    with pytest.raises(ValueError, match="needs a BalancedDataParallelEngine"):
        choose_engine(dl.CPUEngine(), security_flow, security_flow.get_loss(), balance_dataparallel_memory=True)
    with pytest.raises(ValueError, match="cannot use the criterion function"):
        choose_engine(None, security_flow, lambda outputs, targets: 0.0, balance_dataparallel_memory=True)
