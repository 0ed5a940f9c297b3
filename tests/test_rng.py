"""Training the stand-in teacher leaves the caller's random state as it found it (issue 25):
a user's first run, which trains the teacher, gives the same figures as every later run,
which finds it cached. Tiny: a toy world of 512 web images and 1 teacher epoch (seconds)."""
import importlib
import os
import random

import numpy as np
import pytest
import torch

import common
import toyworld
from conftest import TINY

distill = importlib.import_module("01_distill")
pytestmark = pytest.mark.usefixtures("single_thread")
# a smaller toy-tiny: 8 base and 16 val images per class, a teacher of 2 steps
SMALL_WORLD = dict(n_train=8, n_eval=16, n_web=512, teacher_epochs=1)
SMALL_STUDENT = ["--widths", "4,4,8,8", "--epochs", "2", "--batch-size", "64",
                 "--val-episodes", "5"]


@pytest.fixture
def small_world(tmp_path, monkeypatch):
    """The small toy-tiny world with a cache of its own (empty: the teacher is not trained yet)."""
    monkeypatch.setenv("SYNTRANS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(toyworld.SCALES, "toy-tiny", SMALL_WORLD)
    assert not os.path.exists(common.toy_teacher_file("toy-clip-tiny"))
    return tmp_path


def rng_states():
    return torch.random.get_rng_state(), np.random.get_state(), random.getstate()


def test_training_the_teacher_leaves_the_global_rngs_as_they_were(small_world):
    common.set_seed(7)
    torch.rand(3), np.random.rand(3), random.random()  # not at a fresh seed: any state is kept
    before = rng_states()
    toyworld.train_teacher("toy-tiny", log=lambda *_: None)
    after = rng_states()
    assert torch.equal(before[0], after[0])
    assert before[1][0] == after[1][0] and np.array_equal(before[1][1], after[1][1])
    assert before[1][2:] == after[1][2:] and before[2] == after[2]


def test_stage_1_is_the_same_whether_the_teacher_was_trained_in_the_run_or_cached(small_world):
    teacher_file = common.toy_teacher_file("toy-clip-tiny")
    runs = [str(small_world / "trained"), str(small_world / "cached")]
    distill.main(["--run", runs[0], *TINY, *SMALL_STUDENT])  # trains the teacher first
    assert os.path.exists(teacher_file)
    trained_at = os.stat(teacher_file).st_mtime_ns
    distill.main(["--run", runs[1], *TINY, *SMALL_STUDENT])  # finds it cached
    assert os.stat(teacher_file).st_mtime_ns == trained_at  # (not trained again)
    a, b = (common.load_checkpoint(os.path.join(r, common.STUDENT), "distill", "rerun stage 1")
            for r in runs)
    assert a["teacher"] == b["teacher"]
    assert a["history"] == b["history"] and a["best_acc"] == b["best_acc"]
    assert a["state"].keys() == b["state"].keys()
    for part in a["state"]:
        sa, sb = a["state"][part], b["state"][part]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
