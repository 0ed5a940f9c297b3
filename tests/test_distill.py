"""Tests of stage 1 (01_distill.py): a short run writes a checkpoint that loads, the
proxy-task loss goes down on a fixed batch, the teacher stays frozen and unchanged,
and a missing dataset or teacher is a one-line error."""
import copy
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import common
from conftest import REPO, TINY, TINY_STUDENT, torch_threads

distill = importlib.import_module("01_distill")
pytestmark = pytest.mark.usefixtures("single_thread")
WIDTHS = [int(w) for w in TINY_STUDENT[TINY_STUDENT.index("--widths") + 1].split(",")]


def clone_state(module_or_state):
    sd = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return {k: v.detach().clone() for k, v in sd.items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------
# One short distilled run, watched: which teacher it loaded and what it optimised.

@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("distill") / "run")
    seen = {"teachers": [], "optimised": []}
    real_load_teacher, real_sgd = common.load_teacher, torch.optim.SGD
    teacher_file = common.toy_teacher_file("toy-clip-tiny")
    file_before = common.file_id(teacher_file)

    def load_teacher(*a, **kw):
        out = real_load_teacher(*a, **kw)
        seen["teachers"].append((out[0], clone_state(out[0])))
        return out

    class WatchedSGD(real_sgd):
        def __init__(self, params, *a, **kw):
            params = list(params)
            seen["optimised"] += params
            super().__init__(params, *a, **kw)

    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        mp.setattr(common, "load_teacher", load_teacher)
        mp.setattr(torch.optim, "SGD", WatchedSGD)
        distill.main(["--run", run, *TINY, *TINY_STUDENT])
    seen["file_before"], seen["file_after"] = file_before, common.file_id(teacher_file)
    return run, seen


def test_short_run_writes_a_checkpoint_that_loads_with_config_and_class_names(watched_run):
    run, _ = watched_run
    ck = common.load_checkpoint(os.path.join(run, common.STUDENT), "distill", "rerun stage 1")
    assert ck["dataset"] == "toy-tiny"
    assert ck["classes"] == common.class_names("toy-tiny")
    assert len(ck["classes"]["train"]) == 64
    cfg = ck["config"]
    assert cfg["widths"] == WIDTHS and cfg["epochs"] == 1 and cfg["distill_weight"] == 1.0
    assert cfg["out"] == common.STUDENT and cfg["dataset"] == "toy-tiny"
    assert ck["teacher"]["name"] == "toy-clip-tiny" and ck["teacher"]["file_id"]
    assert [h["epoch"] for h in ck["history"]] == [1]
    assert 0 <= ck["history"][0]["val_1shot"] <= 100 and ck["best_acc"] == ck["history"][0]["val_1shot"]

    # the weights rebuild the student and its heads exactly (strict loading)
    student = common.ResNet12(tuple(cfg["widths"]))
    student.load_state_dict(ck["state"]["student"])
    feats = student.eval()(torch.randn(3, 3, 32, 32))
    assert feats.shape == (3, WIDTHS[-1]) and torch.isfinite(feats).all()
    assert ck["state"]["ce_head"]["weight"].shape == (64, WIDTHS[-1])
    teacher_dim = 128  # toy-clip-tiny's embedding width
    assert ck["state"]["proj"]["2.weight"].shape == (teacher_dim, WIDTHS[-1])

    # the per-epoch checkpoint for --resume is there too and is a stage checkpoint of its own
    last = common.load_checkpoint(os.path.join(run, "01_student.last.pt"), "distill-last", "")
    assert last["epoch"] == 1 and set(last["state"]) >= {"student", "ce_head", "proj", "opt", "sched", "rng"}


def test_teacher_is_frozen_used_and_unchanged(watched_run):
    run, seen = watched_run
    assert len(seen["teachers"]) == 1
    teacher, before = seen["teachers"][0]
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert same_state(before, clone_state(teacher))               # no parameter or buffer moved
    assert seen["file_before"] == seen["file_after"]              # nor the cached teacher file
    # the optimiser was given the student and heads, and none of the teacher's tensors
    assert len(seen["optimised"]) > 0
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in seen["optimised"]}
    # and the teacher was really used: its embeddings of the base images are cached
    assert any(f.startswith("teacher-train-") for f in os.listdir(os.path.join(run, "cache")))


def test_ce_only_student_needs_no_teacher_and_has_its_own_file(tmp_path, monkeypatch):
    def no_teacher(*a, **kw):
        raise AssertionError("the CE-only run loaded the teacher")
    monkeypatch.setattr(common, "load_teacher", no_teacher)
    run = str(tmp_path / "run")
    distill.main(["--run", run, *TINY, *TINY_STUDENT, "--distill-weight", "0"])
    assert not os.path.exists(os.path.join(run, common.STUDENT))
    ck = common.load_checkpoint(os.path.join(run, common.STUDENT_CE), "distill", "")
    assert ck["config"]["distill_weight"] == 0 and ck["config"]["out"] == common.STUDENT_CE
    assert ck["teacher"] is None
    assert ck["classes"] == common.class_names("toy-tiny")
    common.ResNet12(tuple(ck["config"]["widths"])).load_state_dict(ck["state"]["student"])


