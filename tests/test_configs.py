"""Every YAML under configs/ runs with `catalyst-run` in a subprocess (with the smoke overlay)."""
import os
import pathlib
import subprocess
import sys

import pandas as pd
import pytest

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
BASE, SMOKE = CONFIGS / "security.yml", CONFIGS / "smoke.yml"
OVERLAYS = sorted(p for p in CONFIGS.glob("*.yml") if p not in (BASE, SMOKE))


def _catalyst_run(*configs, cwd):
    exe = pathlib.Path(sys.executable).with_name("catalyst-run")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(exe), "--config", *map(str, configs)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: "base" if p is None else p.name)
def test_config_runs_end_to_end(overlay, tmp_path):
    configs = [BASE] + ([overlay] if overlay else []) + [SMOKE]
    result = _catalyst_run(*configs, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logdir = tmp_path / "smoke_project" / "config_run"
    assert (logdir / "checkpoints" / "runner.last.pth").is_file()
    assert (logdir / "tuned_params.json").is_file()
    table = pd.read_csv(logdir / "evaluation.csv")
    assert list(table.columns) == ["task_path", "metric_name", "metric_res", "num_samples"]
    assert "person_regression.body_regression.shirt_type" in set(table.task_path)



def test_a_config_runs_twice_in_a_row(tmp_path):
    """The base config passes `overwrite: true`: a second run replaces the first in the logdir."""
    for _ in range(2):
        result = _catalyst_run(BASE, SMOKE, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logdir = tmp_path / "smoke_project" / "config_run"
    assert pd.read_csv(logdir / "csv_logger" / "valid.csv")["step"].tolist() == [1]
