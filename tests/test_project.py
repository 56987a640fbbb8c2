"""Project: tasks from a DataFrame, labels by task path, datasets over lazy images, persistent splits, errors."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.project import BackboneModel, make_split
from dnn_cool_catalyst.story import add_security_flows

NAN = np.nan


def _write_images(root, n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(root / name)
        names.append(name)
    return names


def _small_table(tmp_path, n=20):
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    root.mkdir()
    present = rng.random(n) < 0.7
    df = pd.DataFrame({
        "img": _write_images(root, n),
        "obj_exists": np.where(rng.random(n) < 0.1, NAN, present.astype(float)),
        "obj_x": np.where(present, rng.integers(0, 30, n).astype(float), NAN),
        "obj_class": np.where(present, rng.integers(0, 4, n).astype(float), NAN),
        "tags": np.where(present, rng.choice(["0,2", "", "1", "2,1,0"], n), None),
    })
    df.loc[0, "obj_x"] = 30.0  # a known maximum: the scale
    conv = dcc.Converters(types={"obj_class": "category"}, image_root=str(root), in_features=6)
    return df, conv


def _backbone(features=6):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, features))


def _localize(project):
    @project.add_flow
    def localize(flow, x, out):
        out += flow.obj_x(x.features)
        out += flow.obj_class(x.features)
        out += flow.tags(x.features)
        return out

    @project.add_flow
    def full_flow(flow, x, out):
        out += flow.obj_exists(x.features)
        out += flow.localize(x) | out.obj_exists
        return out

    return project.get_full_flow()


def test_tasks_from_columns(tmp_path):
    df, conv = _small_table(tmp_path)
    p = dcc.Project(df, "img", ["obj_exists", "obj_x", "obj_class", "tags"], converters=conv,
                    project_dir=tmp_path / "proj")
    assert isinstance(p, dcc.Tasks)
    assert {c: p.columns[c].kind for c in p.columns} == {
        "img": "image", "obj_exists": "binary", "obj_x": "continuous", "obj_class": "category", "tags": "multilabel"}
    assert isinstance(p["obj_exists"], dcc.BinaryClassificationTask)
    assert isinstance(p["obj_x"], dcc.BoundedRegressionTask) and p["obj_x"].scale == 30.0
    assert isinstance(p["obj_class"], dcc.ClassificationTask)
    assert p["obj_class"].module.out_features == df["obj_class"].max() + 1
    assert isinstance(p["tags"], dcc.MultilabelClassificationTask) and p["tags"].module.out_features == 3
    assert p["obj_exists"].module.in_features == 6
    # the scale is what decoding multiplies by: labels come back in pixels
    labels = p.label_data["obj_x"]
    np.testing.assert_allclose(labels * 30.0, df["obj_x"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(p["obj_x"].decode(torch.from_numpy(labels)).numpy(), df["obj_x"].to_numpy(), rtol=1e-6)


def test_labels_keyed_by_path_and_dataset_items(tmp_path):
    df, conv = _small_table(tmp_path)
    p = dcc.Project(df, "img", converters=conv, project_dir=tmp_path / "proj")
    flow = _localize(p)
    labels = p.get_labels("valid")
    assert set(labels) == {"obj_exists", "localize.obj_x", "localize.obj_class", "localize.tags"}
    rows = p.splits["valid"]
    np.testing.assert_array_equal(labels["localize.obj_class"],
                                  df["obj_class"].iloc[rows].fillna(-1).to_numpy().astype(np.int64))
    ds = p.get_dataset("train")
    assert len(ds) == len(p.splits["train"])
    x, y = ds[1]
    assert x["img"].shape == (3, 8, 8) and 0 <= float(x["img"].min()) and float(x["img"].max()) <= 1
    i = int(p.splits["train"][1])
    expected = np.asarray(Image.open(tmp_path / "images" / df["img"][i]), dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(x["img"].numpy(), expected, rtol=1e-6)
    assert set(x["gt"]) == {"obj_exists"}
    torch.testing.assert_close(y["localize.tags"], torch.from_numpy(p.label_data["tags"][i]), equal_nan=True)
    # a model maps img -> features; loss and gradients flow through the backbone
    torch.manual_seed(0)
    model = BackboneModel(_backbone(), flow)
    xb, yb = next(iter(p.loaders(batch_size=5)["train"]))
    assert xb["img"].shape == (5, 3, 8, 8) and xb["index"].shape == (5,)
    out = model(xb)
    assert set(out["logits"]) == set(flow.graph.paths)
    loss = flow.get_loss()(out, yb)
    loss.backward()
    assert torch.isfinite(loss) and model.backbone[0].weight.grad.abs().sum() > 0
    assert model.flow.localize.obj_x is p["obj_x"].module
    model.eval()
    with torch.no_grad():
        decoded = model({"img": xb["img"]})["decoded"]
    assert decoded["localize.obj_x"].min() >= 0 and decoded["localize.obj_x"].max() <= 30.0


def test_rows_and_inputs(tmp_path):
    df = pd.DataFrame({"a": [0.5, -1.0, 2.0, NAN], "b": [1, 0, 1, 1], "t": ["x", "y", "z", "w"],
                       "y": [0.0, 1.0, NAN, 1.0]})
    p = dcc.Project(df, ["a", "b"], "y")

    @p.add_flow
    def f(flow, x, out):
        out += flow.y(x.a)
        return out

    inputs = p.get_inputs([2, 0])
    np.testing.assert_array_equal(inputs["a"], [2.0, 0.5])  # inputs are not scaled
    assert inputs["a"].dtype == np.float32 and set(inputs) == {"a", "b"}
    np.testing.assert_array_equal(p.rows(np.array([True, False, False, True])), [0, 3])
    np.testing.assert_array_equal(p.rows(slice(1, 3)), [1, 2])
    np.testing.assert_array_equal(p.rows([-1]), [3])
    with pytest.raises(KeyError, match="no split 'tran'"):
        p.rows("tran")
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        p.rows([4])
    ds = p.get_dataset([1, 3])
    x, y = ds[0]
    assert float(x["a"]) == -1.0 and float(y["y"]) == 1.0
    with pytest.raises(ValueError, match="project_dir"):
        p.runner(None, "r")


def test_split_saved_reused_and_checked(tmp_path):
    df, conv = _small_table(tmp_path)
    proj = tmp_path / "proj"
    p = dcc.Project(df, "img", converters=conv, project_dir=proj, split=(0.6, 0.2, 0.2), seed=3)
    path = proj / "split.json"
    saved = json.loads(path.read_text())
    assert saved["num_rows"] == 20 and [len(saved[k]) for k in ("train", "valid", "test")] == [12, 4, 4]
    assert sorted(saved["train"] + saved["valid"] + saved["test"]) == list(range(20))
    assert [f for f in os.listdir(proj) if f.endswith(".tmp")] == []
    # a different seed would give a different split; the saved one is reused as it is
    assert not np.array_equal(make_split(20, (0.6, 0.2, 0.2), 4)["test"], p.splits["test"])
    again = dcc.Project(df, "img", converters=conv, project_dir=proj, split=(0.6, 0.2, 0.2), seed=3)
    for k in ("train", "valid", "test"):
        np.testing.assert_array_equal(again.splits[k], p.splits[k])
    with pytest.raises(dcc.TableError, match=r"split\.json.*20 rows.*has 19"):
        dcc.Project(df.iloc[:19], "img", converters=conv, project_dir=proj, split=(0.6, 0.2, 0.2), seed=3)
    with pytest.raises(dcc.TableError, match=r"split\.json.*different table"):
        dcc.Project(df.iloc[::-1].reset_index(drop=True), "img", converters=conv, project_dir=proj,
                    split=(0.6, 0.2, 0.2), seed=3)
    with pytest.raises(dcc.TableError, match=r"split\.json.*fractions=\[0\.6, 0\.2, 0\.2\], seed=3"):
        dcc.Project(df, "img", converters=conv, project_dir=proj)
    path.write_text("{not json")
    with pytest.raises(dcc.TableError, match=r"split\.json.*unreadable"):
        dcc.Project(df, "img", converters=conv, project_dir=proj, split=(0.6, 0.2, 0.2), seed=3)


def test_make_split_is_seeded_partition():
    a, b = make_split(101, (0.7, 0.2, 0.1), seed=5), make_split(101, (0.7, 0.2, 0.1), seed=5)
    assert [len(a[k]) for k in ("train", "valid", "test")] == [71, 20, 10]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(101))
    with pytest.raises(ValueError, match="summing to 1"):
        make_split(10, (0.5, 0.2, 0.2))


def test_bad_tables_raise_clear_errors(tmp_path):
    df, conv = _small_table(tmp_path)
    with pytest.raises(dcc.TableError, match=r"output_col: unknown column 'obj_clas'.*did you mean 'obj_class'"):
        dcc.Project(df, "img", ["obj_clas"], converters=conv)
    with pytest.raises(dcc.TableError, match=r"input_col: unknown column 'image'"):
        dcc.Project(df, "image", ["obj_x"], converters=conv)
    bad = df.copy()
    bad.loc[7, "obj_exists"] = 3.0
    # one stray 3.0 in a 0/1 column used to be guessed a bounded regression, silently
    with pytest.raises(dcc.TableError, match=r"column 'obj_exists' is almost binary: 1 of the 18 values is not 0 "
                                             r"or 1: row 7 \(3\.0\).*Converters\(types=\{'obj_exists': 'binary'\}\)"):
        dcc.Project(bad, "img", converters=conv)
    conv.types["obj_exists"] = "binary"
    with pytest.raises(dcc.TableError, match=r"column 'obj_exists', row 7: 3\.0 is not a binary value"):
        dcc.Project(bad, "img", converters=conv)
    bad = df.copy()
    bad["obj_x"] = NAN
    with pytest.raises(dcc.TableError, match=r"output column 'obj_x': every value is missing"):
        dcc.Project(bad, "img", converters=conv)
    bad = df.copy()
    bad.loc[4, "img"] = "missing.png"
    with pytest.raises(dcc.TableError, match=r"column 'img', row 4: image file .*missing\.png' does not exist"):
        dcc.Project(bad, "img", converters=conv)
    with pytest.raises(dcc.TableError, match="both input and output"):
        dcc.Project(df, "img", ["img", "obj_x"], converters=conv)
    with pytest.raises(dcc.TableError, match="'obj x' cannot name a task"):
        dcc.Project(df.rename(columns={"obj_x": "obj x"}), "img", converters=conv)
    with pytest.raises(dcc.TableError, match="column 'img' holds image values and has no default task"):
        dcc.Project(df, "obj_x", ["img"], converters=dcc.Converters(image_root=conv.image_root))
    p = dcc.Project(df, "img", ["obj_exists"], converters=conv)
    p.add_task(dcc.BinaryClassificationTask("extra", nn.Linear(6, 1)))

    @p.add_flow
    def f(flow, x, out):
        out += flow.obj_exists(x.features)
        out += flow.extra(x.features)
        return out

    with pytest.raises(dcc.LabelError, match="task 'extra' of flow 'f' has no output column 'extra'"):
        p.get_labels()


def test_overrides_per_column_and_kind(tmp_path):
    df, conv = _small_table(tmp_path)
    seen = []

    def head(name, in_features, n_outputs):
        seen.append((name, in_features, n_outputs))
        return nn.Sequential(nn.Dropout(0.1), nn.Linear(in_features, n_outputs))

    conv.heads = {"category": head}
    conv.tasks = {"obj_exists": lambda column, module: dcc.BinaryClassificationTask(column.name, module, weight=2.0)}
    conv.values = {"obj_x": lambda series, column: (series.to_numpy() / 60.0).astype(np.float32)}
    p = dcc.Project(df, "img", converters=conv)
    assert seen == [("obj_class", 6, int(df["obj_class"].max()) + 1)]
    assert isinstance(p["obj_class"].module, nn.Sequential)
    assert p["obj_exists"].weight == 2.0
    np.testing.assert_allclose(p.label_data["obj_x"], df["obj_x"].to_numpy() / 60.0, rtol=1e-6)
    # a converter that produces labels the task rejects fails while the project is built
    conv.values = {"obj_x": lambda series, column: series.to_numpy(copy=True)}
    with pytest.raises(dcc.LabelError, match=r"obj_x.*\[0, 1\]"):
        dcc.Project(df, "img", converters=conv)


def _story_table(tmp_path, n=24):
    """The security story's DataFrame shape, built by hand (pixels, NaN where not annotated)."""
    rng = np.random.default_rng(7)
    root = tmp_path / "story"
    root.mkdir()
    blocked = (rng.random(n) < 0.2).astype(float)
    door_open = np.where(blocked == 1, NAN, rng.random(n) < 0.6)
    door_locked = np.where(door_open == 0, rng.random(n) < 0.5, NAN)
    person = np.where(door_open == 1, rng.random(n) < 0.7, NAN)
    has = person == 1
    data = {"img": _write_images(root, n, size=16), "camera_blocked": blocked, "door_open": door_open,
            "door_locked": door_locked, "person_present": person}
    for box in ("face", "body"):
        for part in ("x1", "y1", "w", "h"):
            data[f"{box}_{part}"] = np.where(has, rng.integers(1, 16, n).astype(float), NAN)
    data["facial_characteristics"] = np.where(has, rng.choice(["0,2", "", "1", "0,1,2"], n), None)
    data["shirt_type"] = np.where(has, rng.integers(0, 7, n).astype(float), NAN)
    data["camera_blocked"][3] = NAN  # unknown parent, known child
    data["door_open"][3] = 1.0
    return pd.DataFrame(data), root


