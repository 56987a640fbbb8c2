"""The seed's home-security story as code: its tasks and flows over a shared feature vector.

Used by the demo, the benchmarks and the tests; also a compact example of a realistic flow::

    tasks = security_tasks(features=256)
    flow = tasks.get_full_flow()            # full_flow
    model = flow.torch()                    # heads read x["features"]
"""
from __future__ import annotations

from torch import nn

from .datasets import FACIAL_CHARACTERISTICS, SHIRT_TYPES
from .dsl import Tasks
from .tasks import BinaryClassificationTask, BoundedRegressionTask, ClassificationTask, MultilabelClassificationTask

BINARY = ("camera_blocked", "door_open", "door_locked", "person_present")
DOOR_TASKS = ("camera_blocked", "door_open", "door_locked")  # what the two-source story's "door_cam" labels
FACE_BOX = ("face_x1", "face_y1", "face_w", "face_h")
BODY_BOX = ("body_x1", "body_y1", "body_w", "body_h")


def security_tasks(features: int = 256, image_size: float = 64.0, feature_key: str = "features") -> Tasks:
    """Tasks and flows of the story; every head is an `nn.Linear(features, k)` reading
    `x.<feature_key>`. Box coordinates are bounded regressions with `scale=image_size`."""
    tasks = [BinaryClassificationTask(n, nn.Linear(features, 1)) for n in BINARY]
    tasks += [BoundedRegressionTask(n, nn.Linear(features, 1), scale=image_size) for n in FACE_BOX + BODY_BOX]
    tasks.append(MultilabelClassificationTask("facial_characteristics", nn.Linear(features, len(FACIAL_CHARACTERISTICS)),
                                              class_names=FACIAL_CHARACTERISTICS))
    tasks.append(ClassificationTask("shirt_type", nn.Linear(features, len(SHIRT_TYPES)), class_names=SHIRT_TYPES))
    t = Tasks(tasks, inputs=[feature_key])
    add_security_flows(t, feature_key)
    return t


def add_security_flows(tasks: Tasks, feature_key: str = "features") -> None:
    """Add the story's four flows (face_regression, body_regression, person_regression, full_flow)
    to `tasks`, which must hold the story's task names; every head reads `x.<feature_key>`."""

    def feats(x):
        return getattr(x, feature_key)

    @tasks.add_flow
    def face_regression(flow, x, out):
        for name in FACE_BOX + ("facial_characteristics",):
            out += getattr(flow, name)(feats(x))
        return out

    @tasks.add_flow
    def body_regression(flow, x, out):
        for name in BODY_BOX + ("shirt_type",):
            out += getattr(flow, name)(feats(x))
        return out

    @tasks.add_flow
    def person_regression(flow, x, out):
        out += flow.face_regression(x)
        out += flow.body_regression(x)
        return out

    @tasks.add_flow
    def full_flow(flow, x, out):
        out += flow.camera_blocked(feats(x))
        out += flow.door_open(feats(x)) | (~out.camera_blocked)
        out += flow.door_locked(feats(x)) | (~out.door_open)
        out += flow.person_present(feats(x)) | out.door_open
        out += flow.person_regression(x) | out.person_present
        return out


def security_labels(n: int, seed: int = 0, missing_rate: float = 0.05, image_size: float = 64.0):
    """Random labels of the story for `n` samples, keyed by task path of `full_flow`, in task format
    (binary 0/1/NaN, boxes in [0, 1], multilabel (n, 3) with NaN, shirt type int with -1).
    Annotations follow the story's preconditions; each cell is also missing with `missing_rate`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    nan = np.nan
    blocked = (rng.random(n) < 0.2).astype(np.float32)
    door_open = np.where(blocked == 1, nan, rng.random(n) < 0.55).astype(np.float32)
    door_locked = np.where(door_open == 0, rng.random(n) < 0.5, nan).astype(np.float32)
    person = np.where(door_open == 1, rng.random(n) < 0.7, nan).astype(np.float32)
    has_person = person == 1
    labels = {"camera_blocked": blocked, "door_open": door_open, "door_locked": door_locked, "person_present": person}
    prefix = {**{k: "person_regression.face_regression." for k in FACE_BOX + ("facial_characteristics",)},
              **{k: "person_regression.body_regression." for k in BODY_BOX + ("shirt_type",)}}
    for name in FACE_BOX + BODY_BOX:
        labels[prefix[name] + name] = np.where(has_person, rng.random(n), nan).astype(np.float32)
    fc = (rng.random((n, len(FACIAL_CHARACTERISTICS))) < 0.4).astype(np.float32)
    fc[~has_person] = nan
    labels[prefix["facial_characteristics"] + "facial_characteristics"] = fc
    labels[prefix["shirt_type"] + "shirt_type"] = np.where(has_person, rng.integers(0, len(SHIRT_TYPES), n), -1)
    for path, v in labels.items():
        drop = rng.random(v.shape) < missing_rate
        if v.dtype.kind == "f":
            v[drop] = nan
        else:
            v[drop] = -1
    return labels


def two_source_tables(df, input_cols=("img",), seed: int = 0) -> dict:
    """The story's annotation table as two disjoint tables, as if from two sources: `"door_cam"`,
    half of the rows (drawn from `seed`) labelled only for the door tasks (`DOOR_TASKS`), and
    `"people"`, the other half labelled only for `person_present` and the person sub-flow (boxes,
    facial characteristics, shirt type). Both keep `input_cols` and their rows' index labels; a
    `Project` over them (`{name: table}`) trains one model on the mix."""
    import numpy as np

    inputs = list(input_cols)
    unknown = [c for c in inputs if c not in df.columns]
    if unknown:
        raise KeyError(f"two_source_tables: no input column(s) {unknown} in the table; it has {list(df.columns)}")
    door = np.zeros(len(df), dtype=bool)
    # a stream of its own: `Project` splits rows with `default_rng(seed).permutation` too, and the same
    # permutation would put one source's rows all in the training split
    door[np.random.default_rng((seed, 2)).permutation(len(df))[: len(df) // 2]] = True
    door_cols = [c for c in df.columns if c in DOOR_TASKS]
    people_cols = [c for c in df.columns if c not in inputs and c not in DOOR_TASKS]
    return {"door_cam": df.loc[door, inputs + door_cols], "people": df.loc[~door, inputs + people_cols]}


def security_cnn(features: int = 256, dropout: float = 0.0) -> nn.Module:
    """A small conv net for the story's 64x64 RGB images: `(N, 3, H, W)` in [0, 1] -> `(N, features)`.

    Four stride-2 conv blocks (16-32-48-64 channels) and a linear layer; about 0.1M parameters plus
    `features * 64`, fast enough to train on two CPU cores in a couple of minutes. `dropout > 0`
    ends it with `nn.Dropout(dropout)` on the features (what MC-dropout samples); 0 adds no layer,
    so the default network and its state dict are as before.
    """

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    layers = [block(3, 16), block(16, 32), block(32, 48), block(48, 64),
              nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, features), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)
