"""Tests of stage 4 (04_classifier.py): a tiny run trains and writes a loadable
checkpoint; the loss goes down on a fixed set of episodes; with semantics that carry no
information the gate learns to lean on the visual weights (a behavioural check)."""
import importlib
import os
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import TINY, TINY_CLASSIFIER, copy_run, torch_threads

clf = importlib.import_module("04_classifier")
Bridge = importlib.import_module("03_bridge").Bridge
FewShotClassifier = clf.FewShotClassifier
pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------
# A tiny run on the toy world

@pytest.fixture(scope="module")
def tiny_classifier_run(tmp_path_factory, tiny_stage3_run):
    run = copy_run(tiny_stage3_run, tmp_path_factory.mktemp("classifier") / "run")
    with torch_threads(1):
        clf.main(["--run", run, *TINY, *TINY_CLASSIFIER])
    return run


def test_tiny_run_trains_and_writes_a_loadable_checkpoint(tiny_classifier_run):
    run = tiny_classifier_run
    ck = common.load_checkpoint(os.path.join(run, common.CLASSIFIER), "classifier", "rerun stage 4")
    assert ck["dataset"] == "toy-tiny" and ck["classes"] == common.class_names("toy-tiny")
    assert ck["upstream"] == {name: common.file_id(os.path.join(run, name))
                              for name in (common.STUDENT, common.SEMANTICS, common.BRIDGE)}
    bridge_ck = common.load_checkpoint(os.path.join(run, common.BRIDGE), "bridge", "")
    d = bridge_ck["dims"]["vis"]
    assert ck["n_base"] == 64 and ck["dim"] == d
    steps = int(TINY_CLASSIFIER[TINY_CLASSIFIER.index("--steps") + 1])
    assert ck["config"]["steps"] == steps and [h["step"] for h in ck["history"]] == [3, 6]
    for h in ck["history"]:
        assert 0 <= h["val_1shot"] <= 100 and 0 <= h["val_5shot"] <= 100
        assert 0 < h["gate_1shot"] < 1 and 0 < h["gate_5shot"] < 1
    assert ck["best_acc"] == max((h["val_1shot"] + h["val_5shot"]) / 2 for h in ck["history"])

    # the weights rebuild the classifier and the bridge it used (strict loading), and they
    # are trained: not the freshly initialised model; the reconstructor (--reconstructor
    # visual by default) has moved away from its start (its mix's last layer zero), while
    # the one-way reading's residual R, unused here, stays zero
    assert ck["config"]["reconstructor"] == "visual"
    model = FewShotClassifier(torch.zeros(ck["n_base"], d), ck["config"]["hidden"])
    model.load_state_dict(ck["state"]["model"])
    assert not torch.equal(model.phi_avg, torch.ones(d)) and not torch.equal(model.scale, torch.tensor(10.0))
    assert model.rec_mix[-1].weight.any() and not model.rec[-1].weight.any()
    bridge = Bridge(bridge_ck["dims"]["sem"], d, bridge_ck["config"]["hidden"], bridge_ck["config"]["dropout"])
    bridge.load_state_dict(ck["state"]["bridge"])
    assert all(torch.equal(v, bridge_ck["state"][k]) for k, v in ck["state"]["bridge"].items())  # frozen by default

    # and they score an episode
    with torch.no_grad():
        w, w_v, w_s, alpha = model.eval()(torch.randn(2, 5, 1, d), torch.randn(2, 5, d))
        logits = model.logits(torch.randn(2, 5, 3, d), w)
    assert logits.shape == (2, 5, 3, 5) and alpha.shape == (2, 5) and torch.isfinite(logits).all()


def test_the_one_way_reconstructor_trains_and_w_rec_trains_it_too(tmp_path, tiny_stage3_run):
    run = copy_run(tiny_stage3_run, tmp_path / "run")
    with torch_threads(1):
        clf.main(["--run", run, *TINY, *TINY_CLASSIFIER, "--reconstructor", "one-way", "--w-rec", "1"])
    ck = common.load_checkpoint(os.path.join(run, common.CLASSIFIER), "classifier", "")
    assert ck["state"]["model"]["rec.2.weight"].any()  # moved away from the identity