def test_story_flows_on_a_project(tmp_path):
    from dnn_cool_catalyst.story import FACIAL_CHARACTERISTICS, SHIRT_TYPES

    df, root = _story_table(tmp_path)
    conv = dcc.Converters(types={"shirt_type": "category"}, image_root=str(root), in_features=6,
                          class_names={"shirt_type": SHIRT_TYPES, "facial_characteristics": FACIAL_CHARACTERISTICS},
                          scales={c: 16.0 for c in df.columns if c[:5] in ("face_", "body_")})
    p = dcc.Project(df, "img", converters=conv, project_dir=tmp_path / "proj")
    add_security_flows(p)
    flow = p.get_full_flow()
    labels = p.get_labels()
    assert set(labels) == set(flow.graph.paths)
    np.testing.assert_allclose(labels["person_regression.face_regression.face_w"] * 16.0, df["face_w"].to_numpy())
    assert labels["person_regression.body_regression.shirt_type"].dtype == np.int64
    torch.manual_seed(0)
    model = BackboneModel(_backbone(6), flow)
    x, y = p.get_dataset(None)[list(range(len(df)))]
    out = model(x)
    loss = flow.get_loss()(out, y)
    assert torch.isfinite(loss)
    # the box applies unless a precondition is known to be false (a missing label is UNKNOWN)
    known_false = (df["camera_blocked"] == 1) | (df["door_open"] == 0) | (df["person_present"] == 0)
    assert out["mask"]["person_regression.face_regression.face_x1"].tolist() == (~known_false).tolist()
    assert out["mask"]["person_regression.face_regression.face_x1"][3]  # camera_blocked unknown, door open


