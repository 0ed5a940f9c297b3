"""
Stage 5 of SynTrans: the results table, every row scored on the same episodes.

Paper component: the evaluation protocol of the paper (novel classes, 5-way 1-shot
and 5-shot) and its ablations, side by side in one run (../shared/DESIGN.md, stage 5).

What it does
  Samples a fixed list of novel-class episodes per shot count (5-way, 15 queries per
  class, 600 episodes by default) from one seed, extracts the student's and the
  teacher's features of the novel split once, and scores every method on exactly
  those episodes, in batches (no per-episode forward passes):
    protonet-ce         ProtoNet on the CE-only student (stage 1, --distill-weight 0)
    protonet-distilled  ProtoNet on the distilled student (stage 1)
    clip-zero-shot      the teacher's image features against the mined semantic vectors
    semantic-only       the bridge's weights h(t_c) on student features, no support used
    fixed-fusion        SemFew-style mix of prototype and h(t_c), mix chosen on val classes
    syntrans            stage 4's classifier
    syntrans-templates  the same pipeline with SynMine replaced by prompt templates
  A row whose checkpoint is absent is reported as skipped, with the command that makes it.
  Because every row sees the same episodes, it also reports the paired difference of
  each method against protonet-distilled: the mean of the per-episode accuracy
  differences and its 95% interval, the fair test of "this component helps".

Inputs   the run folder's checkpoints of stages 1-4 (and their *_templates variants)
Outputs  <run>/results.json and <run>/results.md (also printed)

Our choices: accuracy = mean over episodes of the per-episode query accuracy,
interval = 1.96 * std / sqrt(episodes); the fixed-fusion coefficient is picked per
shot count from --mixes on val episodes; zero-shot rows ignore the support set but
are scored on the same queries.
"""
import argparse
import importlib
import json
import os
import time

import torch
import torch.nn.functional as F

import common

Bridge = importlib.import_module("03_bridge").Bridge
fixed_mix = importlib.import_module("03_bridge").fixed_mix
FewShotClassifier = importlib.import_module("04_classifier").FewShotClassifier

# the ablation made with prompt templates only (see run.sh): its own stage 2-4 files
TEMPLATES = {"semantics": "02_semantics_templates.pt", "bridge": "03_bridge_templates.pt",
             "classifier": "04_classifier_templates.pt"}
