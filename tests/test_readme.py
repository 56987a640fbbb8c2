"""The README's python blocks run as written (the story quick start, then the plain loop)."""
import os
import pathlib
import re

import pandas as pd
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _quick_start(block, directory, monkeypatch):
    directory.mkdir(exist_ok=True)
    monkeypatch.chdir(directory)  # the quick start writes quickstart/ in the working directory
    story: dict = {}
    exec(compile(block, f"{README} (quick start)", "exec"), story)
    return story


def test_readme_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3, "README lost a python block"
    story = _quick_start(blocks[0], tmp_path, monkeypatch)
    table = story["runner"].evaluate(story["project"].loader("test"))
    assert {"camera_blocked", "person_regression.body_regression.shirt_type"} <= set(table.task_path)
    assert (tmp_path / "quickstart" / "first_run" / "tensorboard").is_dir()
    assert (tmp_path / "quickstart" / "first_run" / "tuned_params.json").is_file()
    # run again in the same place (it replaces first_run): the same table to the last digit, though
    # the global random state moved on
    torch.rand(1000)
    again = _quick_start(blocks[0], tmp_path, monkeypatch)
    pd.testing.assert_frame_equal(again["runner"].evaluate(again["project"].loader("test")), table, check_exact=True)
    plain: dict = {}
    exec(compile(blocks[1], f"{README} (plain loop)", "exec"), plain)
    assert set(plain["pred"]) == {"logits", "activated", "decoded", "mask"}
    table_block: dict = {}
    (tmp_path / "table").mkdir()
    monkeypatch.chdir(tmp_path / "table")
    exec(compile(blocks[2], f"{README} (your own table)", "exec"), table_block)
    assert set(table_block["table"].task_path) == {"churned", "upgraded"}


def test_readme_token_tagging_block_runs(tmp_path, monkeypatch):
    """The per-token story: trains, and the evaluation counts tokens in S_t (counted here by hand)."""
    text = README.read_text()
    section = text[text.index("## Per-token tasks"):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    story: dict = {}
    exec(compile(block, f"{README} (per-token tasks)", "exec"), story)
    table = story["table"].set_index(["task_path", "metric_name"])
    valid = slice(480, story["N"])
    entity_type, is_entity = story["entity_type"][valid], story["is_entity"][valid]
    # S_t of entity_type: tokens labelled with a type (they are entities, so their sentence has entities)
    assert table.loc[("entity_type", "accuracy_1"), "num_samples"] == (entity_type >= 0).sum()
    # S_t of is_entity: the existing tokens of sentences labelled as having entities
    has = story["has_entities"][valid] == 1
    assert table.loc[("is_entity", "accuracy"), "num_samples"] == story["elements"][valid][has].sum()
    assert table.loc[("entity_type", "accuracy_1"), "metric_res"] > 0.8  # learnable: a linear rule
    predictions, truth = story["predictions"], story["truth"]
    out, y = story["out"], story["y"]
    selected = out["mask"]["entity_type"] & (y["entity_type"] >= 0)
    assert truth.tolist() == y["entity_type"][selected].tolist()
    assert predictions.shape == (int(selected.sum()), 3)
    assert ("entity_type[" in str(story["flow"].get_treelib_explainer()(out)[0])) == bool(out["mask"]["entity_type"][0].any())
