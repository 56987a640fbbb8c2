"""Tests for the synthetic home-security camera dataset generator."""

import io
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from dnn_cool_catalyst import datasets

S = 64
# Pixel noise is "small": a flat drawn area never spreads over more than this per channel.
MAX_FLAT_SPREAD = 12

BOX_COLS = {
    "face": ["face_x1", "face_y1", "face_w", "face_h"],
    "body": ["body_x1", "body_y1", "body_w", "body_h"],
}
PERSON_COLS = BOX_COLS["face"] + BOX_COLS["body"] + ["facial_characteristics", "shirt_type"]


@pytest.fixture(scope="module")
def full():
    """Complete annotations (no random missingness)."""
    return datasets.security(1500, seed=7, missing_rate=0.0)


@pytest.fixture(scope="module")
def persons(full):
    df, images = full
    rows = np.flatnonzero(df["person_present"].to_numpy() == 1)
    assert len(rows) > 200
    return df.iloc[rows], images[rows]


def _box(row, kind):
    x, y, w, h = (int(row[c]) for c in BOX_COLS[kind])
    return x, y, w, h


def _crop(image, box):
    x, y, w, h = box
    return image[y : y + h, x : x + w].astype(np.int16)


def _flags(value):
    return {int(k) for k in value.split(",")} if value else set()


def test_shapes_columns_and_dtypes():
    df, images = datasets.security(30, seed=1, image_size=48)
    assert images.dtype == np.uint8 and images.shape == (30, 48, 48, 3)
    assert list(df.columns) == [
        "img", "camera_blocked", "door_open", "door_locked", "person_present",
        *BOX_COLS["face"], *BOX_COLS["body"], "facial_characteristics", "shirt_type",
    ]
    assert len(df) == 30
    assert df["img"].notna().all() and df["img"].is_unique
    assert all(name.endswith(".png") for name in df["img"])
    for col in df.columns.drop(["img", "facial_characteristics"]):
        assert df[col].dtype == np.float64, col


def test_public_constants():
    assert len(datasets.SHIRT_TYPES) == 7 and len(set(datasets.SHIRT_TYPES)) == 7
    assert len(datasets.FACIAL_CHARACTERISTICS) == 3
    assert len(set(datasets.FACIAL_CHARACTERISTICS)) == 3


def test_deterministic():
    df1, im1 = datasets.security(60, seed=3)
    df2, im2 = datasets.security(60, seed=3)
    assert im1.tobytes() == im2.tobytes()
    pd.testing.assert_frame_equal(df1, df2)
    df3, im3 = datasets.security(60, seed=4)
    assert im1.tobytes() != im3.tobytes()
    assert not df1.drop(columns="img").equals(df3.drop(columns="img"))


@pytest.mark.parametrize("small", [1, 40])
def test_prefix_property(small):
    df_small, im_small = datasets.security(small, seed=5)
    df_big, im_big = datasets.security(90, seed=5)
    np.testing.assert_array_equal(im_big[:small], im_small)
    pd.testing.assert_frame_equal(df_big.iloc[:small], df_small)  # dtypes included


def test_precondition_structure_without_missing(full):
    df, _ = full
    for col in df.columns.drop(["img", "facial_characteristics"]):
        values = df[col].dropna()
        if col in ("camera_blocked", "door_open", "door_locked", "person_present"):
            assert values.isin([0.0, 1.0]).all(), col
    assert df["camera_blocked"].notna().all()
    np.testing.assert_array_equal(df["door_open"].notna(), df["camera_blocked"] == 0)
    np.testing.assert_array_equal(df["door_locked"].notna(), df["door_open"] == 0)
    np.testing.assert_array_equal(df["person_present"].notna(), df["door_open"] == 1)
    for col in PERSON_COLS:
        np.testing.assert_array_equal(df[col].notna(), df["person_present"] == 1, err_msg=col)


