"""FlowRunner.predict / infer / evaluate with MC-dropout (`mc_samples`)."""
import torch
from torch import nn

from dnn_cool_catalyst.runners import FlowRunner


class Backbone(nn.Module):
    def __init__(self, flow):
        super().__init__()
        self.features, self.dropout, self.flow = nn.Linear(5, 3), nn.Dropout(0.3), flow.torch()

    def forward(self, x):
        return self.flow({"f": self.dropout(self.features(x["raw"]))})


def test_the_runner_passes_mc_samples_through(gated_flow, tmp_path):
    flow = gated_flow()
    g = torch.Generator().manual_seed(0)
    n = 24
    gate = (torch.rand(n, generator=g) > 0.5).float()
    labels = {"gate": gate, "value": torch.rand(n, generator=g), "tags": (torch.rand(n, 2, generator=g) > 0.5).float(),
              "kind": torch.randint(0, 4, (n,), generator=g)}
    loader = flow.get_dataset({"raw": torch.randn(n, 5, generator=g)}, labels).loader(batch_size=8)
    runner = FlowRunner(flow, model=Backbone(flow), logdir=str(tmp_path))
    predicted = runner.predict(loader, mc_samples=3, mc_seed=1)
    inferred = runner.infer(loader, mc_samples=3, mc_seed=1)
    assert torch.equal(predicted["uncertainty"]["kind"]["entropy"],
                       torch.from_numpy(inferred["uncertainty"]["kind"]["entropy"]))
    table = runner.evaluate(loader, save=False, verbose=False, mc_samples=3, mc_seed=1)
    assert {"entropy", "variance"} <= set(table.columns)
    assert table.loc[table.task_path == "value", "variance"].notna().all()
