"""Every YAML under configs/ runs with `catalyst-run` in a subprocess (with the smoke overlay);
every balancing method is chosen by `_target_` in the balancing overlay and trains."""
import math
import os
import pathlib
import subprocess
import sys

import pandas as pd
import pytest
import torch

from dnn_cool_catalyst import balancing

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
    name = overlay.name if overlay is not None else None
    two_sources = name == "two_sources.yml"
    runs = {"two_sources.yml": "two_sources", "uncertainty.yml": "uncertainty_run"}
    logdir = tmp_path / "smoke_project" / runs.get(name, "config_run")
    assert (logdir / "checkpoints" / "runner.last.pth").is_file()
    assert (logdir / "tuned_params.json").is_file()
    table = pd.read_csv(logdir / "evaluation.csv", keep_default_na=False, na_values=["NaN", "nan"])
    columns = ["task_path", "metric_name", "metric_res", "num_samples"]
    if name == "uncertainty.yml":  # MC-dropout columns on the test split, heat maps beside the logged images
        columns += ["entropy", "variance"]
        assert table["entropy"].notna().any() and table["variance"].notna().any(), table
        events = b"".join(f.read_bytes() for f in (logdir / "tensorboard").rglob("*") if f.is_file())
        assert b"/worst/1/attribution" in events
    assert list(table.columns) == (["source"] + columns if two_sources else columns)
    assert "person_regression.body_regression.shirt_type" in set(table.task_path)
    if two_sources:  # one model on two sources: per-source rows and metrics for the tasks each labels
        door = {"camera_blocked", "door_open", "door_locked"}
        assert set(table[table["source"] == "door_cam"]["task_path"]) <= door
        assert not set(table[table["source"] == "people"]["task_path"]) & door
        assert (tmp_path / "smoke_project" / "split_door_cam.json").is_file()
        valid = pd.read_csv(logdir / "csv_logger" / "valid.csv")
        assert "door_cam/camera_blocked/accuracy" in valid.columns and "people/person_present/accuracy" in valid.columns
        assert "door_cam/camera_blocked/loss" in valid.columns and "people/person_present/loss" in valid.columns
        assert "people/camera_blocked/loss" not in valid.columns
    # the run says where its logs are and prints the evaluation table, one line per task
    assert "TensorBoard: tensorboard --logdir" in result.stdout, result.stdout[-3000:]
    assert "Evaluation (preconditions from the labels):" in result.stdout
    assert any(line.startswith("camera_blocked ") for line in result.stdout.splitlines())
    if overlay is not None and overlay.name == "balancing.yml":  # the balancer reached the runner
        train = pd.read_csv(logdir / "csv_logger" / "train.csv")
        assert "person_regression.body_regression.shirt_type/balance/weight" in train.columns, list(train.columns)
    if overlay is None:
        # the base config passes `overwrite: true`: a second run in the same place replaces the
        # first (never mixes with it), and gives the same table to the last digit
        first = (logdir / "evaluation.csv").read_text()
        again = _catalyst_run(*configs, cwd=tmp_path)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert pd.read_csv(logdir / "csv_logger" / "valid.csv")["step"].tolist() == [1]
        assert (logdir / "evaluation.csv").read_text() == first



