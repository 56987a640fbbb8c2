"""InterpretationCallback against a fake runner: ranks and dataset indices (also under
shuffling), the CSV, publishers per key and per type, tree explanations."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.callbacks import InterpretationCallback, rank_samples
from dnn_cool_catalyst.callbacks.interpretation import (CSV_COLUMNS, _Extremes, _chosen_rows, _ranked, _ranked_rows,
                                                        label_and_prediction,
                                                        sample_caption, sample_describer)
from dnn_cool_catalyst.runners.compat import batch_fetching_loader
from dnn_cool_catalyst.tasks import (BinaryClassificationTask, BoundedRegressionTask, ClassificationTask,
                                     MultilabelClassificationTask)


def per_sample_losses(flow, ds):
    x, y = ds[list(range(len(ds)))]
    with torch.no_grad():
        return flow.get_per_sample_loss()(flow.torch().eval()(x), y)


def test_rank_samples_orders_by_loss_then_index_and_skips_nan():
    losses = torch.tensor([0.5, math.nan, 0.9, 0.5, 0.1, 0.7])
    indices = torch.tensor([10, 11, 12, 13, 14, 15])
    table = rank_samples(losses, indices, k=2)
    assert table["rank"].tolist() == [1, 2, 4, 5]  # n = 5 samples in S_t
    assert table["dataset_index"].tolist() == [12, 15, 13, 14]  # equal losses 0.5: index 10 ranks before 13
    assert table["loss"].tolist() == pytest.approx([0.9, 0.7, 0.5, 0.1])
    small = rank_samples(torch.tensor([0.2, 0.3]), torch.tensor([1, 0]), k=5)
    assert small["rank"].tolist() == [1, 2] and small["dataset_index"].tolist() == [0, 1]
    assert rank_samples(torch.tensor([math.nan]), torch.tensor([3]), k=2).empty


def test_ranking_equals_a_full_sort_with_ties_and_missing_losses():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n, k = int(torch.randint(0, 120, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        losses = torch.randint(0, 4, (n,), generator=g).double() if trial % 2 else torch.rand(n, generator=g)
        losses[torch.rand(n, generator=g) < 0.3] = math.nan
        indices = torch.randperm(n, generator=g) * 7
        keep = ~torch.isnan(losses)
        loss, index = losses[keep].double().numpy(), indices[keep].numpy()
        order = np.lexsort((index, -loss))
        ranks = [r for r in range(1, len(order) + 1) if r <= k or r > len(order) - k]
        table = rank_samples(losses, indices, k)
        assert table["rank"].tolist() == ranks, (n, k)
        assert table["dataset_index"].tolist() == [int(index[order[r - 1]]) for r in ranks]


def test_csv_has_the_right_samples_under_shuffling(small_flow, small_data, fake_runner_cls, tmp_path,
                                                   assert_clear_ranking):
    ds = small_flow.get_dataset(*small_data, with_index=True)
    runner = fake_runner_cls(small_flow, logdir=str(tmp_path))
    cb = InterpretationCallback(top_k=3, explain=0)
    runner.start([cb])
    runner.run_loader([cb], "valid", ds.loader(batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5)))
    table = pd.read_csv(tmp_path / "interpretation_valid.csv")
    assert tuple(table.columns) == CSV_COLUMNS
    pd.testing.assert_frame_equal(table, cb.results["valid"], check_dtype=False)
    assert (tmp_path / "interpretation_valid.csv").read_text() == cb.results["valid"].to_csv(index=False,
                                                                                               lineterminator="\n")
    reference = per_sample_losses(small_flow, ds)
    # shuffled batches of 16 against one whole batch: losses round differently (~1e-7 relative), so
    # the chosen samples are compared exactly only once no near-tie can swap them, values at rel 1e-5
    assert_clear_ranking(reference, 3)
    for path in small_flow.graph.paths:
        rows = table[table["task_path"] == path]
        losses = reference[path].numpy()
        in_s = np.flatnonzero(~np.isnan(losses))
        expected = in_s[np.lexsort((in_s, -losses[in_s]))]  # by loss descending, then index
        n = len(expected)
        assert rows["rank"].tolist() == [r for r in range(1, n + 1) if r <= 3 or r > n - 3]
        assert rows["dataset_index"].tolist() == [int(expected[r - 1]) for r in rows["rank"]]
        assert rows["loss"].to_numpy() == pytest.approx(losses[rows["dataset_index"].to_numpy()], rel=1e-5)


def test_positions_are_used_with_a_warning_without_index(small_flow, small_data, fake_runner_cls):
    ds = small_flow.get_dataset(*small_data, with_index=False)
    runner = fake_runner_cls(small_flow)
    cb = InterpretationCallback(top_k=1, explain=0)
    runner.start([cb])
    with pytest.warns(UserWarning, match="carry no X\\['index'\\]"):
        runner.run_loader([cb], "valid", ds.loader(batch_size=50))
    rows = cb.results["valid"]
    reference = per_sample_losses(small_flow, ds)["camera_blocked"].numpy()
    worst = rows[(rows["task_path"] == "camera_blocked") & (rows["rank"] == 1)]["dataset_index"].item()
    assert worst == int(np.nanargmax(reference))


def test_train_loaders_are_not_interpreted_by_default(small_flow, small_data, fake_runner_cls):
    ds = small_flow.get_dataset(*small_data, with_index=True)
    runner = fake_runner_cls(small_flow)
    cb = InterpretationCallback()
    runner.start([cb])
    runner.run_loader([cb], "train", ds.loader(batch_size=64))
    assert cb.results == {} and runner.logger.texts == []


class ImageModel(nn.Module):
    """Computes the features from an image and a caption length, passes gt through."""

    def __init__(self, flow_module):
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
        self.flow = flow_module

    def forward(self, x):
        return self.flow({"features": self.backbone(x["img"].float()), "gt": x.get("gt")})


class CountingPublisher:
    def __init__(self):
        self.calls = []

    def accepts(self, value):
        return True

    def publish(self, runner, tag, value):
        self.calls.append(tag)


def test_inputs_are_published_per_type_and_per_key(small_flow, small_data, fake_runner_cls):
    _, labels = small_data
    n = len(labels["camera_blocked"])
    rng = np.random.default_rng(0)
    inputs = {"img": rng.integers(0, 255, size=(n, 3, 8, 8)).astype(np.uint8),
              "caption": [f"sample {i}" for i in range(n)],
              "meta": {"depth": rng.normal(size=(n, 8, 8, 1)).astype(np.float32), "hidden": np.zeros((n, 4))}}
    ds = small_flow.get_dataset(inputs, labels, with_index=True, computed=["features"])
    custom = CountingPublisher()
    runner = fake_runner_cls(small_flow, model=ImageModel(small_flow.torch()))
    cb = InterpretationCallback(top_k=1, explain=0, publishers={"meta.depth": custom, "caption": None})
    runner.start([cb])
    runner.run_loader([cb], "valid", ds.loader(batch_size=32, shuffle=True))
    table = cb.results["valid"]
    images = {tag: image for _, tag, image in runner.logger.images}
    row = table[(table["task_path"] == "door_open") & (table["rank"] == 1)].iloc[0]
    image = images["door_open/worst/1/img"]
    # the image at the top left, a caption strip (label, prediction, loss) below it
    assert image.shape[0] > 8 and image.shape[1] >= 8 and image.dtype == np.uint8
    assert np.array_equal(image[:8, :8], np.moveaxis(inputs["img"][int(row["dataset_index"])], 0, -1))
    assert image[8:].any()
    assert "door_open/best/1/img" in images
    assert not any("caption" in tag for _, tag, _ in runner.logger.texts)  # skipped by key
    assert "door_open/worst/1/meta.depth" in custom.calls  # chosen by key
    assert not any("hidden" in tag for tag in images)  # no publisher accepts a (4,) vector
    texts = {tag: text for _, tag, text in runner.logger.texts}
    assert f"| 1 | {int(row['dataset_index'])} |" in texts["door_open/interpretation"]


def test_text_inputs_are_published_as_text(small_flow, small_data, fake_runner_cls):
    feats, labels = small_data
    n = len(labels["camera_blocked"])
    inputs = dict(feats, note=[f"note {i}" for i in range(n)])
    ds = small_flow.get_dataset(inputs, labels, with_index=True)
    runner = fake_runner_cls(small_flow)
    cb = InterpretationCallback(top_k=1, explain=0)
    runner.start([cb])
    runner.run_loader([cb], "valid", ds.loader(batch_size=40))
    row = cb.results["valid"].query("task_path == 'camera_blocked' and rank == 1").iloc[0]
    texts = {tag: text for _, tag, text in runner.logger.texts}
    assert f"note {int(row['dataset_index'])}" in texts["camera_blocked/worst/1/note"]


def test_tree_explanations_of_the_first_samples(small_flow, small_data, fake_runner_cls):
    ds = small_flow.get_dataset(*small_data, with_index=True)
    runner = fake_runner_cls(small_flow)
    cb = InterpretationCallback(explain=2)
    runner.start([cb])
    runner.run_loader([cb], "valid", ds.loader(batch_size=32, shuffle=True))
    texts = {tag: text for _, tag, text in runner.logger.texts if tag.startswith("explanations/")}
    assert sorted(texts) == ["explanations/sample_0", "explanations/sample_1"]
    x, _ = ds[[0]]
    with torch.no_grad():
        out = small_flow.torch().eval()({k: v for k, v in x.items() if k != "gt"})
    tree = small_flow.get_treelib_explainer()(out, ids=[0])[0]
    assert tree.show(stdout=False, sorting=False) in texts["explanations/sample_0"]
    assert "camera_blocked" in texts["explanations/sample_0"]


def _named(ds):
    n = len(ds)
    return ds.name_samples(row=[f"r{i}" for i in range(n)], file=[f"img/{i:03d}.png" for i in range(n)])


def test_named_samples_in_the_csv_the_tables_and_the_tree_roots(small_flow, small_data, fake_runner_cls, tmp_path):
    ds = _named(small_flow.get_dataset(*small_data, with_index=True))
    runner = fake_runner_cls(small_flow, logdir=str(tmp_path))
    cb = InterpretationCallback(top_k=2, explain=2)
    runner.start([cb])
    # wrapped as accelerate's loaders wrap it (the dataset behind a `_BatchFetch`), shuffled
    loader = batch_fetching_loader(ds.loader(batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert sample_describer(loader) is not None and not hasattr(loader.dataset, "describe")
    runner.run_loader([cb], "valid", loader)
    table = pd.read_csv(tmp_path / "interpretation_valid.csv")
    assert tuple(table.columns) == CSV_COLUMNS + ("row", "file")  # dataset_index kept, names appended
    assert table["row"].tolist() == [f"r{i}" for i in table["dataset_index"]]
    assert table["file"].tolist() == [f"img/{i:03d}.png" for i in table["dataset_index"]]
    assert (tmp_path / "interpretation_valid.csv").read_text() == cb.results["valid"].to_csv(index=False,
                                                                                               lineterminator="\n")
    texts = {tag: text for _, tag, text in runner.logger.texts}
    lines = texts["door_open/interpretation"].splitlines()
    assert lines[0] == "| rank | dataset index | row | file | label | prediction | loss |"
    first = table[table["task_path"] == "door_open"].iloc[0]
    i = int(first["dataset_index"])
    assert lines[2].startswith(f"| 1 | {i} | r{i} | img/{i:03d}.png | ")
    root = texts["explanations/sample_0"].splitlines()[1]
    assert root == "inp 0 (row 'r0', file img/000.png)"


def test_unnamed_samples_keep_the_plain_columns_and_roots(small_flow, small_data, fake_runner_cls, tmp_path):
    ds = small_flow.get_dataset(*small_data, with_index=True)
    assert ds.describe(3) == {}
    runner = fake_runner_cls(small_flow, logdir=str(tmp_path))
    cb = InterpretationCallback(top_k=1, explain=1)
    runner.start([cb])
    runner.run_loader([cb], "valid", ds.loader(batch_size=40))
    assert tuple(pd.read_csv(tmp_path / "interpretation_valid.csv").columns) == CSV_COLUMNS
    texts = {tag: text for _, tag, text in runner.logger.texts}
    assert texts["explanations/sample_0"].splitlines()[1] == "inp 0"


class CaptionRecorder(CountingPublisher):
    def publish(self, runner, tag, value, caption=None):
        self.calls.append((tag, caption))


def test_ranked_samples_are_captioned_with_label_prediction_and_loss(small_flow, small_data, fake_runner_cls):
    ds = _named(small_flow.get_dataset(*small_data, with_index=True))
    recorder = CaptionRecorder()
    runner = fake_runner_cls(small_flow)
    # chunks of about one batch: the candidates are kept across several flushes
    cb = InterpretationCallback(top_k=2, explain=0, publishers={"features": recorder}, buffer_elements=2000)
    runner.start([cb])
    runner.run_loader([cb], "valid", ds.loader(batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2)))
    captions = dict(recorder.calls)
    x, y = ds[list(range(len(ds)))]
    with torch.no_grad():
        activated = small_flow.torch().eval()(x)["activated"]
    table = cb.results["valid"]
    tasks = {leaf.path: leaf.task for leaf in small_flow.graph.leaves}
    face = "person_regression.face_regression"
    for path in ("door_open", "person_regression.body_regression.shirt_type", f"{face}.facial_characteristics",
                 f"{face}.face_w"):
        for position, rank in (("worst/1", 1), ("best/1", None)):
            rows = table[table["task_path"] == path]
            row = rows.iloc[0] if rank == 1 else rows.iloc[-1]
            i = int(row["dataset_index"])
            label, prediction = label_and_prediction(tasks[path], y[path][i], activated[path][i])
            assert captions[f"{path}/{position}/features"] == sample_caption(
                label, prediction, row["loss"], {"row": f"r{i}", "file": f"img/{i:03d}.png"}), (path, position)
    text = captions["door_open/worst/1/features"]
    assert text.startswith("label: ") and "\nprediction: " in text and "\nloss: " in text and "\nrow: r" in text


def test_kept_losses_do_not_hold_the_other_tasks_losses(small_flow, small_data, fake_runner_cls):
    """The losses kept per task (gathered with pickle under DDP) are each task's own: not views of
    the (tasks, N) matrix the ranking uses, which would pickle every task's losses once per task."""
    kept = {}

    class Recording(InterpretationCallback):
        def _gather_across_processes(self):  # what a DDP gather would pickle, at the loader's end
            kept.update({p: list(chunks) for p, chunks in self._losses.items()})
            super()._gather_across_processes()

    ds = small_flow.get_dataset(*small_data, with_index=True)
    runner = fake_runner_cls(small_flow)
    cb = Recording(top_k=1, explain=0, buffer_elements=2000)  # several chunks
    runner.start([cb])
    runner.run_loader([cb], "valid", ds.loader(batch_size=16))
    assert set(kept) == set(small_flow.graph.paths) and all(len(chunks) > 1 for chunks in kept.values())
    for chunks in kept.values():
        for t in chunks:
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_label_and_prediction_in_the_tasks_terms():
    from torch import nn

    binary = BinaryClassificationTask("door_open", nn.Linear(2, 1))
    assert label_and_prediction(binary, torch.tensor(1.0), torch.tensor([0.25])) == ("True", "False (0.25)")
    shirts = ClassificationTask("shirt", nn.Linear(2, 3), class_names=["polo", "tee", "hoodie"])
    assert label_and_prediction(shirts, torch.tensor(2), torch.tensor([0.1, 0.7, 0.2])) == ("hoodie", "tee (0.7)")
    assert label_and_prediction(shirts, torch.tensor(0), None) == ("polo", "?")
    tags = MultilabelClassificationTask("tags", nn.Linear(2, 3), class_names=["glasses", "beard", "hat"])
    assert label_and_prediction(tags, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.9, 0.6, 0.1])) == (
        "[glasses, hat]", "[glasses, beard]")
    assert label_and_prediction(tags, torch.tensor([math.nan, 0.0, 1.0]), None) == ("[glasses?, hat]", "?")
    box = BoundedRegressionTask("x1", nn.Linear(2, 1), scale=64.0)  # labels and predictions decoded: pixels
    assert label_and_prediction(box, torch.tensor(0.5), torch.tensor([0.25])) == ("[32]", "[16]")
    assert sample_caption("True", "False (0.25)", 1.5, {"row": 7, "file": "a.png"}) == (
        "label: True\nprediction: False (0.25)\nloss: 1.5\nrow: 7\nfile: a.png")


