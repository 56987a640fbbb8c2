"""Loss balancing: how the flow loss weighs its tasks, respecting each task's sample set `S_t`.

    from dnn_cool_catalyst import balancing
    loss_fn = flow.get_loss(balancer=balancing.UncertaintyWeighting())
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()])
    loss_fn.balancer.attach(optimizer)          # absent tasks keep their learned values exactly
    loss = loss_fn.backward(outputs, targets)   # or loss_fn(outputs, targets).backward()

`loss_fn.parameters()` are the balancer's learnable parameters, one `(T,)` vector per method
(UncertaintyWeighting's log-variances, GradNorm's weights, IMTL's log-scales; the others have
none); move `loss_fn` to the model's device. `attach` makes `optimizer.step()` leave the entries of
the tasks absent from the step, with their optimizer moments, as they were (`FlowRunner` does it;
without it the balancer still puts their values back at its next call, see `base`). DynamicWeightAverage works on epoch means:
call `loss_fn.balancer.epoch_end()` after each training epoch (or give it `period=`).

Gradient methods (`GradientBalancer`: PCGrad, MGDA, CAGrad, IMTL, GradNorm, DBMTL) combine the
tasks' gradients: give the shared parameters
(`loss_fn.backward(outputs, targets, shared_parameters=model.backbone.parameters())`, or
`loss_fn.shared_parameters = ...` once), or choose `representation=True` (gradients with respect to
the features the heads read; no shared parameters needed). See `gradient` and
`interpreters.loss.BalancedFlowLoss.gradient_step`.

A task whose `S_t` is empty in a step (over all ranks) takes no part in it: no term, a zero gradient
for its head, no update of its learned weight or history (`base.Balancer`). Each method is one file
citing its paper, with the paper's defaults. Core: no Catalyst import.
"""
from .base import Balancer
from .cagrad import CAGrad
from .dbmtl import DBMTL
from .dwa import DynamicWeightAverage
from .equal import EqualWeighting
from .famo import FAMO
from .gls import GeometricLossStrategy
from .gradient import GradientBalancer
from .gradnorm import GradNorm
from .imtl import IMTL
from .mgda import MGDA
from .pcgrad import PCGrad
from .rlw import RandomLossWeighting
from .uncertainty import UncertaintyWeighting

__all__ = ["Balancer", "GradientBalancer", "EqualWeighting", "UncertaintyWeighting", "DynamicWeightAverage", "RandomLossWeighting",
           "GeometricLossStrategy", "FAMO", "PCGrad", "MGDA", "CAGrad", "IMTL", "GradNorm", "DBMTL"]
