"""converters: kind guessing, value conversion with missing markers, class/scale inference, images, errors."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dnn_cool_catalyst.converters import (
    Column, Converters, ImageCache, ImageFiles, TableError, guess_kind, load_image, parse_multilabel, to_binary, to_category,
    to_continuous, to_images, to_multilabel, to_text,
)

NAN = np.nan


@pytest.mark.parametrize("values, dtype, kind", [
    ([True, False, True], None, "binary"),
    ([0.0, 1.0, NAN], None, "binary"),
    ([True, NAN, False], object, "binary"),
    ([0.5, 12.0, NAN], None, "continuous"),
    ([3.0, 7.0, 4.0], None, "continuous"),  # whole-number floats stay continuous
    ([0, 2, 3], "int64", "category"),
    ([0, 200, 3], "int64", "continuous"),  # beyond max_categories
    ([-1, 2, 3], "int64", "continuous"),
    (["cat", "dog", NAN], None, "category"),
    (["0,2", "", NAN, "1"], None, "multilabel"),
    (["a.png", "b.JPG"], None, "image"),
    ([[0, 2], [], [1]], object, "multilabel"),
])
def test_guess_kind(values, dtype, kind):
    assert guess_kind(pd.Series(values, dtype=dtype, name="c")) == kind


def test_guess_kind_text_categorical_and_failures():
    many = pd.Series([f"sentence number {i}" for i in range(60)], name="t")
    assert guess_kind(many) == "text"
    assert guess_kind(many, max_categories=100) == "category"
    assert guess_kind(pd.Series(pd.Categorical(["a", "b", "a"]), name="c")) == "category"
    with pytest.raises(TableError, match=r"'c'.*every value is missing"):
        guess_kind(pd.Series([NAN, NAN], name="c"))
    with pytest.raises(TableError, match=r"'c'.*cannot guess.*types"):
        guess_kind(pd.Series([{"a": 1}, {"b": 2}], name="c"))


def test_binary_values_and_row_errors():
    s = pd.Series([1.0, NAN, 0.0, True], dtype=object, index=["r0", "r1", "r2", "r3"], name="door_open")
    out = to_binary(s, Column("door_open", "binary"))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1, NAN, 0, 1])
    bad = pd.Series([0.0, 1.0, 2.0, 5.0], index=["a", "b", "c", "d"], name="door_open")
    with pytest.raises(TableError, match=r"column 'door_open', row 'c': 2\.0 is not a binary value.*2 such"):
        to_binary(bad, Column("door_open", "binary"))
    words = pd.Series(["yes", "no"], name="door_open")
    with pytest.raises(TableError, match=r"row 0: 'yes' is not a number"):
        to_binary(words, Column("door_open", "binary"))


def test_continuous_scaled_by_max_or_given_scale():
    s = pd.Series([10.0, NAN, 40.0, 0.0], name="x")
    column = Converters().describe(s, "output")
    assert column.kind == "continuous" and column.scale == 40.0
    np.testing.assert_allclose(to_continuous(s, column), [0.25, NAN, 1.0, 0.0])
    column = Converters(scales={"x": 80}).describe(s, "output")
    np.testing.assert_allclose(to_continuous(s, column), [0.125, NAN, 0.5, 0.0])
    with pytest.raises(TableError, match=r"row 2: 40\.0 is outside \[0, 20\]"):
        to_continuous(s, Converters(scales={"x": 20}).describe(s, "output"))
    with pytest.raises(TableError, match=r"row 1: -3\.0 is outside"):
        to_continuous(pd.Series([1.0, -3.0], name="x"), Column("x", "continuous", scale=4.0))
    with pytest.raises(TableError, match=r"'x'.*maximum, which is 0.*scales"):
        Converters(types={"x": "continuous"}).describe(pd.Series([0.0, 0.0], name="x"), "output")
    # inputs keep their raw values
    raw = Converters().describe(pd.Series([-2.5, 7.0], name="x"), "input")
    assert raw.scale is None
    np.testing.assert_array_equal(to_continuous(pd.Series([-2.5, 7.0], name="x"), raw), [-2.5, 7.0])


def test_category_from_float_indices_with_nan():
    s = pd.Series([2.0, NAN, 0.0, 5.0, -1.0], name="shirt_type")
    column = Converters(types={"shirt_type": "category"}).describe(s, "output")
    assert column.class_names == ("0", "1", "2", "3", "4", "5") and column.n_outputs == 6
    out = to_category(s, column)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [2, -1, 0, 5, -1])
    column = Converters(types={"shirt_type": "category"}, num_classes={"shirt_type": 7}).describe(s, "output")
    assert column.n_outputs == 7
    named = Converters(class_names={"shirt_type": list("abcdefg")}, types={"shirt_type": "category"})
    assert named.describe(s, "output").class_names == tuple("abcdefg")
    with pytest.raises(TableError, match=r"row 1: 1\.5 is not a class index in \[0, 3\)"):
        to_category(pd.Series([1.0, 1.5], name="c"), Column("c", "category", class_names=("a", "b", "c")))
    with pytest.raises(TableError, match=r"row 0: 3\.0 is not a class index in \[0, 3\)"):
        to_category(pd.Series([3.0], name="c"), Column("c", "category", class_names=("a", "b", "c")))
    with pytest.raises(TableError, match=r"num_classes=2.*class index 5"):
        Converters(types={"shirt_type": "category"}, num_classes={"shirt_type": 2}).describe(s, "output")


def test_category_from_names():
    s = pd.Series(["dog", "cat", NAN, "dog"], name="pet")
    column = Converters().describe(s, "output")
    assert column.kind == "category" and column.class_names == ("cat", "dog")
    np.testing.assert_array_equal(to_category(s, column), [1, 0, -1, 1])
    column = Converters(class_names={"pet": ["dog", "cat", "bird"]}).describe(s, "output")
    np.testing.assert_array_equal(to_category(s, column), [0, 1, -1, 0])
    with pytest.raises(TableError, match=r"column 'pet', row 2: 'fish' is not one of the class names"):
        to_category(pd.Series(["dog", "cat", "fish"], name="pet"), column)
    cat = pd.Series(pd.Categorical(["b", None, "a"], categories=["b", "a"]), name="pet")
    column = Converters().describe(cat, "output")
    assert column.class_names == ("b", "a")
    np.testing.assert_array_equal(to_category(cat, column), [0, -1, 1])


def test_multilabel_strings_lists_and_names():
    s = pd.Series(["0,2", "", NAN, " 1 ", "2,0"], name="fc")
    assert parse_multilabel(s) == [[0, 2], [], None, [1], [2, 0]]
    column = Converters().describe(s, "output")
    assert column.kind == "multilabel" and column.n_outputs == 3
    out = to_multilabel(s, column)
    assert out.shape == (5, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1, 0, 1], [0, 0, 0], [NAN] * 3, [0, 1, 0], [1, 0, 1]])
    column = Converters(num_classes={"fc": 5}, types={"fc": "multilabel"}).describe(s, "output")
    assert to_multilabel(s, column).shape == (5, 5)
    names = Converters(class_names={"fc": ["glasses", "beard", "hat"]}, types={"fc": "multilabel"})
    words = pd.Series(["glasses,hat", "1"], name="fc")
    np.testing.assert_array_equal(to_multilabel(words, names.describe(words, "output")), [[1, 0, 1], [0, 1, 0]])
    lists = pd.Series([[0, 1], (), NAN], name="fc", dtype=object)
    np.testing.assert_array_equal(to_multilabel(lists, Column("fc", "multilabel", class_names=("a", "b"))),
                                  [[1, 1], [0, 0], [NAN, NAN]])
    with pytest.raises(TableError, match=r"column 'fc', row 1: 'x,1' has 'x', which is not a class index"):
        parse_multilabel(pd.Series(["0", "x,1"], name="fc"))
    with pytest.raises(TableError, match=r"row 0: '3' has class index 3, but the column has 3 classes"):
        to_multilabel(pd.Series(["3"], name="fc"), Column("fc", "multilabel", class_names=("a", "b", "c")))


def test_text_missing_is_empty():
    out = to_text(pd.Series(["a b", NAN], name="t"), Column("t", "text", "input"))
    assert out.dtype == object and out.tolist() == ["a b", ""]


def _png(path, array):
    Image.fromarray(array).save(path)


def test_image_files_are_lazy_and_exact(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        _png(tmp_path / f"{i}.png", a)
    _png(tmp_path / "grey.png", arrays[0][:, :, 0])
    s = pd.Series(["0.png", "1.png", "2.png", "grey.png"], name="img")
    column = Converters(image_root=str(tmp_path)).describe(s, "input")
    assert column.kind == "image" and column.root == str(tmp_path)
    images = to_images(s, column)
    assert isinstance(images, ImageFiles) and len(images) == 4
    x = images[1]
    assert x.dtype == torch.float32 and x.shape == (3, 5, 7)
    torch.testing.assert_close(x, torch.from_numpy(arrays[1]).permute(2, 0, 1).float() / 255)
    grey = images[3]
    assert grey.shape == (3, 5, 7) and torch.equal(grey[0], grey[2])
    sub = images[np.array([2, 0])]
    assert isinstance(sub, ImageFiles) and len(sub) == 2
    torch.testing.assert_close(sub[0], images[2])
    assert len(images[1:]) == 3 and len(images[torch.tensor([0, 1])]) == 2
    assert load_image(str(tmp_path / "0.png"), mode="L").shape == (1, 5, 7)


def test_image_errors_name_row_and_path(tmp_path):
    _png(tmp_path / "a.png", np.zeros((2, 2, 3), np.uint8))
    column = Column("img", "image", "input", root=str(tmp_path))
    with pytest.raises(TableError, match=r"column 'img', row 'r1': image file '.*nope\.png' does not exist"):
        to_images(pd.Series(["a.png", "nope.png"], index=["r0", "r1"], name="img"), column)
    with pytest.raises(TableError, match=r"row 1: nan is missing"):
        to_images(pd.Series(["a.png", NAN], name="img"), column)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match=r"cannot read image .*broken\.png"):
        ImageFiles([str(tmp_path / "broken.png")])[0]


def test_converters_check_and_lookup_order():
    conv = Converters(tasks={"a": "col", "binary": "kind"}, heads={"binary": "h"})
    conv.check(["a", "b"])
    assert conv.task_factory(Column("a", "binary")) == "col"
    assert conv.task_factory(Column("b", "binary")) == "kind"
    assert conv.head_factory(Column("b", "binary")) == "h"
    with pytest.raises(TableError, match=r"types\['a'\] = 'bool' is not a kind"):
        Converters(types={"a": "bool"}).check(["a"])
    with pytest.raises(TableError, match=r"Converters.scales names 'door_opn'.*did you mean 'door_open'"):
        Converters(scales={"door_opn": 2.0}).check(["door_open"])
    with pytest.raises(TableError, match=r"Converters.values key 'contnuous' is neither"):
        Converters(values={"contnuous": to_text}).check(["a"])
    with pytest.raises(TableError, match=r"'a' is binary, but Converters.class_names names it"):
        Converters(class_names={"a": ["x", "y"]}).describe(pd.Series([0.0, 1.0], name="a"), "output")


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
@pytest.mark.parametrize("role", ["output", "input"])
def test_infinite_continuous_value_is_an_error_naming_column_and_row(bad, role):
    # one inf used to make the guessed scale inf: every finite label became 0.0, the inf NaN
    s = pd.Series([10.0, NAN, bad, 40.0], index=["a", "b", "c", "d"], name="x")
    with pytest.raises(TableError, match=rf"column 'x', row 'c': {bad!r} is not a finite number"):
        column = Converters().describe(s, role)
        to_continuous(s, column)
    with pytest.raises(TableError, match=r"column 'x', row 'c': .*inf is not a finite number"):  # told scale too
        to_continuous(s, Converters(scales={"x": 64.0}).describe(s, "output"))
    words = pd.Series(["1.5", "inf"], name="x", dtype=object)  # strings that parse as infinity
    with pytest.raises(TableError, match=r"row 1: 'inf' is not a finite number"):
        to_continuous(words, Column("x", "continuous", "input"))
    with pytest.raises(TableError, match=r"column 'c', row 1: inf is not a finite number"):
        Converters(types={"c": "category"}).describe(pd.Series([0.0, np.inf], name="c"), "output")


def _almost_binary(n, stray_rows, stray, dtype="float64"):
    values = np.tile([0, 1], n // 2 + 1)[:n].astype(dtype)
    values[stray_rows] = stray
    return pd.Series(values, name="door_open")


@pytest.mark.parametrize("dtype, stray", [("float64", 3.0), ("int64", 2), ("float64", 0.5), ("int64", -1)])
def test_almost_binary_column_is_refused_naming_the_rows(dtype, stray):
    # a 0/1 column with one stray value used to become a bounded regression (float) or a 3-class category (int)
    s = _almost_binary(300, [7], stray, dtype)
    with pytest.raises(TableError, match=rf"column 'door_open'.*almost binary.*row 7 \({stray!r}\).*"
                                         r"Converters\(types=\{'door_open'"):
        guess_kind(s)
    assert Converters(types={"door_open": "category"}).describe(
        pd.Series(s.to_numpy() + (1 if stray == -1 else 0), name="door_open"), "output").kind == "category"


def test_almost_binary_caps_the_listed_rows_and_keeps_legitimate_columns():
    s = _almost_binary(3000, list(range(5, 3000, 100)), 2.0)  # 30 stray rows: 1%
    with pytest.raises(TableError, match=r"30 of the 3000 values.*row 5 \(2\.0\), .*row 905 \(2\.0\) and 20 more"):
        guess_kind(s)
    rng = np.random.default_rng(0)
    counts = pd.Series(rng.integers(0, 6, 500), name="people")  # counts 0..5 spread out
    assert guess_kind(counts) == "category"
    assert guess_kind(counts.astype(float)) == "continuous"
    assert guess_kind(_almost_binary(300, list(range(0, 300, 50)), 2, "int64")) == "category"  # 2%: a real class
    assert guess_kind(_almost_binary(9, [3], 2, "int64")) == "category"  # too few values to call one stray
    assert guess_kind(pd.Series([0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], name="c")) == "category"  # no 1 at all
    assert guess_kind(_almost_binary(300, [], 0.0)) == "binary"


def _count_opens(monkeypatch):
    """Counts the files PIL opens (a decode opens the file; a cached image opens nothing)."""
    opened = []
    real = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def test_decoded_images_are_kept_in_memory(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        _png(tmp_path / f"{i}.png", rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
        paths.append(str(tmp_path / f"{i}.png"))
    images = ImageFiles(paths)
    opened = _count_opens(monkeypatch)
    first = images[1]
    first.add_(1.0)  # a returned tensor is the caller's: the cached pixels stay as decoded
    again = images[1]
    assert opened == [paths[1]]  # the second access reads no file
    torch.testing.assert_close(again, load_image(paths[1]))
    sub = images[np.array([1, 2])]  # sub-sequences (a project's splits) share the cache
    sub[0], sub[1], images[2]
    assert opened == [paths[1], paths[1], paths[2]]  # (load_image above read it once more)
    assert sub.cache is images.cache and len(images.cache) == 2 and images.cache.used == 2 * 3 * 4 * 5


def test_image_cache_respects_its_budget(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        _png(tmp_path / f"{i}.png", np.full((4, 5, 3), i, np.uint8))
        paths.append(str(tmp_path / f"{i}.png"))
    cache = ImageCache(budget=2 * 60 + 59)  # one image is 60 bytes decoded: two fit, the third does not
    images = ImageFiles(paths, cache=cache)
    opened = _count_opens(monkeypatch)
    for _ in range(2):
        for i in range(3):
            assert images[i][0, 0, 0].item() == pytest.approx(i / 255)
    assert opened == paths + [paths[2]]  # the one over the budget is decoded at every access
    assert cache.used == 120 <= cache.budget and cache.full
    off = ImageFiles(paths, cache=ImageCache(0))
    off[0], off[0]
    assert opened[-2:] == [paths[0], paths[0]] and len(off.cache) == 0
    import pickle
    copy = pickle.loads(pickle.dumps(images))  # a spawned worker: its own, empty cache
    assert len(copy.cache) == 0 and copy.cache.budget == cache.budget and len(cache) == 2
    with pytest.raises(ValueError, match="budget"):
        ImageCache(-1)
