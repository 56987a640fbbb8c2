"""A fake runner that drives callbacks through Catalyst's events, and a small security flow."""
from collections import defaultdict

import numpy as np
import pytest
import torch

from dnn_cool_catalyst.callbacks.batch import INPUTS, LOSS_TERMS, OUTPUTS, TARGETS, StackedLossTerms
from dnn_cool_catalyst.interpreters.loss import stack_terms
from dnn_cool_catalyst.story import security_labels, security_tasks


class RecordingLogger:
    """Records what callbacks send to loggers."""

    def __init__(self):
        self.texts, self.pr_curves, self.images = [], [], []

    def log_text(self, tag, text, runner, scope=None):
        self.texts.append((runner.loader_key, tag, text))

    def log_pr_curve(self, tag, labels, scores, runner):
        self.pr_curves.append((runner.loader_key, tag, np.asarray(labels), np.asarray(scores)))

    def log_image(self, tag, image, runner, scope=None):
        self.images.append((runner.loader_key, tag, image))


class FakeRunner:
    """What the callbacks read from a Catalyst runner, and `run_loader` to fire the events of one
    loader the way `FlowRunner` does (model forward, loss terms in the batch)."""

    def __init__(self, flow, model=None, logdir=None, with_terms=True):
        self.flow = flow
        self.model = model if model is not None else flow.torch()
        self.logdir = logdir
        self.loggers = {"recording": RecordingLogger()}
        self.engine = None
        self.epoch_step = 0
        self.batch = None
        self.batch_metrics = {}
        self.loader_metrics = {}
        self.epoch_metrics = defaultdict(dict)
        self.loader = None
        self.loader_key = None
        self.is_train_loader = self.is_valid_loader = self.is_infer_loader = False
        self.with_terms = with_terms
        self.batch_history = []

    @property
    def logger(self):
        return self.loggers["recording"]

    def log_image(self, tag, image, scope=None):
        for logger in self.loggers.values():
            logger.log_image(tag=tag, image=image, runner=self, scope=scope)

    def start(self, callbacks):
        for cb in callbacks:
            cb.on_experiment_start(self)

    def epoch(self, callbacks, loaders):
        self.epoch_step += 1
        for cb in callbacks:
            cb.on_epoch_start(self)
        for key, loader in loaders.items():
            self.run_loader(callbacks, key, loader)

    def run_loader(self, callbacks, key, loader):
        self.loader, self.loader_key = loader, key
        self.is_train_loader, self.is_valid_loader = key.startswith("train"), key.startswith("valid")
        self.loader_metrics = {}
        for cb in callbacks:
            cb.on_loader_start(self)
        self.model.train(self.is_train_loader)
        loss_fn = self.flow.get_loss()
        with torch.set_grad_enabled(self.is_train_loader):
            for x, y in loader:
                self.batch_metrics = {}
                outputs = self.model(x)
                self.batch = {INPUTS: x, TARGETS: y, OUTPUTS: outputs}
                terms = loss_fn.terms(outputs, y)
                if self.with_terms == "stacked":  # as FlowRunner leaves them
                    self.batch[LOSS_TERMS] = StackedLossTerms(tuple(terms), stack_terms(terms).detach())
                elif self.with_terms:
                    self.batch[LOSS_TERMS] = {p: (s.detach(), c.detach()) for p, (s, c) in terms.items()}
                self.batch_metrics["loss"] = loss_fn.combine(terms, loss_fn.weights).detach()
                for cb in callbacks:
                    cb.on_batch_end(self)
                self.batch_history.append(dict(self.batch_metrics))
        for cb in callbacks:
            cb.on_loader_end(self)
        self.epoch_metrics[key] = dict(self.loader_metrics)
        return self.loader_metrics


@pytest.fixture
def small_flow():
    torch.manual_seed(0)
    return security_tasks(features=8).get_full_flow()


@pytest.fixture
def small_data():
    n = 120
    rng = np.random.default_rng(3)
    return {"features": rng.normal(size=(n, 8)).astype(np.float32)}, security_labels(n, seed=4, missing_rate=0.1)


@pytest.fixture
def fake_runner_cls():
    return FakeRunner