def test_runner_logdir(tmp_path):
    runners = pytest.importorskip("dnn_cool_catalyst.runners")
    if not hasattr(runners, "FlowRunner"):
        pytest.skip("dnn_cool_catalyst.runners.FlowRunner does not exist yet")
    df, conv = _small_table(tmp_path)
    p = dcc.Project(df, "img", converters=conv, project_dir=tmp_path / "proj")
    flow = _localize(p)
    model = BackboneModel(_backbone(), flow)
    runner = p.runner(model, "baseline")
    assert isinstance(runner, runners.FlowRunner)
    logdir = tmp_path / "proj" / "baseline"
    assert os.path.abspath(runner.logdir) == os.path.abspath(logdir)
    runner.train(loaders=p.loaders(batch_size=8), num_epochs=1)
    assert (logdir / "checkpoints").is_dir() and (logdir / "tuned_params.json").is_file()
    with pytest.raises(ValueError, match="plain directory name"):
        p.runner(model, "../x")


def test_samples_are_named_by_row_label_and_file(tmp_path):
    df, conv = _small_table(tmp_path)
    df.index = [f"s{i:02d}" for i in range(len(df))]  # labels that are not positions
    p = dcc.Project(df, "img", converters=conv, project_dir=tmp_path / "proj")
    _localize(p)
    valid = p.splits["valid"]
    ds = p.get_dataset("valid")
    assert ds.describe(1) == {"row": df.index[valid[1]], "file": str(tmp_path / "images" / df["img"].iloc[valid[1]])}
    assert p.sample_names([2, 0]) == {"row": ["s02", "s00"], "file": [str(tmp_path / "images" / "002.png"),
                                                                       str(tmp_path / "images" / "000.png")]}


