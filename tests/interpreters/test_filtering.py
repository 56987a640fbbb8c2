"""flow.get_filter(): predictions and labels restricted to where each task applies, against a
hand-written reference (per-sample loops over the precondition rules of API.md section 4)."""
import math

import pytest
import torch
from sklearn.metrics import accuracy_score

NAN = math.nan


GATE = [1.0, 0.0, NAN, 1.0, 0.0, 1.0]
LABELS = {
    "gate": torch.tensor(GATE),
    "value": torch.tensor([0.5, 0.2, 0.3, NAN, 0.1, 0.9]),
    "tags": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [NAN, 1.0], [0.0, 0.0], [NAN, NAN]]),
    "kind": torch.tensor([2, 1, 3, 0, -1, 1]),
}


def _reference_rows(path):
    """Ground-truth semantics by hand: a task under `out.gate` applies where gate is 1 or unknown,
    under `~out.gate` where gate is 0 or unknown; a row counts when one of its labels is present."""
    rows = []
    for i, g in enumerate(GATE):
        unknown = math.isnan(g)
        applies = {"gate": True, "value": unknown or g == 1.0, "tags": unknown or g == 1.0,
                   "kind": unknown or g == 0.0}[path]
        y = LABELS[path][i]
        present = bool((y != -1).all()) if path == "kind" else bool((~torch.isnan(y)).any())
        if applies and present:
            rows.append(i)
    return rows


def _outputs(flow, gt=True):
    model = flow.torch().eval()
    x = {"f": torch.randn(6, 3, generator=torch.Generator().manual_seed(3))}
    if gt:
        x["gt"] = {"gate": LABELS["gate"]}
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("path", ["gate", "value", "tags", "kind"])
def test_rows_are_where_the_task_applies_and_has_a_label(path, gated_flow):
    flow = gated_flow()
    out = _outputs(flow)
    pred, y = flow.get_filter()(out, LABELS)[path]
    rows = _reference_rows(path)
    assert torch.equal(pred, out["decoded"][path][rows])
    assert torch.equal(y, LABELS[path][rows]) or torch.allclose(y, LABELS[path][rows], equal_nan=True)


def test_activated_and_logits_outputs_take_the_same_rows(gated_flow):
    flow = gated_flow()
    out = _outputs(flow)
    rows = _reference_rows("value")
    pred, _ = flow.get_filter(output="activated")(out, LABELS)["value"]
    assert torch.equal(pred, out["activated"]["value"][rows])
    pred, _ = flow.get_filter(output="logits")(out, LABELS)["value"]
    assert torch.equal(pred, out["logits"]["value"][rows])


def test_outputs_of_training_mode_are_decoded_from_the_logits(gated_flow):
    flow = gated_flow()
    model = flow.torch().train()
    x = {"f": torch.randn(6, 3), "gt": {"gate": LABELS["gate"]}}
    with torch.no_grad():
        out = model(x)
    assert "decoded" not in out  # training mode with gt skips decoding
    pred, _ = flow.get_filter()(out, LABELS)["gate"]
    expected = flow.get_decoder()({"gate": torch.sigmoid(out["logits"]["gate"])})["gate"]
    assert torch.equal(pred, expected[_reference_rows("gate")])


def test_elements_flattens_the_present_label_elements_of_kept_rows(gated_flow):
    flow = gated_flow()
    out = _outputs(flow)
    pred, y = flow.get_filter(elements=True)(out, LABELS)["tags"]
    rows = _reference_rows("tags")
    ref_pred, ref_y = [], []
    for i in rows:
        for j in range(2):
            if not math.isnan(float(LABELS["tags"][i, j])):
                ref_pred.append(out["decoded"]["tags"][i, j])
                ref_y.append(LABELS["tags"][i, j])
    assert torch.equal(pred, torch.stack(ref_pred)) and torch.equal(y, torch.stack(ref_y))
    assert not torch.isnan(y).any()


def test_predicted_preconditions_follow_the_decoded_gate(gated_flow):
    flow = gated_flow()
    out = _outputs(flow, gt=False)
    gate = out["decoded"]["gate"].reshape(-1).bool()
    pred, _ = flow.get_filter(preconditions="predicted")(out, LABELS)["kind"]
    rows = [i for i in range(6) if not gate[i] and LABELS["kind"][i] != -1]
    assert torch.equal(pred, out["decoded"]["kind"][rows])


def test_sklearn_accuracy_on_filtered_binary_equals_the_evaluator(security_flow, security_data):
    inputs, labels = security_data
    model = security_flow.torch().eval()
    ds = security_flow.get_dataset(inputs, labels)
    x, y = ds[list(range(len(ds)))]
    with torch.no_grad():
        out = model(x)
    filtered = security_flow.get_filter()(out, y)
    table = security_flow.get_evaluator()(out["activated"], y)
    for path in ("door_open", "person_present"):
        pred, target = filtered[path]
        row = table[(table.task_path == path) & (table.metric_name == "accuracy")].iloc[0]
        assert len(target) == row.num_samples
        assert accuracy_score(target.numpy().astype(int), pred.reshape(-1).numpy().astype(int)) == pytest.approx(row.metric_res)


def test_bad_arguments_say_what_is_expected(gated_flow):
    flow = gated_flow()
    with pytest.raises(ValueError, match="output must be one of"):
        flow.get_filter(output="probabilities")
    with pytest.raises(ValueError, match="preconditions must be"):
        flow.get_filter(preconditions="labels")
    with pytest.raises(TypeError, match="outputs of flow.torch"):
        flow.get_filter()({"gate": torch.zeros(6)}, LABELS)
    out = _outputs(flow)
    with pytest.raises(Exception, match="kind"):
        flow.get_filter()(out, {k: v for k, v in LABELS.items() if k != "kind"})
