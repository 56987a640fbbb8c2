"""`files`: atomic writes (a failed write leaves the old file and no temporary), JSON and CSV."""
import math
import os

import pandas as pd
import pytest

from dnn_cool_catalyst.files import read_json, write_atomic, write_csv, write_json


def test_write_atomic_creates_directories_and_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "b.bin"
    assert write_atomic(path, lambda fh: fh.write(b"one")) == str(path)
    write_atomic(path, lambda fh: fh.write(b"two"), fsync=True)
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["b.bin"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})

    def fail(fh):
        fh.write(b"{half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, fail)
    assert read_json(path) == {"a": 1} and os.listdir(tmp_path) == ["x.json"]


def test_json_round_trip_refuses_nan_and_names_a_malformed_file(tmp_path):
    path = tmp_path / "p.json"
    write_json(path, {"t": [0.5, 1], "s": "é"})
    assert read_json(path) == {"t": [0.5, 1], "s": "é"}
    with pytest.raises(ValueError):
        write_json(tmp_path / "nan.json", {"t": math.nan})
    assert not (tmp_path / "nan.json").exists()
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_write_csv_has_no_index_column(tmp_path):
    path = tmp_path / "e.csv"
    write_csv(path, pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}, index=[7, 8]))
    assert path.read_text(encoding="utf-8") == "a,b\n1,x\n2,y\n"