def test_interpretation_of_a_project_names_rows_and_files(tmp_path):
    runners = pytest.importorskip("dnn_cool_catalyst.runners")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    df, conv = _small_table(tmp_path, n=30)
    df.index = [f"s{i:02d}" for i in range(len(df))]
    p = dcc.Project(df, "img", converters=conv, project_dir=tmp_path / "proj", split=(0.5, 0.5, 0.0))
    flow = _localize(p)
    torch.manual_seed(0)
    runner = p.runner(BackboneModel(_backbone(), flow), "named")
    runner.train(loaders=p.loaders(batch_size=4), num_epochs=1)  # valid: batches of 4 with X["index"]
    logdir = tmp_path / "proj" / "named"
    table = pd.read_csv(logdir / "interpretation_valid.csv")
    assert {"dataset_index", "row", "file"} <= set(table.columns)
    rows = p.splits["valid"][table["dataset_index"].to_numpy()]
    assert table["row"].tolist() == df.index[rows].tolist()
    assert table["file"].tolist() == [str(tmp_path / "images" / name) for name in df["img"].iloc[rows]]
    ea = EventAccumulator(str(logdir / "tensorboard" / "valid"), size_guidance={"tensors": 0, "images": 0})
    ea.Reload()

    def text(tag):
        return ea.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()

    first = df.index[p.splits["valid"][0]]
    assert f"inp 0 (row '{first}', file {tmp_path / 'images' / df['img'].iloc[p.splits['valid'][0]]})" in text(
        "explanations/sample_0")
    worst = table[table["task_path"] == "obj_exists"].iloc[0]
    assert f"| 1 | {worst['dataset_index']} | {worst['row']} | {worst['file']} |" in text("obj_exists/interpretation")
    image = ea.Images("obj_exists/worst/1/img")[-1]
    assert image.height > 8  # the 8x8 image and its caption strip