def test_label_distribution(full):
    df, _ = full
    assert abs((df["camera_blocked"] == 1).mean() - 0.20) < 0.04
    assert abs(df["door_open"].mean() - 0.55) < 0.06
    assert abs(df["person_present"].mean() - 0.70) < 0.07
    assert abs(df["door_locked"].mean() - 0.50) < 0.07
    present = df[df["person_present"] == 1]
    assert set(present["shirt_type"].astype(int)) == set(range(len(datasets.SHIRT_TYPES)))
    flags = [_flags(v) for v in present["facial_characteristics"]]
    for k in range(len(datasets.FACIAL_CHARACTERISTICS)):
        assert 0.2 < np.mean([k in f for f in flags]) < 0.6
    assert any(not f for f in flags)


def test_label_formats(persons):
    df, _ = persons
    n_classes = len(datasets.FACIAL_CHARACTERISTICS)
    for value in df["facial_characteristics"]:
        assert isinstance(value, str)
        if value:
            parts = [int(p) for p in value.split(",")]
            assert parts == sorted(set(parts))
            assert all(0 <= p < n_classes for p in parts)
    shirt = df["shirt_type"].to_numpy()
    assert np.all(shirt == np.round(shirt)) and shirt.min() >= 0 and shirt.max() < len(datasets.SHIRT_TYPES)


def test_missing_rate_only_blanks_applicable_cells(full):
    df_full, im_full = full
    df_miss, im_miss = datasets.security(len(df_full), seed=7, missing_rate=0.3)
    assert im_miss.tobytes() == im_full.tobytes()
    pd.testing.assert_series_equal(df_miss["img"], df_full["img"])
    applicable = blanked = 0
    for col in df_full.columns.drop("img"):
        known = df_miss[col].notna()
        # Never fills a cell that does not apply, never changes a value.
        assert not (known & df_full[col].isna()).any(), col
        assert (df_miss.loc[known, col] == df_full.loc[known, col]).all(), col
        applicable += df_full[col].notna().sum()
        blanked += (df_full[col].notna() & df_miss[col].isna()).sum()
    assert 0.22 < blanked / applicable < 0.38
    # Parents are masked independently: children can be known while a parent is missing.
    assert (df_miss["camera_blocked"].isna() & df_miss["door_open"].notna()).any()
    assert (df_miss["door_open"].isna() & df_miss["person_present"].notna()).any()
    # Structure still holds for whatever is known.
    assert not ((df_miss["camera_blocked"] == 1) & df_miss["door_open"].notna()).any()
    assert not ((df_miss["door_open"] == 1) & df_miss["door_locked"].notna()).any()
    assert not ((df_miss["door_open"] == 0) & df_miss["person_present"].notna()).any()
    for col in PERSON_COLS:
        assert not ((df_miss["person_present"] == 0) & df_miss[col].notna()).any(), col
    # A box is annotated or missing as a whole.
    for cols in BOX_COLS.values():
        counts = df_miss[cols].notna().sum(axis=1)
        assert counts.isin([0, 4]).all()


def test_default_missing_rate_blanks_some_cells():
    df, _ = datasets.security(400, seed=2)
    assert df["camera_blocked"].isna().any()
    assert df["camera_blocked"].notna().mean() > 0.85


@pytest.mark.parametrize("image_size", [32, 64, 100])
def test_boxes_inside_image(image_size):
    df, _ = datasets.security(300, seed=11, image_size=image_size, missing_rate=0.0)
    p = df[df["person_present"] == 1]
    assert len(p) > 30
    for kind, (x, y, w, h) in BOX_COLS.items():
        vals = p[[x, y, w, h]].to_numpy()
        assert np.all(vals == np.round(vals)), kind
        assert np.all(vals[:, :2] >= 0) and np.all(vals[:, 2:] >= 1), kind
        assert np.all(vals[:, 0] + vals[:, 2] <= image_size), kind
        assert np.all(vals[:, 1] + vals[:, 3] <= image_size), kind
    assert np.all(p["face_y1"] + p["face_h"] <= p["body_y1"])