METHODS = ["protonet-ce", "protonet-distilled", "clip-zero-shot", "semantic-only", "fixed-fusion",
           "syntrans", "syntrans-templates"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--episodes", type=int, default=600, help="episodes per shot count (2000 / 10000 work too)")
    p.add_argument("--shots", default="1,5", help="shot counts")
    p.add_argument("--n-way", type=int, default=5, help="classes per episode")
    p.add_argument("--n-query", type=int, default=15, help="queries per class")
    p.add_argument("--mixes", default="0.25,0.5,1,2,4", help="fixed-fusion coefficients tried on val classes")
    p.add_argument("--batch", type=int, default=500, help="episodes scored at once")
    p.add_argument("--benchmark", action="store_true", help="also time episode scoring from cached features")
    return p.parse_args(argv)


def load_optional(run, name, stage):
    """A checkpoint, or None when the stage has not been run (its row is then skipped)."""
    path = os.path.join(run, name)
    return common.load_checkpoint(path, stage, "") if os.path.exists(path) else None


def batched(fn, n, batch):
    """Per-episode accuracies [E] of fn(slice) -> logits, over episode batches."""
    return torch.cat([common.accuracy_from_logits(fn(slice(i, min(i + batch, n)))) for i in range(0, n, batch)])


def main(argv=None):
    args = get_args(argv)
    device = common.get_device(args.device)
    common.set_seed(args.seed)
    classes = common.class_names(args.dataset, args.data_root)
    shots = [int(k) for k in args.shots.split(",")]
    run = args.run
    t0 = time.time()

    # ---- checkpoints (all but the distilled student are optional)
    st = common.load_checkpoint(os.path.join(run, common.STUDENT), "distill", f"run 01_distill.py --run {run} first")
    ck = {"student-ce": load_optional(run, common.STUDENT_CE, "distill"),
          "semantics": load_optional(run, common.SEMANTICS, "mine"),
          "bridge": load_optional(run, common.BRIDGE, "bridge"),
          "classifier": load_optional(run, common.CLASSIFIER, "classifier"),
          "semantics-t": load_optional(run, TEMPLATES["semantics"], "mine"),
          "bridge-t": load_optional(run, TEMPLATES["bridge"], "bridge"),
          "classifier-t": load_optional(run, TEMPLATES["classifier"], "classifier")}
    made = {common.STUDENT: st, common.SEMANTICS: ck["semantics"], common.BRIDGE: ck["bridge"],
            TEMPLATES["semantics"]: ck["semantics-t"], TEMPLATES["bridge"]: ck["bridge-t"]}  # what later stages build on
    for name, c in [("student", st)] + list(ck.items()):
        if c is not None:
            common.check_same_world(c, os.path.join(run, name), args.dataset, classes)
            for up, u in made.items():  # a stage rerun since: what was built on it is stale
                if u is not None:
                    common.check_upstream(c, os.path.join(run, name), up, u["id"], "rerun the stages after it (see run.sh)")
    common.check_same_teacher({common.STUDENT: st, common.SEMANTICS: ck["semantics"], TEMPLATES["semantics"]: ck["semantics-t"]})

    # ---- features of the novel split, once, shared by every row
    test = common.load_split(args.dataset, "test", args.data_root, args.image_size)
    val = common.load_split(args.dataset, "val", args.data_root, args.image_size)
    common.check_episodes(test, args.n_way, args.shots, args.n_query, "--n-way, --shots or --n-query")
    if ck["bridge"] is not None:  # fixed-fusion picks its mix on val episodes of the same shape
        common.check_episodes(val, args.n_way, args.shots, args.n_query, "--n-way, --shots or --n-query")

    def student_feats(c, split):
        return common.student_features(run, common.load_student(c, device), c["id"], split, device).to(device)
    feats = {"distilled": student_feats(st, test), "val": student_feats(st, val)}
    if ck["student-ce"] is not None:
        feats["ce"] = student_feats(ck["student-ce"], test)
    if ck["semantics"] is not None:
        tid = common.check_teacher(args)  # its identity alone: the teacher is built only if its features are not cached
        if ck["semantics"].get("teacher") is not None and not common.same_teacher(ck["semantics"]["teacher"], tid):
            raise common.UserError(f"{common.SEMANTICS} was mined with teacher {ck['semantics']['teacher']}, "
                                   f"not {tid}: pass the same --clip/--clip-pretrained")
        teacher = lambda: common.load_teacher(args.clip, args.clip_pretrained, device)[:2]  # noqa: E731
        feats["teacher"] = common.teacher_image_features(run, teacher, None, tid, test, device).to(device)
    seconds_features = time.time() - t0

    def classifier_of(c, bridge_ck, name):
        m = FewShotClassifier(torch.zeros(c["n_base"], c["dim"]), c["config"]["hidden"]).to(device)
        try:
            m.load_state_dict(c["state"]["model"])
        except RuntimeError:  # written by an older 04_classifier.py with other layer shapes
            raise common.UserError(f"{os.path.join(run, name)} does not fit this code's classifier "
                                   f"(an older version wrote it): rerun 04_classifier.py --run {run}")
        b = Bridge.from_checkpoint(bridge_ck, device)
        b.load_state_dict(c["state"]["bridge"])  # the bridge as stage 4 left it (fine-tuned or not)
        return m.eval(), b

    # ---- every method as a function (shot count, episode classes, support, query) -> logits
    def protonet(key):
        return lambda k, cls, s, q: common.protonet_logits(s, q)

    def zero_shot_teacher(k, cls, s, q):
        t = F.normalize(ck["semantics"]["state"]["test"].float().to(device), dim=-1)[cls]   # [E, N, m]
        return torch.einsum("enqd,ecd->enqc", F.normalize(q, dim=-1), t)

    rows, skipped = {}, []
    with torch.no_grad():
        if "ce" in feats:
            rows["protonet-ce"] = ("ce", protonet("ce"))
        else:
            skipped.append(("protonet-ce", f"run 01_distill.py --run {run} --distill-weight 0"))
        rows["protonet-distilled"] = ("distilled", protonet("distilled"))
        if "teacher" in feats:
            rows["clip-zero-shot"] = ("teacher", zero_shot_teacher)
        else:
            skipped.append(("clip-zero-shot", f"run 02_mine.py --run {run}"))
        if ck["bridge"] is not None and ck["semantics"] is not None:
            bridge = Bridge.from_checkpoint(ck["bridge"], device)
            w_sem = bridge.to_visual(ck["semantics"]["state"]["test"].float().to(device))      # [C, d]
            rows["semantic-only"] = ("distilled", lambda k, cls, s, q: torch.einsum(
                "enqd,ecd->enqc", F.normalize(q, dim=-1), w_sem[cls]))
            # the fixed-fusion coefficient, per shot count, chosen on val episodes
            w_sem_val = bridge.to_visual(ck["semantics"]["state"]["val"].float().to(device))
            best_mix = {}
            for k in shots:
                vcls, vidx = common.sample_episodes(val.labels, args.n_way, k, args.n_query, 300, seed=args.seed + 1)
                vs, vq = common.split_episodes(feats["val"], vidx.to(device), k)
                acc = {m: common.accuracy_from_logits(torch.einsum("enqd,ecd->enqc", F.normalize(vq, dim=-1),
                       fixed_mix(vs.mean(2), w_sem_val[vcls.to(device)], m))).mean().item()
                       for m in [float(x) for x in args.mixes.split(",")]}
                best_mix[k] = max(acc, key=acc.get)
            rows["fixed-fusion"] = ("distilled", lambda k, cls, s, q: torch.einsum(
                "enqd,ecd->enqc", F.normalize(q, dim=-1), fixed_mix(s.mean(2), w_sem[cls], best_mix[k])))
        else:
            skipped += [("semantic-only", f"run 03_bridge.py --run {run}"), ("fixed-fusion", f"run 03_bridge.py --run {run}")]
        for method, cname, sname, bname in [("syntrans", "classifier", "semantics", "bridge"),
                                            ("syntrans-templates", "classifier-t", "semantics-t", "bridge-t")]:
            if ck[cname] is None or ck[sname] is None or ck[bname] is None:
                how = f"run 04_classifier.py --run {run}" if method == "syntrans" else "bash run.sh (it makes the template-only variant)"
                skipped.append((method, how))
                continue
            model, b = classifier_of(ck[cname], ck[bname],
                                     common.CLASSIFIER if method == "syntrans" else TEMPLATES["classifier"])
            w_s_all = b.to_visual(ck[sname]["state"]["test"].float().to(device))
            rows[method] = ("distilled", lambda k, cls, s, q, model=model, w=w_s_all: model.logits(q, model(s, w[cls])[0]))

        # ---- the same episodes for every row
        results, per_episode = [], {}
        t1 = time.time()
        for k in shots:
            cls, idx = common.sample_episodes(test.labels, args.n_way, k, args.n_query, args.episodes, seed=args.seed)
            cls, idx = cls.to(device), idx.to(device)
            for method in METHODS:
                if method not in rows:
                    continue
                key, fn = rows[method]
                f = feats[key]
                accs = batched(lambda sl: fn(k, cls[sl], *common.split_episodes(f, idx[sl], k)), len(idx), args.batch)
                per_episode[(method, k)] = accs.cpu()
                acc, ci = common.ci95(accs.cpu() * 100)
                results.append({"method": method, "shots": k, "acc": round(acc, 2), "ci95": round(ci, 2)})
        seconds_episodes = time.time() - t1

    def paired_difference(method, vs, k):  # mean and interval of the per-episode differences
        d, ci = common.ci95((per_episode[(method, k)] - per_episode[(vs, k)]) * 100)
        return {"method": method, "vs": vs, "shots": k, "delta": round(d, 2), "ci95": round(ci, 2)}
    paired = [paired_difference(m, "protonet-distilled", k) for m, k in per_episode if m != "protonet-distilled"]
    # what stage 4 adds over the fixed fusion of the same prototype and h(t_c)
    stage4 = [paired_difference("syntrans", "fixed-fusion", k) for k in shots
              if ("syntrans", k) in per_episode and ("fixed-fusion", k) in per_episode]

    out = {"dataset": args.dataset, "episodes": args.episodes, "n_way": args.n_way, "n_query": args.n_query,
           "seed": args.seed, "rows": results, "paired": paired, "paired_fusion": stage4,
           "skipped": [{"method": m, "how": h} for m, h in skipped],
           "seconds": {"features": round(seconds_features, 2), "episodes": round(seconds_episodes, 2)}}
    if ck["bridge"] is not None and ck["semantics"] is not None:
        out["fixed_fusion_mix"] = {str(k): v for k, v in best_mix.items()}
    common.atomic_write_text(json.dumps(out, indent=2) + "\n", os.path.join(run, common.RESULTS))
    table = markdown(out, shots)
    common.atomic_write_text(table, os.path.join(run, "results.md"))
    print(table)

    if args.benchmark:
        benchmark(rows, feats, test, shots, args, device)


def markdown(out, shots):
    """One row per method, a column per shot count, plus the paired difference vs protonet-distilled."""
    acc = {(r["method"], r["shots"]): f"{r['acc']:.2f} ± {r['ci95']:.2f}" for r in out["rows"]}
    delta = {(p["method"], p["shots"]): f"{p['delta']:+.2f} ± {p['ci95']:.2f}" for p in out["paired"]}
    lines = [f"{out['dataset']}: novel classes, {out['n_way']}-way, {out['n_query']} queries per class, "
             f"{out['episodes']} episodes (seed {out['seed']}), accuracy % with 95% interval", "",
             "| method | " + " | ".join(f"{k}-shot" for k in shots) + " | " +
             " | ".join(f"{k}-shot vs protonet-distilled" for k in shots) + " |",
             "|---|" + "---|" * (2 * len(shots))]
    for m in METHODS:
        if any((m, k) in acc for k in shots):
            lines.append(f"| {m} | " + " | ".join(acc.get((m, k), "") for k in shots) + " | " +
                         " | ".join(delta.get((m, k), "") for k in shots) + " |")
    for s in out["skipped"]:
        lines.append(f"| {s['method']} | skipped: {s['how']} |" + " |" * (2 * len(shots) - 1))
    if out["paired_fusion"]:
        lines += ["", "syntrans vs fixed-fusion, paired (what stage 4 adds): " +
                  ", ".join(f"{p['shots']}-shot {p['delta']:+.2f} ± {p['ci95']:.2f}" for p in out["paired_fusion"])]
    return "\n".join(lines) + "\n"


def benchmark(rows, feats, test, shots, args, device):
    """Episodes per second from cached features, per shot count (all rows together)."""
    with torch.no_grad():
        for k in shots:
            cls, idx = common.sample_episodes(test.labels, args.n_way, k, args.n_query, 2000, seed=args.seed + 7)
            cls, idx = cls.to(device), idx.to(device)
            t = time.time()
            for method, (key, fn) in rows.items():
                batched(lambda sl: fn(k, cls[sl], *common.split_episodes(feats[key], idx[sl], k)), len(idx), args.batch)
            dt = time.time() - t
            print(f"benchmark {k}-shot: {len(idx) * len(rows) / dt:.0f} episode-rows/s "
                  f"({len(idx)} episodes x {len(rows)} rows in {dt:.2f}s on {device})")


if __name__ == "__main__":
    common.run_main(main)
