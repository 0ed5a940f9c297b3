"""Tests of stage 5 (05_eval.py): batched episode scoring equals a plain per-episode
loop; results.json / results.md after a tiny run of stages 1-4 have every row for both
shot counts, the paired differences, and list a row whose checkpoint is absent as skipped."""
import importlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import TINY, TINY_BRIDGE, TINY_CLASSIFIER, TINY_STUDENT, copy_run, torch_threads

evaluation = importlib.import_module("05_eval")
METHODS = [r[0] for r in evaluation.ROWS]
pytestmark = pytest.mark.usefixtures("single_thread")
EPISODES = 40


# ----------------------------------------------------------------------------------
# Batched scoring equals a plain loop, one episode at a time

def loop_protonet(feats, index, k):
    """ProtoNet written out per episode and per query: cosine to the mean support feature.
    Returns the number of right answers per episode."""
    rights = []
    for ep in index:                                   # [N, K + Q] image indices
        protos = [F.normalize(feats[row[:k]].mean(0), dim=0) for row in ep]
        right = total = 0
        for true_class, row in enumerate(ep):
            for i in row[k:]:
                q = F.normalize(feats[i], dim=0)
                scores = [float(q @ p) for p in protos]
                right += int(max(range(len(scores)), key=scores.__getitem__) == true_class)
                total += 1
        rights.append(right)
    return torch.tensor(rights, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("batch", [1, 7, 500])
def test_protonet_accuracy_equals_a_per_episode_loop(k, batch):
    g = torch.Generator().manual_seed(k)
    labels = torch.arange(10).repeat_interleave(25)
    feats = (torch.randn(10, 16, generator=g)[labels] + 1.5 * torch.randn(250, 16, generator=g)).double()
    _, index = common.sample_episodes(labels, 5, k, 6, 60, seed=batch)
    batched = common.protonet_accuracy(feats, index, k, batch=batch)
    right = loop_protonet(feats, index, k)
    n_queries = 5 * 6
    assert batched.shape == (60,)
    assert torch.equal((batched.double() * n_queries).round(), right)  # the same answers, episode by episode
    assert 0.3 < right.mean() / n_queries < 0.95  # neither chance nor trivial: the comparison means something


def test_batched_equals_a_per_episode_loop_for_every_batch_size():
    """05_eval.batched over a learned classifier (FewShotClassifier) and the fixed mix, at
    several batch sizes, against scoring each episode on its own."""
    torch.manual_seed(0)
    d, labels = 24, torch.arange(12).repeat_interleave(20)
    feats = (torch.randn(12, d)[labels] + 1.2 * torch.randn(240, d)).double()
    sem = torch.randn(12, d).double()
    model = evaluation.FewShotClassifier(torch.randn(30, d), hidden=16).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # a non-trivial (not freshly initialised) model
            p.add_(0.1 * torch.randn_like(p))
    for k in (1, 5):
        cls, idx = common.sample_episodes(labels, 5, k, 7, 37, seed=k)
        methods = {
            "syntrans": lambda c, s, q: model.logits(q, model(s, sem[c])[0]),
            "fixed-fusion": lambda c, s, q: torch.einsum("enqd,ecd->enqc", F.normalize(q, dim=-1),
                                                         evaluation.fixed_mix(s.mean(2), sem[c], 0.5)),
        }
        for name, fn in methods.items():
            with torch.no_grad():
                def score(sl):
                    return fn(cls[sl], *common.split_episodes(feats, idx[sl], k))
                looped = torch.stack([common.accuracy_from_logits(score(slice(e, e + 1)))[0] for e in range(len(idx))])
                for batch in (1, 3, 16, 37, 1000):
                    assert torch.equal(evaluation.batched(score, len(idx), batch), looped), (name, k, batch)
            assert 0 < looped.mean() < 1


# ----------------------------------------------------------------------------------
# A tiny run of stages 1-4 (with the CE-only student and the template-only variant),
# then 05_eval

@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, tiny_stage3_run, make_semantics):
    run = copy_run(tiny_stage3_run, tmp_path_factory.mktemp("eval") / "run")
    f = {key: file.name for key, file in evaluation.FILES.items()}
    classifier = importlib.import_module("04_classifier").main
    with torch_threads(1):
        importlib.import_module("01_distill").main(["--run", run, *TINY, *TINY_STUDENT, "--distill-weight", "0"])
        classifier(["--run", run, *TINY, *TINY_CLASSIFIER])
        classifier(["--run", run, *TINY, *TINY_CLASSIFIER, "--visual-only", "--out", f["visual-generator"]])
        classifier(["--run", run, *TINY, *TINY_CLASSIFIER, "--reconstructor", "none",
                    "--out", f["syntrans-no-reconstructor"]])
        classifier(["--run", run, *TINY, *TINY_CLASSIFIER, "--reconstructor", "one-way",
                    "--out", f["syntrans-one-way"]])
        classifier(["--run", run, *TINY, *TINY_CLASSIFIER, "--gate", "shared", "--out", f["syntrans-fixed-gate"]])
        classifier(["--run", run, *TINY, *TINY_CLASSIFIER, "--shuffle-semantics", "--out", f["syntrans-shuffled"]])
        make_semantics(run, out=f["semantics-templates"], template="{name}")
        importlib.import_module("03_bridge").main(["--run", run, *TINY, *TINY_BRIDGE, "--semantics",
                                                   f["semantics-templates"], "--out", f["bridge-templates"]])
        classifier(["--run", run, *TINY, *TINY_CLASSIFIER, "--semantics", f["semantics-templates"],
                    "--bridge", f["bridge-templates"], "--out", f["syntrans-templates"]])
        evaluation.main(["--run", run, *TINY, "--episodes", str(EPISODES)])
        evaluation.main(["--run", run, *TINY, "--episodes", str(EPISODES), "--split", "val"])
    return run