def test_body_box_is_filled_with_one_colour(persons):
    df, images = persons
    for (_, row), image in zip(df.iterrows(), images):
        x, y, w, h = box = _box(row, "body")
        crop = _crop(image, box)
        spread = crop.reshape(-1, 3).max(0) - crop.reshape(-1, 3).min(0)
        assert np.all(spread <= MAX_FLAT_SPREAD), row["img"]
        colour = crop.reshape(-1, 3).mean(0)
        # The box is tight: a line just outside each edge is not mostly shirt-coloured.
        outside = []
        if y > 0:
            outside.append(image[y - 1, x : x + w])
        if y + h < S:
            outside.append(image[y + h, x : x + w])
        if x > 0:
            outside.append(image[y : y + h, x - 1])
        if x + w < S:
            outside.append(image[y : y + h, x + w])
        for line in outside:
            close = np.all(np.abs(line.astype(np.int16) - colour) <= MAX_FLAT_SPREAD, axis=-1)
            assert close.mean() < 0.5, row["img"]


def test_shirt_colour_matches_shirt_type(persons):
    df, images = persons
    colours = np.array([_crop(im, _box(row, "body")).reshape(-1, 3).mean(0)
                        for (_, row), im in zip(df.iterrows(), images)])
    types = df["shirt_type"].astype(int).to_numpy()
    centroids = np.array([colours[types == t].mean(0) for t in range(len(datasets.SHIRT_TYPES))])
    # Same type, same colour ...
    assert np.linalg.norm(colours - centroids[types], axis=1).max() < 5
    # ... and the 7 colours are well separated.
    dists = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    assert dists[~np.eye(len(centroids), dtype=bool)].min() > 60


def test_facial_characteristics_are_drawn_in_face_box(persons):
    df, images = persons
    glasses, beard, hat = (datasets.FACIAL_CHARACTERISTICS.index(k) for k in ("glasses", "beard", "hat"))
    seen = set()
    for (_, row), image in zip(df.iterrows(), images):
        crop = _crop(image, _box(row, "face"))
        flags = _flags(row["facial_characteristics"])
        seen |= flags
        spread = crop.reshape(-1, 3).max(0) - crop.reshape(-1, 3).min(0)
        assert np.all(spread <= MAX_FLAT_SPREAD) == (not flags), row["img"]
        brightness = crop.mean(axis=(1, 2))  # per row of the face box
        assert (brightness[0] > 228) == (hat in flags), row["img"]  # white top band
        assert (brightness[-1] < 80) == (beard in flags), row["img"]  # dark lower band
        assert (brightness.min() < 26) == (glasses in flags), row["img"]  # black band
    assert seen == {glasses, beard, hat}


def test_blocked_camera_images_are_nearly_uniform(full):
    df, images = full
    spread = images.reshape(len(images), -1, 3).max(1).astype(int) - images.reshape(len(images), -1, 3).min(1)
    blocked = df["camera_blocked"].to_numpy() == 1
    assert blocked.any() and (~blocked).any()
    assert np.all(spread[blocked] <= MAX_FLAT_SPREAD)
    assert np.all(spread[~blocked].max(1) > 40)
    assert np.all(images[blocked].mean(axis=(1, 2, 3)) < 60)


def test_lock_marker_visible_only_on_locked_doors(full):
    df, images = full
    im = images.astype(np.int16)
    bright_yellow = (im[..., 0] > 220) & (im[..., 1] > 200) & (im[..., 2] < 110)
    has_marker = bright_yellow.any(axis=(1, 2))
    closed = df["door_open"].to_numpy() == 0
    locked = df["door_locked"].to_numpy() == 1
    assert locked.any() and (closed & ~locked).any()
    np.testing.assert_array_equal(has_marker[closed], locked[closed])


def test_png_round_trip(tmp_path):
    root = tmp_path / "security"
    df, images = datasets.security(80, seed=9, root=root)
    assert (df["facial_characteristics"] == "").any() and df["facial_characteristics"].isna().any()
    assert sorted(os.listdir(root)) == sorted(list(df["img"]) + ["labels.csv", "generation.json"])  # no temp leftovers
    np.testing.assert_array_equal(datasets.load_images(root, df["img"]), images)
    np.testing.assert_array_equal(datasets.load_images(str(root), list(df["img"][3:5])), images[3:5])
    labels = pd.read_csv(root / "labels.csv", keep_default_na=False, na_values=["NaN"])
    pd.testing.assert_frame_equal(labels, df, check_dtype=False)
    assert (labels["facial_characteristics"] == "").any()  # "" (none) survives, unlike NaN

    # Rewriting into an existing directory replaces the files.
    df2, images2 = datasets.security(80, seed=10, root=root)
    np.testing.assert_array_equal(datasets.load_images(root, df2["img"]), images2)
    assert len(os.listdir(root)) == 82


