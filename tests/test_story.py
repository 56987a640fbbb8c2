"""The story's helpers: the two-source split of the annotation table."""
import numpy as np
import pandas as pd
import pytest

from dnn_cool_catalyst.story import DOOR_TASKS, security_labels, two_source_tables


def _story_table(n=40):
    labels = security_labels(n, seed=1)
    df = pd.DataFrame({"img": [f"{i:03d}.png" for i in range(n)]}, index=[f"r{i}" for i in range(n)])
    for path, v in labels.items():
        name = path.rsplit(".", 1)[-1]
        df[name] = list(v) if v.ndim > 1 else v
    return df


def test_two_source_tables_are_disjoint_halves_labelled_for_their_own_tasks():
    df = _story_table()
    tables = two_source_tables(df, seed=3)
    door, people = tables["door_cam"], tables["people"]
    assert list(door.columns) == ["img", *DOOR_TASKS]
    assert list(people.columns) == ["img", "person_present", *[c for c in df.columns[5:]]]
    assert len(door) == 20 and len(people) == 20
    assert not set(door.index) & set(people.index) and set(door.index) | set(people.index) == set(df.index)
    pd.testing.assert_frame_equal(door, df.loc[door.index, door.columns])  # rows as they were, index labels kept
    again = two_source_tables(df, seed=3)
    assert list(again["door_cam"].index) == list(door.index)  # seeded
    assert list(two_source_tables(df, seed=4)["door_cam"].index) != list(door.index)
    with pytest.raises(KeyError, match=r"no input column\(s\) \['image'\]"):
        two_source_tables(df, input_cols=["image"])
    assert np.isnan(people["person_present"]).any()  # rows whose door is closed carry no person labels


def test_common_source_splits_put_every_row_in_the_same_part_as_the_whole_table(tmp_path):
    from dnn_cool_catalyst.demo import common_source_splits
    from dnn_cool_catalyst.project import load_or_make_split, split_file, table_fingerprint

    df = _story_table(n=60)
    tables = two_source_tables(df, seed=3)
    common_source_splits(df, tables, str(tmp_path), seed=5)
    whole = load_or_make_split(split_file(str(tmp_path), None), len(df), (0.8, 0.1, 0.1), 5,
                               table_fingerprint(df[["img"]]))
    part_of = {int(r): name for name, rows in whole.items() for r in rows}
    seen = []
    for source, table in tables.items():
        # the file is what Project itself reads back (same checks: rows, fingerprint, fractions, seed)
        local = load_or_make_split(split_file(str(tmp_path), source), len(table), (0.8, 0.1, 0.1), 5,
                                   table_fingerprint(table[["img"]]))
        for name, rows in local.items():
            positions = df.index.get_indexer(table.index[rows])
            assert all(part_of[int(p)] == name for p in positions), (source, name)
            seen += positions.tolist()
    assert sorted(seen) == list(range(len(df)))  # the sources' parts cover the table once
    first = (tmp_path / "split_people.json").read_text()
    common_source_splits(df, tables, str(tmp_path), seed=5)  # an existing file is kept as it is
    assert (tmp_path / "split_people.json").read_text() == first


def test_two_source_halves_are_drawn_apart_from_the_split():
    # `make_split` draws `default_rng(seed).permutation`; the halves must not follow the same draw,
    # or one source would hold no validation or test rows at all
    from dnn_cool_catalyst.project import make_split

    df = _story_table(n=200)
    for seed in (0, 1, 2):
        tables = two_source_tables(df, seed=seed)
        split = make_split(len(df), seed=seed)
        for table in tables.values():
            positions = set(df.index.get_indexer(table.index).tolist())
            for part in ("valid", "test"):
                assert positions & set(split[part].tolist()), (seed, part)