# ----------------------------------------------------------------------------------
# The proxy task

def test_info_nce_prefers_each_views_own_teacher_embedding():
    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    matched = distill.info_nce(t * 3, t, 0.1)
    shuffled = distill.info_nce(t[torch.randperm(16)] * 3, t, 0.1)
    assert matched < 0.05 < torch.log(torch.tensor(16.0)) < shuffled


def test_distillation_loss_goes_down_on_a_fixed_batch(tiny_val):
    """The script's student, projection head, InfoNCE and optimiser on one fixed batch of
    32 images: a few steps must lower the proxy loss clearly. The targets are fixed random
    unit vectors, one per image, standing in for the teacher's embeddings (toy-clip-tiny's
    own are nearly identical for every image: it is trained for speed, not quality)."""
    torch.manual_seed(0)
    idx = torch.randperm(len(tiny_val), generator=torch.Generator().manual_seed(0))[:32].tolist()
    x = common.to_student_input(tiny_val.student_batch(idx), "cpu")
    t_emb = nn.functional.normalize(torch.randn(32, 128, generator=torch.Generator().manual_seed(1)), dim=-1)
    student = common.ResNet12(tuple(WIDTHS)).train()
    d = student.out_dim
    proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, t_emb.shape[1]))  # as in 01_distill.main
    opt = torch.optim.SGD([*student.parameters(), *proj.parameters()], lr=0.05, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(20):
        loss = distill.info_nce(proj(student(x)), t_emb, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.0  # about log(32): no head starts out matched
    assert losses[-1] < 0.4 * losses[0], losses


# ----------------------------------------------------------------------------------
# User errors: one line on stderr, exit code 2, no traceback

@pytest.mark.parametrize("flags,word", [(["--dataset", "nope"], "nope"),
                                        (["--clip", "nope"], "nope"),
                                        (["--clip-pretrained", "MISSING"], "missing.pt")])
def test_missing_dataset_or_teacher_is_a_one_line_error(tmp_path, flags, word):
    flags = [str(tmp_path / "missing.pt") if f == "MISSING" else f for f in flags]
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "01_distill.py", "--run", str(run), *TINY, *TINY_STUDENT, *flags],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (run / common.STUDENT).exists()


# ----------------------------------------------------------------------------------
# The best validation epoch is what the checkpoint keeps (validation scores forced:
# epoch 1 best, epoch 2 worse), watched through the per-epoch checkpoints.

@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("distill-best") / "run")
    scores, per_epoch = iter([60.0, 40.0]), []
    real_save = common.save_checkpoint

    def save_checkpoint(path, stage, *a, **kw):
        if stage == "distill-last":
            per_epoch.append(copy.deepcopy({k: kw["state"][k] for k in ("student", "ce_head", "proj")}))
        return real_save(path, stage, *a, **kw)

    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        mp.setattr(distill, "validate", lambda *a: next(scores))
        mp.setattr(common, "save_checkpoint", save_checkpoint)
        distill.main(["--run", run, *TINY, *TINY_STUDENT, "--distill-weight", "0",
                      "--epochs", "2", "--val-every", "1"])
    ck = common.load_checkpoint(os.path.join(run, common.STUDENT_CE), "distill", "")
    return ck, per_epoch


def test_the_best_validation_epochs_student_is_kept(two_epoch_run):
    ck, per_epoch = two_epoch_run
    assert len(per_epoch) == 2 and ck["best_acc"] == 60.0
    assert [h["val_1shot"] for h in ck["history"]] == [60.0, 40.0]
    assert same_state(ck["state"]["student"], per_epoch[0]["student"])
    assert not same_state(ck["state"]["student"], per_epoch[1]["student"])


def test_the_heads_saved_are_those_of_the_best_epoch(two_epoch_run):
    ck, per_epoch = two_epoch_run
    assert same_state(ck["state"]["ce_head"], per_epoch[0]["ce_head"])
    assert same_state(ck["state"]["proj"], per_epoch[0]["proj"])


def test_a_batch_larger_than_the_training_set_is_a_user_error(tmp_path):
    with pytest.raises(common.UserError, match="batch"):
        distill.main(["--run", str(tmp_path / "run"), *TINY, *TINY_STUDENT, "--distill-weight", "0",
                      "--batch-size", "100000"])


# ----------------------------------------------------------------------------------
# Augmentation: every image of a batch gets its own crop offset and flip.

def test_augment_crops_each_image_on_its_own_and_keeps_the_size():
    torch.manual_seed(0)
    img = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(1, 3, 32, 32)
    out = distill.augment(img.expand(64, -1, -1, -1).contiguous())
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.uint8
    pad = 4
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))[0]
    crops = {(i, j, f): (padded[:, i:i + 32, j:j + 32].flip(2) if f else padded[:, i:i + 32, j:j + 32])
             for i in range(2 * pad + 1) for j in range(2 * pad + 1) for f in (0, 1)}
    found = []
    for o in out:  # which padded crop (and flip) each output is
        match = [key for key, c in crops.items() if torch.equal(o, c)]
        assert match, "an output is not a crop of the padded image"
        found.append(match[0][:2])
    assert len(set(found)) > 10  # one offset for the whole batch would give exactly 1