def test_kept_candidates_hold_every_ranked_sample():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n, k = int(torch.randint(1, 200, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        losses = torch.randint(0, 5, (n,), generator=g).float() if trial % 2 else torch.rand(n, generator=g)
        losses[torch.rand(n, generator=g) < 0.2] = math.nan
        indices = torch.randperm(n, generator=g)
        labels = indices.float() * 10
        kept = _Extremes(k)
        for chunk in torch.split(torch.arange(n), int(torch.randint(1, 40, (1,), generator=g))):
            kept.add(losses[chunk], indices[chunk], labels[chunk], labels[chunk].unsqueeze(1), lambda t: t + 1)
        _, ranked, _ = _ranked(losses, indices, k)
        assert set(kept.rows) == set(ranked.tolist()), (n, k)
        for i in ranked.tolist():
            label, activated = kept.rows[i]
            assert float(label) == i * 10 and float(activated[0]) == i * 10 + 1


def test_ranking_all_tasks_at_once_gives_each_tasks_own_ranking():
    """`_ranked_rows` / `_chosen_rows` (one sort of a (tasks, N) matrix) rank every row as `_ranked`
    ranks it alone: ties by dataset index, NaN (outside S_t) left out, rows with few or no samples."""
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        t, n, k = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 120, (1,), generator=g)), \
            int(torch.randint(1, 6, (1,), generator=g))
        # ties (few distinct values, also 0.0 against -0.0), negative and infinite losses
        losses = (torch.randint(-3, 4, (t, n), generator=g).float() / 2 if trial % 2 else torch.rand(t, n, generator=g))
        losses[torch.rand(t, n, generator=g) < torch.rand(t, 1, generator=g)] = math.nan  # some rows all NaN
        if trial % 3 == 0:
            losses[0, : n // 2] = math.inf
            losses[-1, n // 3:] = -0.0
        indices = torch.randperm(n, generator=g) * 3
        rows = _ranked_rows(losses.double().numpy(), indices.numpy(), k)
        chosen = _chosen_rows(losses.numpy(), indices.numpy(), k)
        for row, (ranks, index, loss), (pos, chosen_ranks) in zip(losses, rows, chosen):
            want_ranks, want_index, want_loss = _ranked(row, indices, k)
            np.testing.assert_array_equal(ranks, want_ranks)
            np.testing.assert_array_equal(index, want_index)
            np.testing.assert_array_equal(loss, want_loss)
            np.testing.assert_array_equal(indices.numpy()[pos], want_index)
            np.testing.assert_array_equal(chosen_ranks, want_ranks)
            assert ranks.dtype == want_ranks.dtype and index.dtype == want_index.dtype and loss.dtype == want_loss.dtype


def test_label_and_prediction_asks_the_task():
    class Sky(dcc.Task):
        """A kind of the user's own that describes its samples itself."""

        def describe_sample(self, label, activated, *, digits=4):
            return f"sky {float(label):.1f}", "clear" if activated is not None else "?"

    sky = Sky(name="sky", module=nn.Linear(1, 1), loss=lambda z, y: z)
    assert label_and_prediction(sky, torch.tensor(0.5), torch.tensor([0.2])) == ("sky 0.5", "clear")
    assert label_and_prediction(sky, torch.tensor(0.5), None) == ("sky 0.5", "?")


def test_label_and_prediction_falls_back_to_raw_values_when_the_task_cannot_describe():
    class Broken(dcc.Task):
        def describe_sample(self, label, activated, *, digits=4):
            raise ValueError("other shapes")

    broken = Broken(name="broken", module=nn.Linear(1, 1), loss=lambda z, y: z)
    assert label_and_prediction(broken, torch.tensor([0.5, 2]), torch.tensor([0.25])) == ("[0.5, 2]", "[0.25]")


def test_a_mixed_loader_names_the_source_of_each_ranked_sample(small_flow, fake_runner_cls, two_security_sources,
                                                               tmp_path, assert_clear_ranking):
    mixed = two_security_sources(small_flow)
    runner = fake_runner_cls(small_flow, logdir=str(tmp_path))
    cb = InterpretationCallback(top_k=2, explain=1)
    runner.start([cb])
    runner.run_loader([cb], "valid", mixed.loader(batch_size=16))
    table = pd.read_csv(tmp_path / "interpretation_valid.csv")
    assert tuple(table.columns) == CSV_COLUMNS + ("row", "source")  # the source's names, then its own
    # dataset_index counts within the source: the row names (made as "<source>-<index>") agree
    assert table["row"].tolist() == [f"{s}-{i}" for s, i in zip(table["source"], table["dataset_index"])]
    # the ranking runs over both sources together; samples of different sources with the same
    # index are different samples (ties by source, then index)
    per_source = {name: per_sample_losses(small_flow, mixed.sources[name]) for name in mixed.source_names}
    for name in mixed.source_names:
        assert_clear_ranking(per_source[name], 2)
    for path in small_flow.graph.paths:
        candidates = [(-float(v), s, i) for s, name in enumerate(mixed.source_names)
                      for i, v in enumerate(per_source[name][path].tolist()) if not math.isnan(v)]
        expected = sorted(candidates)
        n = len(expected)
        rows = table[table["task_path"] == path]
        assert rows["rank"].tolist() == [r for r in range(1, n + 1) if r <= 2 or r > n - 2]
        picked = [expected[r - 1] for r in rows["rank"]]
        assert rows["source"].tolist() == [mixed.source_names[s] for _, s, _ in picked]
        assert rows["dataset_index"].tolist() == [i for _, _, i in picked]
    # door tasks rank only door_cam's samples (people's have no door labels), and the other way round
    assert set(table[table["task_path"] == "door_open"]["source"]) == {"door_cam"}
    assert set(table[table["task_path"] == "person_present"]["source"]) == {"people"}
    texts = {tag: text for _, tag, text in runner.logger.texts}
    lines = texts["door_open/interpretation"].splitlines()
    assert lines[0] == "| rank | dataset index | row | source | label | prediction | loss |"
    first = table[table["task_path"] == "door_open"].iloc[0]
    assert lines[2].startswith(f"| 1 | {first['dataset_index']} | door_cam-{first['dataset_index']} | door_cam | ")
    # the first sample of each source is explained, its source in the tag and the root
    assert sorted(t for t in texts if t.startswith("explanations/")) == ["explanations/door_cam/sample_0",
                                                                          "explanations/people/sample_0"]
    assert texts["explanations/people/sample_0"].splitlines()[1] == "inp 0 (row 'people-0', source people)"


def test_a_given_callback_pickles_for_ddp_spawn(security_flow):
    """DDP's spawn pickles the callbacks a user (or a YAML config) passes to `train`."""
    import pickle

    from dnn_cool_catalyst.callbacks import InterpretationCallback

    for callback in (InterpretationCallback(), InterpretationCallback(flow=security_flow, attribution="saliency")):
        again = pickle.loads(pickle.dumps(callback))
        assert again.top_k == callback.top_k and again.attribution == callback.attribution
