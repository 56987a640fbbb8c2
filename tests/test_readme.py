"""The README's python blocks run as written (the story quick start, then the plain loop)."""
import os
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quick start writes quickstart/ in the working directory
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost a python block"
    story: dict = {}
    exec(compile(blocks[0], f"{README} (quick start)", "exec"), story)
    table = story["runner"].evaluate(story["project"].loader("test"))
    assert {"camera_blocked", "person_regression.body_regression.shirt_type"} <= set(table.task_path)
    assert (tmp_path / "quickstart" / "first_run" / "tensorboard").is_dir()
    assert (tmp_path / "quickstart" / "first_run" / "tuned_params.json").is_file()
    plain: dict = {}
    exec(compile(blocks[1], f"{README} (plain loop)", "exec"), plain)
    assert set(plain["pred"]) == {"logits", "activated", "decoded", "mask"}
