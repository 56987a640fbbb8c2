"""`runners.restore`: which checkpoint a run resumes from, and what a parent process reads back
from the logdir after spawned DDP workers trained."""
import json
import os

import pytest
import torch
from catalyst import dl

from dnn_cool_catalyst.runners import DistributedDataParallelEngine, checkpoints, compat
from dnn_cool_catalyst.runners.restore import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    ran_in_spawned_workers,
    resume_checkpoint,
    restore_from_logdir,
)


def test_resume_checkpoint_finds_the_file_or_says_what_is_missing(tmp_path):
    assert resume_checkpoint(None, str(tmp_path), None) is None and resume_checkpoint(False, None, None) is None
    with pytest.raises(ValueError, match="give a logdir"):
        resume_checkpoint(True, None, None)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint .*runner\.last\.pth"):
        resume_checkpoint("last", str(tmp_path), None)
    last = tmp_path / LAST_CHECKPOINT
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resume_checkpoint(True, str(tmp_path), None) == str(last)
    assert resume_checkpoint(str(last), None, []) == str(last)
    own = compat.CheckpointCallback(logdir=str(tmp_path / "mine"))
    with pytest.raises(ValueError, match="give it resume_runner"):
        resume_checkpoint(True, str(tmp_path), {"ckpt": own})


def test_restore_from_logdir_loads_the_weights_and_thresholds_of_the_checkpoint(flow_and_model, tmp_path):
    trained_flow, trained = flow_and_model(seed=1)
    trained_flow.get_decoder().load_tuned({"door_open": {"threshold": 0.25}})
    path = tmp_path / BEST_CHECKPOINT
    path.parent.mkdir()
    checkpoints.save_checkpoint({"model_state_dict": trained.state_dict(),
                                 checkpoints.DECODER_KEY: json.dumps(trained_flow.get_decoder().params())}, path)
    flow, model = flow_and_model(seed=2)
    restore_from_logdir(str(tmp_path), torch.nn.DataParallel(model), flow, load_best_on_end=True)  # wrapped: unwrapped
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    assert flow.get_decoder().params()["door_open"]["threshold"] == 0.25


def test_restore_from_logdir_warns_when_there_is_nothing_to_read(flow_and_model, tmp_path):
    flow, model = flow_and_model()
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.warns(UserWarning, match="no logdir"):
        restore_from_logdir(None, model, flow, load_best_on_end=False)
    with pytest.warns(UserWarning, match=r"no checkpoint .*runner\.last\.pth"):
        restore_from_logdir(str(tmp_path), model, flow, load_best_on_end=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
    assert not os.listdir(tmp_path)


def test_only_a_spawning_ddp_engine_ran_elsewhere():
    assert not ran_in_spawned_workers(dl.CPUEngine())
    engine = DistributedDataParallelEngine()
    assert not ran_in_spawned_workers(engine)  # it has not spawned yet
    engine.spawned = True
    assert ran_in_spawned_workers(engine)