def _labels_table(pets, x, flag):
    n = len(pets)
    return pd.DataFrame({"a": np.arange(n, dtype=float), "pet": pets, "x": x, "flag": np.asarray(flag, dtype=np.int64)})


def test_guessed_classes_scales_and_kinds_are_saved_and_reused(tmp_path):
    proj = tmp_path / "proj"
    first = _labels_table(["bird", "cat", "dog", "cat"] * 5, [40.0, 10.0, NAN, 20.0] * 5, [0, 1, 2, 1] * 5)
    p = dcc.Project(first, "a", project_dir=proj)
    assert p.columns["pet"].class_names == ("bird", "cat", "dog") and p.columns["x"].scale == 40.0
    saved = json.loads((proj / "columns.json").read_text())
    assert saved["columns"]["pet"] == {"kind": "category", "class_names": ["bird", "cat", "dog"], "scale": None}
    assert saved["columns"]["x"]["scale"] == 40.0 and saved["columns"]["flag"]["kind"] == "category"
    assert [f for f in os.listdir(proj) if f.endswith(".tmp")] == []
    # A second table without "bird", smaller x and only 0/1 flags: guessed alone it would give
    # cat index 0, scale 20 and a binary flag; the saved description keeps the indices and units.
    second = _labels_table(["cat", "dog", "cat", "cat"] * 5, [20.0, 10.0, NAN, 5.0] * 5, [0, 1, 0, 1] * 5)
    again = dcc.Project(second, "a", project_dir=proj)
    assert again.columns["pet"].class_names == ("bird", "cat", "dog")
    np.testing.assert_array_equal(again.label_data["pet"][:4], [1, 2, 1, 1])
    assert again.columns["x"].scale == 40.0
    np.testing.assert_allclose(again.label_data["x"][:2], [0.5, 0.25])
    assert again.columns["flag"].kind == "category" and again.columns["flag"].class_names == ("0", "1", "2")
    assert dcc.Project(second, "a").columns["pet"].class_names == ("cat", "dog")  # no project_dir: guessed
    # told values that agree with the saved ones are fine
    dcc.Project(second, "a", project_dir=proj, converters=dcc.Converters(
        types={"pet": "category"}, class_names={"pet": ["bird", "cat", "dog"]}, scales={"x": 40}))


def test_saved_column_descriptions_refuse_unknown_values_and_contradictions(tmp_path):
    proj = tmp_path / "proj"
    first = _labels_table(["bird", "cat", "dog", "cat"] * 5, [40.0, 10.0, NAN, 20.0] * 5, [0, 1, 2, 1] * 5)
    dcc.Project(first, "a", project_dir=proj)
    before = (proj / "columns.json").read_bytes()
    fish = first.copy()
    fish.loc[[3, 9], "pet"] = "fish"
    fish.loc[5, "pet"] = "cow"
    with pytest.raises(dcc.TableError, match=r"column 'pet' holds 'cow', 'fish' \(rows 3, 5, 9\), which are not "
                                             r"among the class names \['bird', 'cat', 'dog'\] saved in .*columns\.json'"
                                             r".*delete .*columns\.json"):
        dcc.Project(fish, "a", project_dir=proj)
    big = first.assign(flag=[0, 1, 2, 3] * 5)
    with pytest.raises(dcc.TableError, match=r"column 'flag' holds class index 3 \(rows 3, 7, 11, 15, 19\).*3 "
                                             r"classes .*columns\.json"):
        dcc.Project(big, "a", project_dir=proj)
    wide = first.assign(x=[80.0, 10.0, NAN, 20.0] * 5)
    with pytest.raises(dcc.TableError, match=r"column 'x', row 0: 80\.0 is above the scale 40 saved in .*columns\.json"):
        dcc.Project(wide, "a", project_dir=proj)
    with pytest.raises(dcc.TableError, match=r"column 'pet': Converters.class_names says \['dog', 'cat', 'bird'\], "
                                             r"but .*columns\.json' saved \['bird', 'cat', 'dog'\]"):
        dcc.Project(first, "a", project_dir=proj, converters=dcc.Converters(class_names={"pet": ["dog", "cat", "bird"]}))
    with pytest.raises(dcc.TableError, match=r"column 'x': Converters.scales says 64\.0, but .*columns\.json' saved 40\.0"):
        dcc.Project(first, "a", project_dir=proj, converters=dcc.Converters(scales={"x": 64.0}))
    with pytest.raises(dcc.TableError, match=r"column 'flag': Converters.types says 'continuous', but .*columns\.json"
                                             r"' saved 'category'"):
        dcc.Project(first, "a", project_dir=proj, converters=dcc.Converters(types={"flag": "continuous"}))
    assert (proj / "columns.json").read_bytes() == before  # a refused table changes nothing
    (proj / "columns.json").write_text('{"columns": {"pet": {"kind": "animal"}}}')
    with pytest.raises(dcc.TableError, match=r"columns\.json.*'pet'.*delete it"):
        dcc.Project(first, "a", project_dir=proj)
    os.remove(proj / "columns.json")  # starting afresh: guessed again from this table
    assert dcc.Project(first.assign(flag=[0, 1] * 10), "a", project_dir=proj).columns["flag"].kind == "binary"


