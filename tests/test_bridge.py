"""Tests of stage 3 (03_bridge.py): a tiny run writes a loadable checkpoint; on a
synthetic world where visual prototypes are a known linear function of the semantic
vectors, h maps UNSEEN classes' semantics close to their prototypes (generalisation,
not memorisation); a stage-1 checkpoint of another dataset is refused in one line."""
import importlib
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import REPO, TINY, TINY_BRIDGE, copy_run

bridge_mod = importlib.import_module("03_bridge")
Bridge = bridge_mod.Bridge
pytestmark = pytest.mark.usefixtures("single_thread")


def test_tiny_run_writes_a_loadable_checkpoint(tiny_stage3_run):
    run = tiny_stage3_run
    ck = common.load_checkpoint(os.path.join(run, common.BRIDGE), "bridge", "rerun stage 3")
    assert ck["dataset"] == "toy-tiny" and ck["classes"] == common.class_names("toy-tiny")
    # the upstream checkpoints it was built on, by content
    assert ck["upstream"] == {common.STUDENT: common.file_id(os.path.join(run, common.STUDENT)),
                              common.SEMANTICS: common.file_id(os.path.join(run, common.SEMANTICS))}
    student = common.load_checkpoint(os.path.join(run, common.STUDENT), "distill", "")
    assert ck["dims"] == {"sem": 128, "vis": student["config"]["widths"][-1]}
    epochs = int(TINY_BRIDGE[TINY_BRIDGE.index("--epochs") + 1])
    assert ck["config"]["epochs"] == epochs and [h["epoch"] for h in ck["history"]] == list(range(1, epochs + 1))
    for h in ck["history"]:
        assert 0 <= h["val_zero_shot"] <= 100 and 0 <= h["val_1shot_mix"] <= 100 and h["loss"] == h["loss"]
    assert ck["best_acc"] == max(h["val_1shot_mix"] for h in ck["history"])

    bridge = Bridge(ck["dims"]["sem"], ck["dims"]["vis"], ck["config"]["hidden"], ck["config"]["dropout"])
    bridge.load_state_dict(ck["state"])  # strict: every weight is there
    sem = common.load_checkpoint(os.path.join(run, common.SEMANTICS), "mine", "")
    with torch.no_grad():
        w = bridge.eval().to_visual(sem["state"]["test"])
    assert w.shape == (20, ck["dims"]["vis"])
    assert torch.allclose(w.norm(dim=-1), torch.ones(20), atol=1e-5)


# ----------------------------------------------------------------------------------
# Generalisation on a synthetic world: prototype_c = normalise(A t_c), features =
# prototype + noise; h is trained on 64 base classes and judged on 20 unseen ones. The
# noise makes single shots unreliable, so that h has something to add at 1-shot (and
# the script's model selection by val 1-shot fixed-mix accuracy does not saturate).

M, D = 16, 32


def synthetic_world(seed=0, n_train=12, n_eval=20, noise=1.5):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, M, generator=g)

    def split(n_classes, n):
        t = F.normalize(torch.randn(n_classes, M, generator=g), dim=-1)
        protos = F.normalize(t @ A.t(), dim=-1)
        y = torch.arange(n_classes).repeat_interleave(n)
        x = protos[y] + noise * torch.randn(len(y), D, generator=g) / D ** 0.5
        return types.SimpleNamespace(t=t, protos=protos, labels=y, feats=x, classes=[f"c{i}" for i in range(n_classes)])
    return {"train": split(64, n_train), "val": split(16, n_eval), "test": split(20, n_eval)}


@torch.no_grad()
def unseen_cosine(bridge, split):
    return F.cosine_similarity(bridge.eval().to_visual(split.t), split.protos, dim=-1).mean().item()


def nearest_seen_cosine(world):
    """What memorisation would give: the prototype of the seen class whose semantics are
    closest to the unseen class's."""
    near = (world["test"].t @ world["train"].t.t()).argmax(1)
    return F.cosine_similarity(world["train"].protos[near], world["test"].protos, dim=-1).mean().item()


def test_h_generalises_to_unseen_classes_with_the_cls_and_centre_losses():
    """Bridge's h trained with the script's cls + centre terms, reproduced in a few lines."""
    world = synthetic_world()
    train = world["train"]
    torch.manual_seed(0)
    bridge = Bridge(M, D, hidden=64, dropout=0.0)
    before = unseen_cosine(bridge, world["test"])
    x = F.normalize(train.feats, dim=-1)
    centres = F.normalize(torch.stack([x[train.labels == c].mean(0) for c in range(64)]), dim=-1)
    opt = torch.optim.AdamW(bridge.parameters(), lr=3e-3, weight_decay=5e-4)
    for _ in range(150):
        bridge.train()
        w = bridge.to_visual(train.t)
        loss = F.cross_entropy(bridge.scale_v * x @ w.t(), train.labels) + bridge_mod.cos_loss(w, centres)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = unseen_cosine(bridge, world["test"])
    assert abs(before) < 0.3
    assert after > 0.8, after
    assert after > nearest_seen_cosine(world) + 0.2  # interpolates the map, does not look up a seen class


