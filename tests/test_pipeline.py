"""The end-to-end test: all five stages, in order, through run.sh on the tiny toy world
(and, marked slow, on the full toy world)."""
import importlib
import json
import os
import subprocess

import pytest

from conftest import REPO, TEST_CACHE

METHODS = [r[0] for r in importlib.import_module("05_eval").ROWS]


def test_run_sh_tiny_pipeline_writes_the_full_table(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, RUN=str(run), SYNTRANS_CACHE=TEST_CACHE, HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "run.sh"), "toy-tiny"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # every stage left its checkpoint in the one run folder
    for name in ["01_student.pt", "01_student_ce.pt", "02_semantics.pt", "02_semantics_templates.pt",
                 "03_bridge.pt", "03_bridge_templates.pt", "04_classifier.pt", "04_classifier_templates.pt",
                 "04_classifier_fixed_gate.pt", "04_classifier_shuffled.pt", "04_classifier_visual.pt",
                 "04_classifier_no_rec.pt", "04_classifier_one_way.pt",
                 "results.json", "results.md", "results_val.json", "results_val.md"]:
        assert (run / name).exists(), name

    res = json.loads((run / "results.json").read_text())
    assert res["dataset"] == "toy-tiny" and res["n_way"] == 5 and res["n_query"] == 15
    assert res["skipped"] == []
    rows = {(r["method"], r["shots"]): r for r in res["rows"]}
    assert set(rows) == {(m, k) for m in METHODS for k in (1, 5)}
    for r in res["rows"]:
        assert 0 <= r["acc"] <= 100 and r["ci95"] >= 0
    # the distilled student is above chance (20% for 5-way), even at this tiny size
    assert rows[("protonet-distilled", 1)]["acc"] > 25
    assert rows[("protonet-distilled", 5)]["acc"] > 25
    table = (run / "results.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)
    # the semantic gain vanishes when stage 4 trains and scores with shuffled semantics:
    # syntrans beats syntrans-shuffled at 1-shot beyond the paired interval, on val and novel classes
    for name in ("results.json", "results_val.json"):
        paired = {(p["method"], p["vs"], p["shots"]): p for p in json.loads((run / name).read_text())["comparisons"]}
        gain = paired[("syntrans", "syntrans-shuffled", 1)]
        assert gain["delta"] > gain["ci95"], (name, gain)


@pytest.mark.slow
def test_full_toy_run_reproduces_the_readme_claims_that_hold_in_every_seed(tmp_path):
    """bash run.sh (the full toy world, about 4 minutes on 2 cores): every row of both
    tables, and the paired claims docs/RESULTS.md makes for every training seed hold for
    seed 0 (their 95% intervals exclude zero on the val and the novel classes)."""
    run = tmp_path / "run"
    env = dict(os.environ, RUN=str(run), HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "run.sh")], env=env, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "results_val.json"):
        res = json.loads((run / name).read_text())
        assert res["skipped"] == [] and {r["method"] for r in res["rows"]} == set(METHODS)
        paired = {(p["method"], p["vs"], p["shots"]): p for p in res["comparisons"]}
        for a, b in [("protonet-distilled", "protonet-ce"), ("syntrans", "syntrans-shuffled"),
                     ("syntrans", "protonet-distilled")]:
            for k in (1, 5):
                p = paired[(a, b, k)]
                assert p["delta"] > p["ci95"], (name, a, b, k, p)