def test_image_of_another_size_names_the_files_and_sizes(tmp_path):
    df, conv = _small_table(tmp_path)
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / "images" / df["img"][5])
    p = dcc.Project(df, "img", converters=conv)
    _localize(p)
    batch = p.loader(rows=[0, 1, 5, 6], batch_size=4)
    # torch.stack alone says "stack expects each tensor to be equal size", naming no file
    with pytest.raises(dcc.InputError, match=r"input 'img': samples of one batch differ in shape: sample 2 "
                                             r"\('.*005\.png'\) is \(3, 12, 10\), but sample 0 \('.*000\.png'\) is "
                                             r"\(3, 8, 8\).*resize"):
        next(iter(batch))
    next(iter(p.loader(rows=[0, 1, 6], batch_size=4)))  # the others still batch


def _numeric_table(n=40):
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"age": rng.integers(20, 80, n).astype(float), "height": rng.normal(170, 10, n),
                       "smoker": rng.integers(0, 2, n).astype(float)})
    df["sick"] = (df["age"] > 50).astype(float)
    df["dose"] = np.where(df["sick"] == 1, df["age"] / 2, NAN)
    return df


def test_numeric_input_columns_just_work(tmp_path):
    """Numeric input columns are stacked into x.features (in input_col order) and size the heads:
    DataFrame -> Project -> flow -> train -> evaluate, with no other argument."""
    df = _numeric_table()
    project = dcc.Project(df, input_col=["age", "height", "smoker"], project_dir=tmp_path / "p")

    @project.add_flow
    def full(flow, x, out):
        out += flow.sick(x.features)
        out += flow.dose(x.features) | out.sick
        return out

    assert project.in_features == 3 and project["sick"].module.in_features == 3
    x, _ = project.get_dataset("train")[[0, 1]]
    first = project.splits["train"][:2]
    np.testing.assert_array_equal(x["features"].numpy(), df[["age", "height", "smoker"]].to_numpy(np.float32)[first])
    assert x["features"].dtype == torch.float32
    runner = project.runner()
    runner.train(loaders=project.loaders())
    table = runner.evaluate(project.loader("test"))
    assert set(table["task_path"]) == {"sick", "dose"}


def test_numeric_inputs_explicit_width_and_missing_values(tmp_path):
    df = _numeric_table()
    wide = dcc.Project(df, input_col=["age", "height"], converters=dcc.Converters(in_features=5))
    assert wide["sick"].module.in_features == 5  # told: kept (the model then computes x.features)
    df.loc[df.index[4], "height"] = NAN
    project = dcc.Project(df, input_col=["age", "height"])
    project.add_flow(_one_task_flow)
    with pytest.raises(dcc.TableError, match=r"column 'height', row 4: .*missing.*x.features.*fillna"):
        project.get_dataset()
    project.get_dataset(np.arange(4))  # rows without missing values are fine


def _one_task_flow(flow, x, out):
    out += flow.sick(x.features)
    return out


def test_non_numeric_inputs_keep_the_backbone_width():
    df = pd.DataFrame({"txt": ["a b", "c", "d e f"] * 4, "sick": [0.0, 1.0, 1.0] * 4})
    project = dcc.Project(df, input_col="txt", converters=dcc.Converters(types={"txt": "text"}))
    assert project.feature_cols == [] and project["sick"].module.in_features == 256