def read_results(run):
    with open(os.path.join(run, common.RESULTS), encoding="utf-8") as f:
        return json.load(f)


def test_results_json_has_every_row_for_both_shot_counts(tiny_pipeline):
    out = read_results(tiny_pipeline)
    assert {k: out[k] for k in ("dataset", "split", "episodes", "n_way", "n_query", "episode_seed", "seed")} == \
        {"dataset": "toy-tiny", "split": "test", "episodes": EPISODES, "n_way": 5, "n_query": 15,
         "episode_seed": 0, "seed": 0}
    assert sorted((r["method"], r["shots"]) for r in out["rows"]) == \
        sorted((m, k) for k in (1, 5) for m in METHODS)  # every row once
    for r in out["rows"]:
        assert set(r) == {"method", "shots", "acc", "ci95"}
        assert 0 <= r["acc"] <= 100 and r["ci95"] >= 0
    assert out["skipped"] == []
    assert set(out["seconds"]) == {"features", "episodes"} and all(v >= 0 for v in out["seconds"].values())
    assert set(out["fixed_fusion_mix"]) == {"1", "5"}
    acc = {(r["method"], r["shots"]): r["acc"] for r in out["rows"]}
    assert acc[("protonet-distilled", 5)] > 20  # above chance (5-way)


@pytest.mark.parametrize("stem", ["results", "results_val"])
def test_paired_differences_along_the_chain(tiny_pipeline, stem):
    with open(os.path.join(tiny_pipeline, stem + ".json"), encoding="utf-8") as f:
        out = json.load(f)
    assert out["split"] == ("test" if stem == "results" else "val")
    acc = {(r["method"], r["shots"]): r["acc"] for r in out["rows"]}
    paired = {(p["method"], p["vs"], p["shots"]): p for p in out["comparisons"]}
    assert set(paired) == {(a, b, k) for a, b, _ in evaluation.COMPARISONS for k in (1, 5)}
    chain = ["protonet-ce", "protonet-distilled", "visual-generator", "syntrans-no-reconstructor", "syntrans"]
    assert all((a, b, 1) in paired for b, a in zip(chain, chain[1:]))  # each step of the chain against the one below
    for (a, b, k), p in paired.items():
        assert p["ci95"] >= 0 and p["what"]
        # the mean of the per-episode differences is the difference of the means
        assert p["delta"] == pytest.approx(acc[(a, k)] - acc[(b, k)], abs=0.02)
    with open(os.path.join(tiny_pipeline, stem + ".md"), encoding="utf-8") as f:
        md = f.read()
    assert "| syntrans − syntrans-fixed-gate | the per-class gate |" in md
    assert "cosine nearest-centroid" in md and ("val classes" if stem == "results_val" else "novel classes") in md


def test_episodes_do_not_depend_on_the_training_seed(tmp_path, tiny_pipeline):
    """--seed is the training seed; the episodes come from --episode-seed alone."""
    run = copy_run(tiny_pipeline, tmp_path / "run")
    evaluation.main(["--run", run, *TINY, "--episodes", str(EPISODES), "--seed", "3"])
    again = read_results(run)
    assert again["seed"] == 3 and again["rows"] == read_results(tiny_pipeline)["rows"]
    evaluation.main(["--run", run, *TINY, "--episodes", str(EPISODES), "--episode-seed", "5"])
    assert read_results(run)["rows"] != again["rows"]


def test_euclidean_protonet_is_minus_the_squared_distance():
    torch.manual_seed(0)
    s, q = 3 * torch.randn(2, 5, 3, 8).double(), 3 * torch.randn(2, 5, 4, 8).double()
    logits = evaluation.euclidean_protonet(None, 3, None, s, q)
    protos = s.mean(2)
    for e in range(2):
        for n in range(5):
            for j in range(4):
                want = -((q[e, n, j][None] - protos[e]) ** 2).sum(-1)
                assert torch.allclose(logits[e, n, j], want)