def test_the_reconstructor_changes_w_s_where_the_support_disagrees_with_t_c():
    """--reconstructor semantic: w_s = h(mix of t_c and g(S)); where g(S) agrees with t_c it is
    h(t_c), where it disagrees it moves towards h(g(S)), by the learned per-class mix beta."""
    torch.manual_seed(0)
    d, m = 16, 12
    h_map = torch.nn.Linear(m, d)
    h = lambda t: F.normalize(h_map(t), dim=-1)  # noqa: E731
    t = F.normalize(torch.randn(2, 5, m), dim=-1)
    other = F.normalize(torch.randn(2, 5, m), dim=-1)
    support = torch.randn(2, 5, 1, d)
    for reading in ("semantic", "visual"):
        model = FewShotClassifier(torch.randn(30, d), hidden=8, reconstructor=reading).eval()
        with torch.no_grad():
            agree = model(support, h(t), read={"t": t, "g": t, "h": h})[2]
            disagree = model(support, h(t), read={"t": t, "g": other, "h": h})[2]
            assert torch.allclose(agree, h(t), atol=1e-6)  # the same vector: nothing to rebuild
            assert (F.cosine_similarity(disagree, h(t), dim=-1) < 0.999).all()
            assert (F.cosine_similarity(disagree, h(other), dim=-1)
                    > F.cosine_similarity(h(t), h(other), dim=-1)).all()
    # without the bridge at hand the semantic readings refuse, rather than fall back silently
    with pytest.raises(ValueError, match="read"):
        FewShotClassifier(torch.randn(30, d), reconstructor="semantic")(support, h(t))
    # none: w_s is h(t_c) whatever the support says
    model = FewShotClassifier(torch.randn(30, d), reconstructor="none").eval()
    assert torch.allclose(model(support, h(t), read={"t": t, "g": other, "h": h})[2], h(t).detach())


def test_a_bridge_built_on_another_student_is_refused(tmp_path, tiny_stage3_run):
    run = copy_run(tiny_stage3_run, tmp_path / "run")
    path = os.path.join(run, common.STUDENT)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    ck["seconds"] = -1.0  # another file: the bridge's record of its student no longer matches
    torch.save(ck, path)
    with pytest.raises(common.UserError, match="rerun 03_bridge.py"):
        clf.main(["--run", run, *TINY, *TINY_CLASSIFIER])
    assert not os.path.exists(os.path.join(run, common.CLASSIFIER))


# ----------------------------------------------------------------------------------
# Synthetic worlds: class centres are random unit vectors in d dimensions, features are
# centre + noise (a single shot is informative but noisy). Informative semantics give
# h(t_c) = the class's true centre.

D = 32


def synthetic_split(g, n_classes, n, noise=1.0):
    mu = F.normalize(torch.randn(n_classes, D, generator=g), dim=-1)
    y = torch.arange(n_classes).repeat_interleave(n)
    x = mu[y] + noise * torch.randn(len(y), D, generator=g) / D ** 0.5
    return types.SimpleNamespace(labels=y, feats=x, centres=mu, classes=[f"c{i}" for i in range(n_classes)])


def class_centres(split):
    x = F.normalize(split.feats, dim=-1)
    return F.normalize(torch.stack([x[split.labels == c].mean(0) for c in range(len(split.classes))]), dim=-1)


def episode_loss(model, feats, centres, sem, cls, idx, k, hide=True):
    """The script's training loss: query cross-entropy plus the reconstruction term."""
    support, query = common.split_episodes(feats, idx, k)
    w, w_v, w_s, alpha = model(support, sem[cls], hide=cls if hide else None)
    logits = model.logits(query, w)
    target = torch.arange(cls.shape[1]).view(1, -1, 1).expand(len(cls), -1, query.shape[2])
    rec = (1 - F.cosine_similarity(w_s, centres[cls], dim=-1)).mean()
    return F.cross_entropy(logits.reshape(-1, cls.shape[1]), target.reshape(-1)) + rec, alpha


def test_loss_goes_down_on_a_fixed_set_of_episodes():
    g = torch.Generator().manual_seed(0)
    base = synthetic_split(g, 64, 20, noise=2.0)  # noisy shots: the episodes are not solved at the start
    centres = class_centres(base)
    sem = F.normalize(centres + torch.randn(64, D, generator=g) / D ** 0.5, dim=-1)  # roughly right semantics
    torch.manual_seed(0)
    model = FewShotClassifier(centres, hidden=32, reconstructor="one-way")  # R: the old default class
    episodes = {k: common.sample_episodes(base.labels, 5, k, 10, 8, seed=k) for k in (1, 5)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)

    def loss_on_all():
        return sum(episode_loss(model, base.feats, centres, sem, cls, idx, k)[0] for k, (cls, idx) in episodes.items())
    with torch.no_grad():
        initial = loss_on_all().item()
    for _ in range(40):
        loss = loss_on_all()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = loss_on_all().item()
    assert initial > 1.0 and final < 0.5 * initial, (initial, final)


@torch.no_grad()
def mean_gate(model, split, sem, k, episodes=100):
    cls, idx = common.sample_episodes(split.labels, 5, k, 5, episodes, seed=1000 + k)
    support, _ = common.split_episodes(split.feats, idx, k)
    return model(support, sem[cls])[3].mean().item()