def test_images_are_decoded_once_and_the_log_says_so(tmp_path, monkeypatch, capsys):
    df, conv = _small_table(tmp_path)
    project = dcc.Project(df, input_col="img", converters=conv)
    _localize(project)
    assert "keeping decoded images in memory (4 KiB" in capsys.readouterr().out  # 20 images of 8x8x3 bytes
    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real(fp, *a, **k))
    loaders = project.loaders(batch_size=8)
    for _ in range(2):  # two epochs: the second reads no file
        for loader in loaders.values():
            for _x, _y in loader:
                pass
    assert len(opened) == len(set(opened)) == len(project.splits["train"]) + len(project.splits["valid"])
    assert project.image_cache.used == 192 * len(opened)
    small = dcc.Project(df, input_col="img", converters=dcc.Converters(
        types={"obj_class": "category"}, image_root=conv.image_root, image_cache_bytes=1000))
    assert "images exceed the cache budget (4 KiB > Converters.image_cache_bytes = 1 KiB)" in capsys.readouterr().out
    _localize(small)
    for _x, _y in small.loader("train", batch_size=8):
        pass
    assert small.image_cache.used <= 1000 and len(small.image_cache) == 5 and small.image_cache.full


# Several tables -------------------------------------------------------------------------------------

def _two_tables(n_a=30, n_b=20):
    """Table "clinic" labels `sick` only; table "ward" labels `dose` and `ward` (int class indices)."""
    rng = np.random.default_rng(5)
    a = pd.DataFrame({"age": rng.integers(20, 80, n_a).astype(float), "height": rng.normal(170, 10, n_a)})
    a["sick"] = (a["age"] > 50).astype(float)
    b = pd.DataFrame({"height": rng.normal(170, 10, n_b), "age": rng.integers(20, 80, n_b).astype(float)},
                     index=[f"w{i}" for i in range(n_b)])
    b["dose"] = b["age"] / 100
    b["ward"] = rng.integers(0, 3, n_b)
    return a, b


def _two_source_flow(project):
    @project.add_flow
    def full(flow, x, out):
        out += flow.sick(x.features)
        out += flow.dose(x.features)
        out += flow.ward(x.features)
        return out

    return project.get_full_flow()


def test_a_project_from_several_tables(tmp_path):
    a, b = _two_tables()
    project = dcc.Project({"clinic": a, "ward_book": b}, input_col=["age", "height"], project_dir=tmp_path / "p")
    flow = _two_source_flow(project)
    # one converter set over the union of the output columns; `ward` (only in one table) stays a category
    assert project.output_cols == ["sick", "dose", "ward"] and project.sources == ("clinic", "ward_book")
    assert project.columns["ward"].kind == "category" and project.columns["sick"].kind == "binary"
    np.testing.assert_array_equal(project.source_rows["ward_book"], np.arange(30, 50))
    # a seeded split per source, saved per source and the same in the next project
    for name, table in (("clinic", a), ("ward_book", b)):
        expected = make_split(len(table), (0.8, 0.1, 0.1), 0)
        for k in ("train", "valid", "test"):
            np.testing.assert_array_equal(project.source_splits[name][k], project.source_rows[name][expected[k]])
        assert (tmp_path / "p" / f"split_{name}.json").exists()
    assert not (tmp_path / "p" / "split.json").exists()
    again = dcc.Project({"clinic": a, "ward_book": b}, input_col=["age", "height"], project_dir=tmp_path / "p")
    assert all(np.array_equal(again.splits[k], project.splits[k]) for k in project.splits)
    # datasets: one partial source per table, labelled for its own columns only
    ds = project.get_dataset("train")
    assert isinstance(ds, dcc.MixedDataset) and ds.source_names == ("clinic", "ward_book")
    assert ds.labelled_paths("clinic") == {"sick"} and ds.labelled_paths("ward_book") == {"dose", "ward"}
    assert len(ds) == len(project.splits["train"])
    x, y = ds.sources["ward_book"][[0]]
    first = project.source_splits["ward_book"]["train"][0] - 30
    assert torch.isnan(y["sick"]).all() and y["ward"].item() == b["ward"].iloc[first]
    np.testing.assert_array_equal(x["features"].numpy()[0], b[["age", "height"]].to_numpy(np.float32)[first])
    assert ds.describe(1, 0) == {"row": b.index[first], "source": "ward_book"}  # the table's own row label
    # loaders: the train loader mixes as asked, the others take every row once
    loaders = project.loaders(batch_size=8, sampling="uniform", epoch_size=40)
    assert loaders["train"].dataset.sampling == "uniform" and len(loaders["train"].dataset) == 40
    valid = loaders["valid"].dataset
    assert valid.sampling == "proportional" and len(valid) == len(project.splits["valid"])
    seen = sorted((int(s), int(i)) for x, _ in loaders["valid"] for s, i in zip(x["source"], x["index"]))
    assert seen == sorted((p, i) for p, name in enumerate(valid.source_names) for i in range(len(valid.sources[name])))
    assert "Project(50 rows from 2 sources (clinic: 30, ward_book: 20)" in repr(project)
    assert set(flow.graph.paths) == {"sick", "dose", "ward"}