def test_shuffled_ablation_scores_with_stage_4s_shuffled_semantics(tiny_pipeline):
    """syntrans-shuffled reads each class's h(t_c) from another class, in the order stage 4 trained with."""
    f = {key: file.name for key, file in evaluation.FILES.items()}
    load = lambda name, stage: common.load_checkpoint(os.path.join(tiny_pipeline, f[name]), stage, "")
    sem = load("semantics", "mine")["state"]["test"].float()
    plain = evaluation.trained_classifier(tiny_pipeline, "syntrans", load("syntrans", "classifier"),
                                          load("bridge", "bridge"), sem, "test", "cpu")
    shuffled_ck = load("syntrans-shuffled", "classifier")
    shuffled = evaluation.trained_classifier(tiny_pipeline, "syntrans-shuffled", shuffled_ck,
                                             load("bridge", "bridge"), sem, "test", "cpu")
    order = importlib.import_module("04_classifier").shuffled_order(len(sem), shuffled_ck["config"]["seed"], "test")
    assert not torch.equal(order, torch.arange(len(sem)))
    bridge = evaluation.Bridge.from_checkpoint(load("bridge", "bridge"), "cpu")
    bridge.load_state_dict(shuffled_ck["state"]["bridge"])
    with torch.no_grad():
        assert torch.allclose(shuffled["w"], bridge.to_visual(sem[order]))
        assert not torch.allclose(shuffled["w"], plain["w"])


def test_protonet_row_is_protonet_on_the_seeded_episodes(tiny_pipeline):
    """The row is recomputed independently: the student's cached features of the novel
    split and the episodes that --seed gives."""
    run, out = tiny_pipeline, read_results(tiny_pipeline)
    st = common.load_checkpoint(os.path.join(run, common.STUDENT), "distill", "")
    net = common.ResNet12(tuple(st["config"]["widths"]))
    net.load_state_dict(st["state"]["student"])
    test = common.load_split("toy-tiny", "test")
    feats = common.student_features(run, net, st["id"], test, "cpu")
    for k in (1, 5):
        _, idx = common.sample_episodes(test.labels, 5, k, 15, EPISODES, seed=0)
        acc, ci = common.ci95(common.protonet_accuracy(feats, idx, k) * 100)
        row = next(r for r in out["rows"] if r["method"] == "protonet-distilled" and r["shots"] == k)
        assert (row["acc"], row["ci95"]) == (round(acc, 2), round(ci, 2))


def test_results_md_has_one_line_per_method(tiny_pipeline):
    out = read_results(tiny_pipeline)
    with open(os.path.join(tiny_pipeline, "results.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    rows = rows[:len(METHODS)]  # the accuracy table; the paired differences follow
    assert [r.split("|")[1].strip() for r in rows] == METHODS
    for m, line in zip(METHODS, rows):
        for k in (1, 5):
            r = next(r for r in out["rows"] if r["method"] == m and r["shots"] == k)
            assert f"{r['acc']:.2f} ± {r['ci95']:.2f}" in line


def test_a_row_whose_checkpoint_is_absent_is_listed_as_skipped(tmp_path, tiny_pipeline):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    os.remove(os.path.join(run, common.STUDENT_CE))
    os.remove(os.path.join(run, evaluation.FILES["syntrans-templates"].name))
    evaluation.main(["--run", run, *TINY, "--episodes", "10"])
    out = read_results(run)
    skipped = {s["method"]: s["how"] for s in out["skipped"]}
    assert set(skipped) == {"protonet-ce", "syntrans-templates"}
    assert "--distill-weight 0" in skipped["protonet-ce"] and skipped["syntrans-templates"]
    present = {r["method"] for r in out["rows"]}
    assert present == set(METHODS) - set(skipped)
    with open(os.path.join(run, "results.md"), encoding="utf-8") as f:
        md = f.read()
    assert "| protonet-ce | skipped:" in md and "| syntrans-templates | skipped:" in md


def test_only_the_distilled_student_gives_its_two_rows_and_the_rest_skipped(tmp_path, tiny_stage1_run):
    run = copy_run(tiny_stage1_run, tmp_path / "run")
    os.remove(os.path.join(run, common.SEMANTICS))
    evaluation.main(["--run", run, *TINY, "--episodes", "10"])
    out = read_results(run)
    assert {r["method"] for r in out["rows"]} == {"protonet-distilled", "protonet-euclidean"}
    assert [(p["method"], p["vs"]) for p in out["comparisons"]] == [("protonet-euclidean", "protonet-distilled")] * 2
    assert {s["method"] for s in out["skipped"]} == set(METHODS) - {"protonet-distilled", "protonet-euclidean"}


def test_a_classifier_without_its_bridge_is_skipped_not_a_crash(tmp_path, tiny_pipeline):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    os.remove(os.path.join(run, evaluation.FILES["bridge-templates"].name))
    evaluation.main(["--run", run, *TINY, "--episodes", "10"])
    assert "syntrans-templates" in {s["method"] for s in read_results(run)["skipped"]}