def train_gate(informative, seed=0, steps=300):
    """FewShotClassifier meta-trained as the script does (alternating 1 and 5 shots, base
    classes hidden from the attention, query CE + reconstruction), on 64 base classes;
    returns its mean gate alpha (weight on the visual weight) on 20 novel classes at 1
    and 5 shots. Uninformative semantics are re-shuffled across classes at every step
    (a fixed permutation would be a bijection the reconstructor can learn to undo)."""
    g = torch.Generator().manual_seed(seed)
    base, novel = synthetic_split(g, 64, 20), synthetic_split(g, 20, 20)
    centres, novel_centres = class_centres(base), class_centres(novel)
    torch.manual_seed(seed)
    model = FewShotClassifier(centres, hidden=32, reconstructor="one-way")  # R: the old default class
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    for step in range(steps):
        k = (1, 5)[step % 2]
        cls, idx = common.sample_episodes(base.labels, 5, k, 5, 8, seed=step)
        sem = centres if informative else centres[torch.randperm(64, generator=g)]
        loss, _ = episode_loss(model, base.feats, centres, sem, cls, idx, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    sem_novel = novel_centres if informative else novel_centres[torch.randperm(20, generator=g)]
    return {k: mean_gate(model, novel, sem_novel, k) for k in (1, 5)}


def test_without_semantic_information_the_gate_leans_on_the_visual_weights():
    shuffled, informative = train_gate(informative=False), train_gate(informative=True)
    for k in (1, 5):
        assert shuffled[k] > 0.55, (k, shuffled, informative)
        assert shuffled[k] > informative[k] + 0.3, (k, shuffled, informative)
    assert informative[1] < 0.5  # with true class centres as semantics it leans on them


def test_the_scripts_training_gate_with_and_without_shuffle_semantics(tmp_path, monkeypatch):
    """04_classifier.main itself on synthetic features (its data loading swapped out; the
    bridge's h an identity so that h(t_c) = t_c, no reconstructor, as its g is random), with
    true centres as semantics, and with --shuffle-semantics: the gate on val classes must move
    towards the visual weights."""
    g = torch.Generator().manual_seed(0)
    splits = {"train": synthetic_split(g, 64, 20), "val": synthetic_split(g, 16, 24)}
    sem = {s: class_centres(v) for s, v in splits.items()}

    def load_upstream(args, classes, device):
        ck = {"distill": {"id": "student", "config": {}}, "mine": {"id": "semantics", "state": sem}, "bridge": {"id": "bridge"}}
        bridge = Bridge(D, D, 8, 0.0)
        bridge.h = nn.Identity()
        return ck, None, bridge
    monkeypatch.setattr(clf, "load_upstream", load_upstream)
    monkeypatch.setattr(common, "load_split", lambda dataset, split, root=None, size=None: splits[split])
    # the held-out base images: here the same synthetic base split
    monkeypatch.setattr(common, "base_split", lambda dataset, part, root=None, size=None, heldout=0.2:
                        splits["train"])
    monkeypatch.setattr(common, "student_features", lambda run, net, sid, split, device: split.feats)

    def gate(*flags):
        run = str(tmp_path / f"run{len(flags)}")
        clf.main(["--run", run, *TINY, "--steps", "300", "--val-every", "300", "--val-episodes", "100",
                  "--hidden", "32", "--lr", "1e-3", "--reconstructor", "none", *flags])
        return common.load_checkpoint(os.path.join(run, common.CLASSIFIER), "classifier", "")["history"][-1]
    informative, shuffled = gate(), gate("--shuffle-semantics")
    assert informative["gate_1shot"] < 0.5 and informative["val_1shot"] > 95, informative
    for k in (1, 5):
        assert shuffled[f"gate_{k}shot"] > 0.5, shuffled
        assert shuffled[f"gate_{k}shot"] > informative[f"gate_{k}shot"] + 0.2, (informative, shuffled)


def test_shared_gate_gives_every_class_one_mix_the_per_class_gate_does_not():
    """--gate shared (the syntrans-fixed-gate row): the gate sees log K alone, so all
    classes of all episodes with the same shot count get the same alpha."""
    g = torch.Generator().manual_seed(1)
    base = synthetic_split(g, 64, 20, noise=2.0)
    centres = class_centres(base)
    sem = F.normalize(torch.randn(64, D, generator=g), dim=-1)  # semantics that agree with some classes more
    cls, idx = common.sample_episodes(base.labels, 5, 1, 5, 6, seed=0)
    support, _ = common.split_episodes(base.feats, idx, 1)
    torch.manual_seed(0)
    for per_class in (True, False):
        model = FewShotClassifier(centres, hidden=32, per_class_gate=per_class, reconstructor="one-way")
        with torch.no_grad():
            for p in model.gate.parameters():  # a gate that does depend on its inputs
                p.normal_()
            alpha = model(support, sem[cls])[3]
        assert (alpha.std() > 1e-3) == per_class, (per_class, alpha)