def test_a_project_from_several_tables_trains_and_evaluates_per_source(tmp_path):
    a, b = _two_tables(60, 40)
    project = dcc.Project({"clinic": a, "ward_book": b}, input_col=["age", "height"], project_dir=tmp_path / "p")
    _two_source_flow(project)
    runner = project.runner()
    runner.train(loaders=project.loaders(batch_size=16, sampling="uniform"), num_epochs=1, verbose=False)
    logged = runner.epoch_metrics["valid"]  # through FlowRunner's loader: per-source metrics of the labelled tasks
    assert {"clinic/sick/accuracy", "ward_book/ward/accuracy_1", "ward_book/dose/mean_absolute_error"} <= set(logged)
    assert not any(k.startswith(("clinic/dose", "clinic/ward", "ward_book/sick")) for k in logged)
    assert "clinic/sick/accuracy" in pd.read_csv(tmp_path / "p" / "runner" / "csv_logger" / "valid.csv").columns
    ranked = pd.read_csv(tmp_path / "p" / "runner" / "interpretation_valid.csv")
    assert set(ranked[ranked["task_path"] == "sick"]["source"]) == {"clinic"}  # the interpretation names sources
    table = runner.evaluate(project.loader("test"), verbose=False)
    assert list(table["source"].unique()) == ["", "clinic", "ward_book"]
    assert set(table[table["source"] == "clinic"]["task_path"]) == {"sick"}
    assert set(table[table["source"] == "ward_book"]["task_path"]) == {"dose", "ward"}


def test_several_tables_errors_name_the_table(tmp_path):
    a, b = _two_tables()
    with pytest.raises(dcc.project.TableError, match=r"table 'ward_book' has no input column\(s\) \['height'\]"):
        dcc.Project({"clinic": a, "ward_book": b.drop(columns="height")}, input_col=["age", "height"])
    misspelt = b.rename(columns={"dose": "sik"})  # one column spelt two ways in two tables
    with pytest.raises(dcc.project.TableError, match=r"column 'sick' of table\(s\) \['clinic'\] and column 'sik' of "
                                                     r"table\(s\) \['ward_book'\] look like one column"):
        dcc.Project({"clinic": a, "ward_book": misspelt}, input_col=["age", "height"])
    both = dcc.Project({"clinic": a, "ward_book": misspelt}, input_col=["age", "height"],
                       output_col=["sick", "sik", "ward"])  # named on purpose: two tasks
    assert both.output_cols == ["sick", "sik", "ward"]
    clash = b.assign(sick=["yes"] * len(b))
    with pytest.raises(dcc.project.TableError, match=r"column 'sick' holds different kinds of values in different "
                                                     r"tables \(table 'clinic': numbers; table 'ward_book': str"):
        dcc.Project({"clinic": a, "ward_book": clash}, input_col=["age", "height"])
    with pytest.raises(dcc.project.TableError, match=r"output_col: unknown column 'doze'; did you mean 'dose'\? "
                                                     r"\(columns of tables \['clinic', 'ward_book'\]"):
        dcc.Project({"clinic": a, "ward_book": b}, input_col=["age", "height"], output_col=["sick", "doze"])
    with pytest.raises(TypeError, match="table 'ward_book' is a dict"):
        dcc.Project({"clinic": a, "ward_book": {"age": [1]}}, input_col=["age", "height"])
    with pytest.raises(dcc.project.TableError, match="table 'ward_book' has no rows"):
        dcc.Project({"clinic": a, "ward_book": b.iloc[:0]}, input_col=["age", "height"])
    with pytest.raises(dcc.project.TableError, match="source names must be plain"):
        dcc.Project({"": a}, input_col=["age", "height"])


def test_mixing_options_on_a_one_table_project_are_an_error(tmp_path):
    a, _ = _two_tables()
    project = dcc.Project(a, input_col=["age", "height"], project_dir=tmp_path / "p")

    @project.add_flow
    def full(flow, x, out):
        out += flow.sick(x.features)
        return out

    assert set(project.loaders(batch_size=8)) == {"train", "valid"}  # the defaults: fine
    for option in ({"sampling": "uniform"}, {"temperature": 2.0}, {"epoch_size": 10}):
        with pytest.raises(TypeError, match=f"{next(iter(option))}.*one table"):
            project.loaders(batch_size=8, **option)
