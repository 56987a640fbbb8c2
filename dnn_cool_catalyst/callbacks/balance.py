"""`BalancerCallback`: the per-epoch side of a loss balancer in a Catalyst run."""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from catalyst.core.callback import Callback, CallbackOrder

from ..interpreters.loss import BalancedFlowLoss

WEIGHT_METRIC = "balance/weight"  # logged as `<path>/balance/weight`


class BalancerCallback(Callback):
    """For a run whose criterion is a `BalancedFlowLoss` (`FlowRunner(flow, model, balancer=...)`
    adds this callback itself):

    - at the end of each training loader, each task's effective weight (`d loss / d L_t`, see
      `balancing.Balancer.last_weights`), averaged over the loader's steps in which the task was
      present, goes into `runner.loader_metrics` as `<path>/balance/weight`: Catalyst's loggers
      write it once per epoch (TensorBoard: the training loader's run; CSV: its file). A task
      absent from every step of the loader gets no value that epoch.
    - for the run, the optimizer is attached to the balancer (`Balancer.attach`): a task absent
      from a step keeps its learned per-task value and its optimizer moments from that step.
    - at the end of each epoch, `balancer.epoch_end()` (DynamicWeightAverage closes its period
      there, as in the paper; the other methods do nothing). It runs before the checkpoint
      (order between the optimizer and the checkpoint), so a resumed run continues from the
      closed period.

    With any other criterion it does nothing.
    """

    def __init__(self):
        super().__init__(order=CallbackOrder.Optimizer + 1)
        self._sum: Optional[torch.Tensor] = None
        self._steps: Optional[torch.Tensor] = None
        self._hooks: List[Any] = []

    @staticmethod
    def _balancer(runner: Any) -> Any:
        criterion = runner.criterion
        return criterion.balancer if isinstance(criterion, BalancedFlowLoss) else None

    def on_experiment_start(self, runner: Any) -> None:
        balancer = self._balancer(runner)
        if balancer is not None and runner.optimizer is not None:
            self._hooks = balancer.attach(runner.optimizer)

    def on_experiment_end(self, runner: Any) -> None:
        for hook in self._hooks:  # the optimizer may outlive the run (given by the user)
            hook.remove()
        self._hooks = []

    def on_loader_start(self, runner: Any) -> None:
        self._sum = self._steps = None

    def on_batch_end(self, runner: Any) -> None:
        balancer = self._balancer(runner)
        if balancer is None or not runner.is_train_loader:
            return
        weights = balancer.last_weights.detach()
        if self._sum is None:
            self._sum = torch.zeros_like(weights, dtype=torch.float64)
            self._steps = torch.zeros_like(weights, dtype=torch.float64)
        # an absent task's weight is exactly 0 (balancing.base); every method gives a present one > 0
        self._sum += weights.to(self._sum.dtype)
        self._steps += (weights != 0).to(self._steps.dtype)

    def on_loader_end(self, runner: Any) -> None:
        balancer = self._balancer(runner)
        if balancer is None or self._sum is None:
            return
        means, steps = self._sum.tolist(), self._steps.tolist()  # one transfer per loader
        runner.loader_metrics.update({f"{path}/{WEIGHT_METRIC}": m / n
                                      for path, m, n in zip(balancer.paths, means, steps) if n > 0})

    def on_epoch_end(self, runner: Any) -> None:
        balancer = self._balancer(runner)
        if balancer is not None:
            balancer.epoch_end()