def test_every_setting_reaches_the_run(tmp_path):
    import dataclasses
    import json

    import torch

    from dnn_cool_catalyst.demo import DemoSettings

    changed = {"project_dir": "other_project", "runner_name": "other_run", "n": 48, "seed": 3, "epochs": 2,
               "batch_size": 8, "lr": 0.01, "features": 12, "dropout": 0.25, "mc_samples": 3, "attribution": "saliency"}
    assert set(changed) == {f.name for f in dataclasses.fields(DemoSettings)}, "a new setting needs a check here"
    overlay = tmp_path / "every_setting.yml"
    overlay.write_text("settings:\n" + "".join(f"  {k}: {v}\n" for k, v in changed.items()))
    result = _catalyst_run(BASE, CONFIGS / "engine_cpu.yml", overlay, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logdir = tmp_path / "other_project" / "other_run"                                  # project_dir, runner_name
    split = json.loads((tmp_path / "other_project" / "split.json").read_text())
    assert split["num_rows"] == 48 and split["seed"] == 3                              # n, seed
    assert len(pd.read_csv(logdir / "csv_logger" / "train.csv")) == 2                   # epochs
    state = torch.load(logdir / "checkpoints" / "runner.last.pth", weights_only=True)
    train_rows = len(split["train"])
    assert state["epoch_step"] == 2
    steps_per_epoch = -(-train_rows // 8) + -(-len(split["valid"]) // 8)               # batch_size
    assert state["batch_step"] == 2 * steps_per_epoch, (state["batch_step"], steps_per_epoch)
    assert state["optimizer_state_dict"]["param_groups"][0]["initial_lr"] == 0.01      # lr
    assert state["model_state_dict"]["flow.camera_blocked.weight"].shape == (1, 12)    # features
    table = pd.read_csv(logdir / "evaluation.csv")  # MC-dropout refuses a model without dropout: dropout, mc_samples
    assert {"entropy", "variance"} <= set(table.columns) and table["entropy"].notna().any()
    events = b"".join(f.read_bytes() for f in (logdir / "tensorboard").rglob("*") if f.is_file())
    assert b"/worst/1/attribution" in events                                           # attribution


def test_an_unknown_setting_is_an_error(tmp_path):
    overlay = tmp_path / "typo.yml"
    overlay.write_text("settings:\n  lrr: 0.1\n")
    result = _catalyst_run(BASE, SMOKE, overlay, cwd=tmp_path)
    assert result.returncode != 0 and "lrr" in result.stderr
    assert not (tmp_path / "smoke_project" / "config_run").exists()


# every method of balancing.__all__ by its `_target_` (MGDA also with an argument: MGDA-UB)
BALANCERS = [pytest.param({"_target_": f"dnn_cool_catalyst.balancing.{name}"}, id=name) for name in balancing.__all__
             if name not in ("Balancer", "GradientBalancer")]
BALANCERS.append(pytest.param({"_target_": "dnn_cool_catalyst.balancing.MGDA", "representation": True}, id="MGDA-UB"))


@pytest.fixture(scope="module")
def balancing_project_dir(tmp_path_factory):
    """The working directory of the balancing config tests: the smoke project's generated data is
    made by the first test and read by the others; each run writes its own logdir."""
    return tmp_path_factory.mktemp("balancing_configs")


@pytest.mark.parametrize("balancer", BALANCERS)
def test_every_balancer_is_chosen_by_target_and_trains(balancer, balancing_project_dir, monkeypatch):
    """In process, as `catalyst-run` does it (`process_configs`: load and merge the YAML files;
    hydra-slayer builds the objects; `run_from_params` calls the runner), the train call only."""
    import hydra_slayer
    from catalyst import utils
    from catalyst.contrib.scripts.run import process_configs, run_from_params

    monkeypatch.chdir(balancing_project_dir)
    config = process_configs([str(BASE), str(CONFIGS / "balancing.yml"), str(SMOKE)])
    name = balancer["_target_"].rsplit(".", 1)[1] + ("-UB" if balancer.get("representation") else "")
    # an overlay choosing the method (the balancing overlay's own `_target_` replaced), on tiny data
    config = utils.merge_dicts(config, {"runner": {"balancer": balancer},
                                        "settings": {"runner_name": name, "n": 40, "features": 16}})
    quiet = dict(verbose=False, flow_metrics=False, interpretation=False, threshold_tuning=False,
                 load_best_on_end=False)
    config["run"] = [dict(call, **quiet) for call in config["run"] if call["_call_"] == "train"]
    # hydra-slayer's functional form: what catalyst's REGISTRY calls, with a fresh store of `_var_`s
    built = hydra_slayer.get_from_params(**config)
    runner, model = built["runner"], built["model"]
    assert type(runner.balancer).__name__ == name.split("-")[0]
    assert runner.balancer.representation if name == "MGDA-UB" else True
    before = [p.detach().clone() for p in model.parameters()]
    run_from_params(built)
    train = runner.epoch_metrics["train"]
    assert math.isfinite(train["loss"])
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, model.parameters())), "nothing trained"
    weights = {k: v for k, v in train.items() if k.endswith("/balance/weight")}
    assert weights and all(math.isfinite(v) for v in weights.values())


def test_a_gradient_method_runs_with_catalyst_run(tmp_path):
    overlay = tmp_path / "pcgrad.yml"
    overlay.write_text("runner:\n  balancer:\n    _target_: dnn_cool_catalyst.balancing.PCGrad\n")
    result = _catalyst_run(BASE, CONFIGS / "balancing.yml", overlay, SMOKE, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train = pd.read_csv(tmp_path / "smoke_project" / "config_run" / "csv_logger" / "train.csv")
    assert train["loss"].map(math.isfinite).all()
    weights = [c for c in train.columns if c.endswith("/balance/weight")]
    assert weights and train[weights].notna().any(axis=None), list(train.columns)


def test_the_two_source_overlay_trains_each_task_on_as_many_labels_as_the_single_table():
    """Each source of the two-source story labels its tasks on half of the rows, and an epoch shows
    every training row once (sampling "proportional"): over its epochs the two-source model must see
    each task's labels as often as the single-table model over security.yml's (the quality bar of
    `make demo` is met with that budget, README "Several sources")."""
    import numpy as np
    import yaml

    from dnn_cool_catalyst.story import two_source_tables

    def epochs(path):
        return yaml.safe_load(path.read_text())["settings"].get("epochs")

    base = epochs(BASE)
    two = epochs(CONFIGS / "two_sources.yml") or base
    n = 40
    tasks = ["camera_blocked", "door_open", "door_locked", "person_present", "face_x1", "shirt_type"]
    df = pd.DataFrame({"img": [f"{i}.png" for i in range(n)], **{t: np.ones(n) for t in tasks}})
    for task in tasks:
        labelled = sum(table[task].notna().sum() for table in two_source_tables(df).values() if task in table)
        assert two * labelled >= base * n, (task, two, labelled, base)