def test_load_images_missing_file(tmp_path):
    df, _ = datasets.security(3, seed=0, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        datasets.load_images(tmp_path, [df["img"][0], "nope.png"])


def test_load_images_empty(tmp_path):
    assert datasets.load_images(tmp_path, []).shape[0] == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": 0}, "n"),
        ({"n": -5}, "n"),
        ({"n": 2.5}, "n"),
        ({"n": "10"}, "n"),
        ({"n": True}, "n"),
        ({"n": 5, "seed": -1}, "seed"),
        ({"n": 5, "image_size": 31}, "image_size"),
        ({"n": 5, "image_size": 64.0}, "image_size"),
        ({"n": 5, "missing_rate": -0.01}, "missing_rate"),
        ({"n": 5, "missing_rate": 1.0}, "missing_rate"),
        ({"n": 5, "missing_rate": math.nan}, "missing_rate"),
    ],
)
def test_argument_validation(kwargs, name, tmp_path):
    root = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"^{name}\b") as info:
        datasets.security(root=root, **kwargs)
    assert repr(kwargs[name]) in str(info.value)
    assert not root.exists()  # nothing written on bad input


def test_accepts_numpy_integers():
    df, images = datasets.security(np.int64(4), seed=np.int32(2), image_size=np.int64(32))
    assert images.shape == (4, 32, 32, 3) and len(df) == 4


def _table(df):
    """`df` as `labels.csv` reads back (string columns as pandas reads them)."""
    return pd.read_csv(io.StringIO(df.to_csv(index=False, na_rep="NaN")), keep_default_na=False, na_values=["NaN"])


def test_demo_regenerates_data_made_with_another_seed_or_size(tmp_path):
    from dnn_cool_catalyst.demo import load_story_table

    root = tmp_path / "data"
    datasets.security(20, seed=1, root=root)
    # same n, another seed: the seed-1 table used to be reused silently
    pd.testing.assert_frame_equal(load_story_table(str(root), 20, seed=2), _table(datasets.security(20, seed=2)[0]))
    assert json.loads((root / "generation.json").read_text())["seed"] == 2
    df, images = datasets.security(12, seed=2)
    pd.testing.assert_frame_equal(load_story_table(str(root), 12, seed=2), _table(df))
    np.testing.assert_array_equal(datasets.load_images(root, df["img"]), images)
    assert sorted(os.listdir(root)) == sorted(list(df["img"]) + ["labels.csv", "generation.json"])  # 12..19 removed


def test_security_table_reuses_only_a_complete_matching_generation(tmp_path):
    root = tmp_path / "data"
    df, _ = datasets.security(10, seed=3, root=root)
    stamp = (root / "labels.csv").stat().st_mtime_ns
    pd.testing.assert_frame_equal(datasets.security_table(root, 10, seed=3), _table(df))
    assert (root / "labels.csv").stat().st_mtime_ns == stamp  # reused, not rewritten
    other, _ = datasets.security(10, seed=3, missing_rate=0.5)
    pd.testing.assert_frame_equal(datasets.security_table(root, 10, seed=3, missing_rate=0.5), _table(other))
    # an interrupted generation leaves no record (it is removed first, written last): regenerated
    (root / "generation.json").unlink()
    (root / "labels.csv").write_text("img\n000000.png\n")
    pd.testing.assert_frame_equal(datasets.security_table(root, 10, seed=3, missing_rate=0.5), _table(other))
    (root / "generation.json").write_text("{not json")
    pd.testing.assert_frame_equal(datasets.security_table(root, 10, seed=3), _table(df))
    with pytest.raises(ValueError, match=r"^seed"):
        datasets.security_table(root, 10, seed=-1)