def test_the_scripts_training_generalises_to_unseen_classes(tmp_path, monkeypatch):
    """03_bridge.main itself (all five loss terms, its optimiser and model selection)
    on the synthetic world: the data loaders are swapped for synthetic features, the
    checkpoints are real ones."""
    world = synthetic_world(seed=1)
    run = str(tmp_path / "run")
    classes = common.class_names("toy-tiny")
    assert [len(classes[s]) for s in common.SPLITS] == [64, 16, 20]  # the synthetic world has the same shape
    widths = (2, 2, 2, 2)
    common.save_checkpoint(os.path.join(run, common.STUDENT), "distill", {"widths": list(widths)}, "toy-tiny",
                           classes, state={"student": common.ResNet12(widths).state_dict()})
    common.save_checkpoint(os.path.join(run, common.SEMANTICS), "mine", {}, "toy-tiny", classes,
                           state={s: world[s].t for s in common.SPLITS})
    monkeypatch.setattr(common, "load_split", lambda dataset, split, root=None, size=None: world[split])
    monkeypatch.setattr(common, "student_features", lambda run, net, sid, split, device: split.feats)
    bridge_mod.main(["--run", run, *TINY, "--epochs", "50", "--hidden", "64", "--dropout", "0.1", "--lr", "3e-3",
                     "--batch-size", "256", "--val-episodes", "50"])

    ck = common.load_checkpoint(os.path.join(run, common.BRIDGE), "bridge", "")
    bridge = Bridge(M, D, 64, 0.1)
    bridge.load_state_dict(ck["state"])
    torch.manual_seed(0)
    untrained = Bridge(M, D, 64, 0.1)
    test = world["test"]
    assert unseen_cosine(bridge, test) > 0.8
    assert unseen_cosine(bridge, test) > nearest_seen_cosine(world) + 0.2
    assert abs(unseen_cosine(untrained, test)) < 0.3
    # and as zero-shot classifier weights on unseen-class episodes, through the script's evaluate()
    cls, idx = common.sample_episodes(test.labels, 5, 1, 15, 100, seed=0)
    zero, mixed = bridge_mod.evaluate(bridge, test.feats, test.t, cls, idx, mix=1.0)
    zero_untrained, _ = bridge_mod.evaluate(untrained, test.feats, test.t, cls, idx, mix=1.0)
    assert zero > 85 and zero_untrained < 50, (zero, zero_untrained)
    # the val classes (unseen too) as the script saw them: h's weights lift the 1-shot mix
    assert ck["best_acc"] > 80 and ck["best_acc"] > ck["history"][0]["val_1shot_mix"] + 10
    # cross-fitting: every base class has an out-of-fold weight from a bridge that never saw
    # it; as for unseen classes it is close to the prototype, but less so than the main
    # bridge's weight for the classes it was fit on
    base = world["train"]
    assert ck["oof"].shape == (64, D) and torch.allclose(ck["oof"].norm(dim=-1), torch.ones(64), atol=1e-5)
    oof_cos = F.cosine_similarity(ck["oof"], base.protos, dim=-1).mean().item()
    assert oof_cos > 0.8 and unseen_cosine(bridge, base) > oof_cos, (oof_cos, unseen_cosine(bridge, base))


def test_folds_that_leave_too_few_classes_are_refused(tiny_stage1_run):
    with pytest.raises(common.UserError, match="--folds"):
        bridge_mod.main(["--run", tiny_stage1_run, *TINY, *TINY_BRIDGE, "--folds", "40"])


# ----------------------------------------------------------------------------------
# Upstream checkpoints of another dataset are refused

def rewrite(path, **changes):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    ck.update(changes)
    torch.save(ck, path)


def test_a_student_of_another_dataset_is_refused_in_one_line(tmp_path, tiny_stage1_run):
    run = copy_run(tiny_stage1_run, tmp_path / "run")
    rewrite(os.path.join(run, common.STUDENT), dataset="toy")  # toy and toy-tiny share their class names
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "03_bridge.py", "--run", run, *TINY, *TINY_BRIDGE],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert common.STUDENT in lines[0] and "'toy'" in lines[0] and "Traceback" not in p.stderr
    assert not os.path.exists(os.path.join(run, common.BRIDGE))


def test_semantics_of_another_dataset_are_refused(tmp_path, tiny_stage1_run):
    run = copy_run(tiny_stage1_run, tmp_path / "run")
    rewrite(os.path.join(run, common.SEMANTICS), dataset="toy")
    with pytest.raises(common.UserError, match=f"{common.SEMANTICS} was built on dataset 'toy'"):
        bridge_mod.main(["--run", run, *TINY, *TINY_BRIDGE])
    assert not os.path.exists(os.path.join(run, common.BRIDGE))
