"""
Stage 5 of SynTrans: the results table, every row scored on the same episodes.

Paper component: the evaluation protocol of the paper (novel classes, 5-way 1-shot
and 5-shot) and its ablations, side by side in one run (../shared/DESIGN.md, stage 5).

What it does
  Samples a fixed list of episodes per shot count (5-way, 15 queries per class, 600
  episodes by default) from --episode-seed, which no training seed touches, extracts
  the features of the split once, and scores every row of ROWS below on exactly those
  episodes, in batches (no per-episode forward passes). Two splits:
    --split test  the novel classes: the final table (results.json, results.md);
    --split val   the val classes: where every default and every "which variant is
                  better" question is decided (results_val.json, results_val.md).
  A row whose checkpoint is absent is reported as skipped, with the command that makes
  it. Because every row sees the same episodes, COMPARISONS gives paired differences:
  the mean of the per-episode accuracy differences of two rows and its 95% interval,
  the fair test of "this component helps". Each stage-4 component has its own row,
  so that each step of the chain adds one thing.

Inputs   the run folder's checkpoints of stages 1-4 (and the ablations run.sh makes)
Outputs  <run>/results.json and results.md (--split test), or results_val.json and
         results_val.md (--split val); the table is also printed.

Our choices: accuracy = mean over episodes of the per-episode query accuracy,
interval = 1.96 * std / sqrt(episodes); the fixed-fusion coefficient is picked per
shot count from --mixes on val episodes of another seed (also when --split val, so
the reported val episodes are not the ones it was picked on); zero-shot rows ignore
the support set but are scored on the same queries.
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
classifier_stage = importlib.import_module("04_classifier")
FewShotClassifier = classifier_stage.FewShotClassifier


# ----------------------------------------------------------------------------------
# The rows. Each is a function (x, k, classes, support, query) -> logits [E, N, Q, N]:
# x is what the row needs beyond the features (None, the semantic weights, a trained
# classifier), k the shot count, classes [E, N] the episodes' class indices in the
# split, support [E, N, K, d] and query [E, N, Q, d] their features.

def cosine_centroid(x, k, cls, s, q):
    """Nearest class centroid by cosine (SimpleShot without centring). The rows
    protonet-ce and protonet-distilled use it; ProtoNet's own metric is below."""
    return common.protonet_logits(s, q)


def euclidean_protonet(x, k, cls, s, q):
    """ProtoNet as Snell et al. 2017 score it: minus the squared Euclidean distance
    to the mean support feature, on unnormalised features."""
    return -torch.cdist(q.flatten(1, 2), s.mean(2)).pow(2).view(*q.shape[:3], -1)


def clip_zero_shot(text, k, cls, s, q):
    """The teacher's image features against the mined semantic vectors (q: teacher features)."""
    return torch.einsum("enqd,ecd->enqc", F.normalize(q, dim=-1), F.normalize(text, dim=-1)[cls])


def semantic_only(sem, k, cls, s, q):
    """The bridge's weights h(t_c) on student features; the support is not used."""
    return torch.einsum("enqd,ecd->enqc", F.normalize(q, dim=-1), sem["w"][cls])


def fixed_fusion(sem, k, cls, s, q):
    """SemFew-style: normalise(normalise(prototype) + mix * h(t_c)), mix chosen on val per shot count."""
    return torch.einsum("enqd,ecd->enqc", F.normalize(q, dim=-1), fixed_mix(s.mean(2), sem["w"][cls], sem["mix"][k]))


def visual_generator(clf, k, cls, s, q):
    """Stage 4's visual weight w_v alone (support mean + attention read-out over base weights)."""
    return clf["model"].logits(q, clf["model"].visual_weight(s))


def syntrans(clf, k, cls, s, q):
    """Stage 4's classifier: w_v and h(t_c) fused by its gate."""
    return clf["model"].logits(q, clf["model"](s, clf["w"][cls])[0])


# name, features it reads, what it needs (a key of `needs` in main), the function
ROWS = [
    ("protonet-ce",         "student-ce", None,                  cosine_centroid),
    ("protonet-distilled",  "student",    None,                  cosine_centroid),
    ("protonet-euclidean",  "student",    None,                  euclidean_protonet),
    ("clip-zero-shot",      "teacher",    "text",                clip_zero_shot),
    ("semantic-only",       "student",    "bridge",              semantic_only),
    ("fixed-fusion",        "student",    "bridge",              fixed_fusion),
    ("visual-generator",    "student",    "syntrans",            visual_generator),
    ("syntrans-fixed-gate", "student",    "syntrans-fixed-gate", syntrans),
    ("syntrans",            "student",    "syntrans",            syntrans),
    ("syntrans-shuffled",   "student",    "syntrans-shuffled",   syntrans),
    ("syntrans-templates",  "student",    "syntrans-templates",  syntrans),
]

# paired differences (row, minus row, what the difference isolates); the first five
# are the chain protonet-ce -> ... -> syntrans, each step adding one thing
COMPARISONS = [
    ("protonet-distilled", "protonet-ce", "distillation from the teacher (stage 1)"),
    ("fixed-fusion", "protonet-distilled", "semantics through the bridge, one fixed mix (stages 2-3)"),
    ("visual-generator", "fixed-fusion", "stage 4's visual generator alone, against the fixed fusion"),
    ("syntrans-fixed-gate", "visual-generator", "adding h(t_c) to w_v with one learned mix for all classes"),
    ("syntrans", "syntrans-fixed-gate", "the per-class gate"),
    ("visual-generator", "protonet-distilled", "the attention read-out over base-class weights"),
    ("syntrans", "fixed-fusion", "all of stage 4"),
    ("syntrans", "protonet-distilled", "the whole method against the student's own prototypes"),
    ("syntrans", "syntrans-shuffled", "what the semantics say (shuffled across classes: no information)"),
    ("syntrans", "syntrans-templates", "SynMine's descriptions against prompt templates of the class name"),
    ("protonet-euclidean", "protonet-distilled", "squared Euclidean against cosine prototypes"),
]

# ----------------------------------------------------------------------------------
# The run: the checkpoints it reads, its flags, then main() (load, score every row, write)

# checkpoints of the ablations run.sh makes: name -> file in the run folder
FILES = {"student-ce": common.STUDENT_CE, "semantics": common.SEMANTICS, "bridge": common.BRIDGE,
         "syntrans": common.CLASSIFIER, "syntrans-fixed-gate": "04_classifier_fixed_gate.pt",
         "syntrans-shuffled": "04_classifier_shuffled.pt", "semantics-templates": "02_semantics_templates.pt",
         "bridge-templates": "03_bridge_templates.pt", "syntrans-templates": "04_classifier_templates.pt"}
STAGE_OF = {"student-ce": "distill", "semantics": "mine", "bridge": "bridge", "semantics-templates": "mine",
            "bridge-templates": "bridge"}  # the rest are stage 4's
# what a row's features or needs are made from, in stage order; and how to make each file
MADE_FROM = {"student": [], "student-ce": ["student-ce"], "teacher": ["semantics"], "text": ["semantics"],
             "bridge": ["semantics", "bridge"], "syntrans": ["semantics", "bridge", "syntrans"],
             "syntrans-fixed-gate": ["semantics", "bridge", "syntrans-fixed-gate"],
             "syntrans-shuffled": ["semantics", "bridge", "syntrans-shuffled"],
             "syntrans-templates": ["semantics-templates", "bridge-templates", "syntrans-templates"], None: []}
HOW = {"student-ce": "run 01_distill.py --distill-weight 0", "semantics": "run 02_mine.py", "bridge": "run 03_bridge.py",
       "syntrans": "run 04_classifier.py", "syntrans-fixed-gate": "run 04_classifier.py --gate shared --out "
       + FILES["syntrans-fixed-gate"], "syntrans-shuffled": "run 04_classifier.py --shuffle-semantics --out "
       + FILES["syntrans-shuffled"]}  # the templates-only files: bash run.sh makes them


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="test: the novel classes, the final table; val: the val classes, where choices are made")
    p.add_argument("--episode-seed", type=int, default=0,
                   help="seed of the evaluation episodes (independent of --seed, so every training seed is "
                        "scored on the same episodes)")
    p.add_argument("--episodes", type=int, default=600, help="episodes per shot count (2000 / 10000 work too)")
    p.add_argument("--shots", default="1,5", help="shot counts")
    p.add_argument("--n-way", type=int, default=5, help="classes per episode")
    p.add_argument("--n-query", type=int, default=15, help="queries per class")
    p.add_argument("--mixes", default="0.25,0.5,1,2,4", help="fixed-fusion coefficients tried on val classes")
    p.add_argument("--batch", type=int, default=500, help="episodes scored at once")
    p.add_argument("--benchmark", action="store_true", help="also time episode scoring from cached features")
    return p.parse_args(argv)


# the valid values of the numeric flags, checked before any work (common.check_flags)
RANGES = {"episodes": "[1, inf)", "batch": "[1, inf)"}


def main(argv=None):
    args = get_args(argv)
    common.check_flags(args, RANGES)
    shots = common.parse_list(args.shots, "--shots", int, "shot counts", "1,5")
    mixes = common.parse_list(args.mixes, "--mixes", float, "fusion coefficients", "0.25,0.5,1")
    device = common.get_device(args.device)
    common.set_seed(args.seed)
    classes = common.class_names(args.dataset, args.data_root)
    run, split_name = args.run, args.split
    t0 = time.time()

    # ---- checkpoints (all but the distilled student are optional), checked against each other
    st = common.load_checkpoint(os.path.join(run, common.STUDENT), "distill", f"run 01_distill.py --run {run} first")
    ck = {name: load_optional(run, f, STAGE_OF.get(name, "classifier")) for name, f in FILES.items()}
    check_consistent(st, ck, args.dataset, classes)

    # ---- features of the evaluated split, once, shared by every row
    split = common.load_split(args.dataset, split_name, args.data_root, args.image_size)
    val = split if split_name == "val" else common.load_split(args.dataset, "val", args.data_root, args.image_size)
    common.check_episodes(split, args.n_way, args.shots, args.n_query, "--n-way, --shots or --n-query")
    if ck["bridge"] is not None:  # fixed-fusion picks its mix on val episodes of the same shape
        common.check_episodes(val, args.n_way, args.shots, args.n_query, "--n-way, --shots or --n-query")
    feats = {"student": student_feats(run, st, split, device)}
    if ck["student-ce"] is not None:
        feats["student-ce"] = student_feats(run, ck["student-ce"], split, device)
    if ck["semantics"] is not None:
        feats["teacher"] = teacher_feats(args, ck["semantics"], split, device)
    seconds_features = time.time() - t0

    # ---- what each row needs beyond features: semantic vectors, h(t_c), trained classifiers
    semantics = lambda name: ck[name]["state"][split_name].float().to(device)  # [C, m] of the evaluated split
    needs = {None: None}
    with torch.no_grad():
        if ck["semantics"] is not None:
            needs["text"] = semantics("semantics")
            if ck["bridge"] is not None:
                bridge = Bridge.from_checkpoint(ck["bridge"], device)
                f_val = feats["student"] if split_name == "val" else student_feats(run, st, val, device)
                mix = choose_mix(bridge, ck["semantics"], f_val, val, shots, mixes, args, device)
                needs["bridge"] = {"w": bridge.to_visual(needs["text"]), "mix": mix}
        for name, sem, br in [("syntrans", "semantics", "bridge"), ("syntrans-fixed-gate", "semantics", "bridge"),
                              ("syntrans-shuffled", "semantics", "bridge"),
                              ("syntrans-templates", "semantics-templates", "bridge-templates")]:
            if ck[name] is not None and ck[sem] is not None and ck[br] is not None:
                needs[name] = trained_classifier(run, name, ck[name], ck[br], semantics(sem), split_name, device)

    # ---- every row on the same episodes
    rows = [r for r in ROWS if r[1] in feats and r[2] in needs]
    skipped = [{"method": r[0], "how": how_to_make(r, ck, run)} for r in ROWS if r not in rows]
    results, per_episode, gates = [], {}, {}
    t1 = time.time()
    with torch.no_grad():
        for k in shots:
            cls, idx = common.sample_episodes(split.labels, args.n_way, k, args.n_query, args.episodes,
                                              seed=args.episode_seed)
            cls, idx = cls.to(device), idx.to(device)
            for method, key, need, fn in rows:
                accs = batched(lambda sl: fn(needs[need], k, cls[sl], *common.split_episodes(feats[key], idx[sl], k)),
                               len(idx), args.batch)
                per_episode[(method, k)] = accs.cpu()
                acc, ci = common.ci95(accs.cpu() * 100)
                results.append({"method": method, "shots": k, "acc": round(acc, 2), "ci95": round(ci, 2)})
            if "syntrans" in needs:  # where the per-class gate put its weight (weight on the visual side)
                gates[k] = gate_per_class(needs["syntrans"], feats["student"], cls, idx, k, len(split.classes), args.batch)
    seconds_episodes = time.time() - t1

    comparisons = [paired_difference(per_episode, a, b, k, what)
                   for a, b, what in COMPARISONS for k in shots if (a, k) in per_episode and (b, k) in per_episode]
    out = {"dataset": args.dataset, "split": split_name, "episodes": args.episodes, "n_way": args.n_way,
           "n_query": args.n_query, "episode_seed": args.episode_seed, "seed": args.seed,
           "rows": results, "comparisons": comparisons, "skipped": skipped,
           "gate": gate_report(gates, ck["semantics"], classes[split_name]) if gates else None,
           "fixed_fusion_mix": {str(k): v for k, v in needs["bridge"]["mix"].items()} if "bridge" in needs else None,
           "seconds": {"features": round(seconds_features, 2), "episodes": round(seconds_episodes, 2)}}
    stem = os.path.join(run, "results" if split_name == "test" else "results_val")
    table = markdown(out, shots)
    common.write_files({stem + ".json": (json.dumps(out, indent=2) + "\n").encode(),
                        stem + ".md": table.encode()})  # in one step: both describe this run
    print(table)

    if args.benchmark:
        benchmark(rows, needs, feats, split, shots, args, device)


# ----------------------------------------------------------------------------------
# Features, the fixed-fusion mix, the trained classifiers

def student_feats(run, ck, split, device):
    return common.student_features(run, common.load_student(ck, device), ck["id"], split, device).to(device)


def teacher_feats(args, semantics_ck, split, device):
    tid = common.check_teacher(args)  # its identity alone: the teacher is built only if its features are not cached
    if semantics_ck.get("teacher") is not None and not common.same_teacher(semantics_ck["teacher"], tid):
        raise common.UserError(f"{common.SEMANTICS} was mined with teacher {semantics_ck['teacher']}, "
                               f"not {tid}: pass the same --clip/--clip-pretrained")
    teacher = lambda: common.load_teacher(args.clip, args.clip_pretrained, device)[:2]  # noqa: E731
    return common.teacher_image_features(args.run, teacher, None, tid, split, device).to(device)


def choose_mix(bridge, semantics_ck, f_val, val, shots, mixes, args, device):
    """Per shot count, the --mixes coefficient with which the fixed-fusion row scores best
    on 300 val episodes (seed --episode-seed + 1: never the episodes a table reports)."""
    w_val = bridge.to_visual(semantics_ck["state"]["val"].float().to(device))
    best = {}
    for k in shots:
        vcls, vidx = common.sample_episodes(val.labels, args.n_way, k, args.n_query, 300, seed=args.episode_seed + 1)
        vs, vq = common.split_episodes(f_val, vidx.to(device), k)
        acc = {m: common.accuracy_from_logits(fixed_fusion({"w": w_val, "mix": {k: m}}, k, vcls.to(device), vs, vq))
               .mean().item() for m in mixes}
        best[k] = max(acc, key=acc.get)
    return best


def trained_classifier(run, name, c, bridge_ck, sem, split_name, device):
    """Stage 4's classifier and the h(t_c) of the evaluated split's classes, through the
    bridge as stage 4 left it; the shuffled ablation reads its classes' semantics in
    stage 4's shuffled order."""
    cfg = c["config"]
    m = FewShotClassifier(torch.zeros(c["n_base"], c["dim"]), cfg["hidden"],
                          per_class_gate=cfg.get("gate", "per-class") == "per-class").to(device)
    try:
        m.load_state_dict(c["state"]["model"])
    except RuntimeError:  # written by an older 04_classifier.py with other layer shapes
        raise common.UserError(f"{os.path.join(run, FILES[name])} does not fit this code's classifier "
                               f"(an older version wrote it): rerun 04_classifier.py --run {run}")
    b = Bridge.from_checkpoint(bridge_ck, device)
    b.load_state_dict(c["state"]["bridge"])
    if cfg.get("shuffle_semantics"):
        sem = sem[classifier_stage.shuffled_order(len(sem), cfg["seed"], split_name).to(device)]
    return {"model": m.eval(), "w": b.eval().to_visual(sem)}


# ----------------------------------------------------------------------------------
# Paired differences, the gate's weights, the table

def batched(fn, n, batch):
    """Per-episode accuracies [E] of fn(slice) -> logits, over episode batches."""
    return torch.cat([common.accuracy_from_logits(fn(slice(i, min(i + batch, n)))) for i in range(0, n, batch)])


def paired_difference(per_episode, a, b, k, what):
    """Row a minus row b on the same episodes: mean and 95% interval of the differences."""
    d, ci = common.ci95((per_episode[(a, k)] - per_episode[(b, k)]) * 100)
    return {"method": a, "vs": b, "shots": k, "delta": round(d, 2), "ci95": round(ci, 2), "what": what}


def gate_per_class(clf, f, cls, idx, k, n_classes, batch):
    """Mean gate alpha (weight on w_v) per class of the split over the episodes [C]."""
    total, count = torch.zeros(n_classes), torch.zeros(n_classes)
    for i in range(0, len(idx), batch):
        s, _ = common.split_episodes(f, idx[i:i + batch], k)
        alpha = clf["model"](s, clf["w"][cls[i:i + batch]])[3]                   # [E, N]
        total.index_add_(0, cls[i:i + batch].flatten().cpu(), alpha.flatten().cpu())
        count.index_add_(0, cls[i:i + batch].flatten().cpu(), torch.ones(alpha.numel()))
    return total / count.clamp(min=1)


def gate_report(gates, semantics_ck, names):
    """The mean gate per shot count; in the toy world also for the classes the toy
    describer misread and for the others (the classes whose semantics are wrong)."""
    report = {str(k): {"all": round(g.mean().item(), 3)} for k, g in gates.items()}
    misread = toy_misread(semantics_ck, names)
    if misread is not None and 0 < sum(misread) < len(names):
        m = torch.tensor(misread)
        for k, g in gates.items():
            report[str(k)].update(misread=round(g[m].mean().item(), 3), others=round(g[~m].mean().item(), 3),
                                  n_misread=int(m.sum()))
    return report


def toy_misread(semantics_ck, names):
    """Per class: did the toy describer that stage 2 used misread it? None when stage 2
    asked no toy describer (a real language model's mistakes are not known)."""
    seeds = [int(s[4:]) for s in semantics_ck.get("sources", []) if s.startswith("toy@")]
    if not seeds:
        return None
    import toyworld
    rate = semantics_ck["config"]["toy_misread_rate"]
    return [any(toyworld.misread(n, seed, rate) is not None for seed in seeds) for n in names]


def markdown(out, shots):
    """The accuracy table, then the paired differences."""
    acc = {(r["method"], r["shots"]): f"{r['acc']:.2f} ± {r['ci95']:.2f}" for r in out["rows"]}
    what = "val classes" if out["split"] == "val" else "novel classes"
    lines = [f"{out['dataset']}: {what}, {out['n_way']}-way, {out['n_query']} queries per class, "
             f"{out['episodes']} episodes (episode seed {out['episode_seed']}; training seed {out['seed']}), "
             f"accuracy % with 95% interval", "",
             "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for m, *_ in ROWS:
        if any((m, k) in acc for k in shots):
            lines.append(f"| {m} | " + " | ".join(acc.get((m, k), "") for k in shots) + " |")
    for s in out["skipped"]:
        lines.append(f"| {s['method']} | skipped: {s['how']} |" + " |" * (len(shots) - 1))
    lines += ["", "protonet-ce and protonet-distilled are cosine nearest-centroid (SimpleShot without centring); "
              "protonet-euclidean is ProtoNet's squared Euclidean distance.", ""]
    if out["comparisons"]:
        d = {(p["method"], p["vs"], p["shots"]): f"{p['delta']:+.2f} ± {p['ci95']:.2f}" for p in out["comparisons"]}
        lines += ["Paired differences on the same episodes (mean ± 95% interval, points):", "",
                  "| difference | what it isolates | " + " | ".join(f"{k}-shot" for k in shots) + " |",
                  "|---|---|" + "---|" * len(shots)]
        for a, b, w in COMPARISONS:
            if any((a, b, k) in d for k in shots):
                lines.append(f"| {a} − {b} | {w} | " + " | ".join(d.get((a, b, k), "") for k in shots) + " |")
    if out["gate"]:
        lines += ["", "syntrans's gate, mean weight on the visual side: " + "; ".join(
            f"{k}-shot {g['all']:.2f}" + (f" (the {g['n_misread']} class{'es' * (g['n_misread'] != 1)} the toy "
                                          f"describer misread {g['misread']:.2f}, the others {g['others']:.2f})"
                                          if "misread" in g else "")
            for k, g in out["gate"].items())]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------
# Plumbing: optional checkpoints and their consistency, the speed benchmark

def load_optional(run, name, stage):
    """A checkpoint, or None when the stage has not been run (its row is then skipped)."""
    path = os.path.join(run, name)
    hint = "rerun the stage that writes it (or leave it deleted: its rows are then skipped)"
    return common.load_checkpoint(path, stage, hint) if os.path.exists(path) else None


def check_consistent(st, ck, dataset, classes):
    """Every checkpoint is of this dataset and was built on the files now in the run folder."""
    made = {common.STUDENT: st, **{FILES[n]: ck[n] for n in ("semantics", "bridge", "semantics-templates",
                                                             "bridge-templates")}}  # what later stages build on
    for c in [st, *ck.values()]:
        if c is not None:
            common.check_same_world(c, c["path"], dataset, classes)
            for up, u in made.items():  # a stage rerun since: what was built on it is stale
                if u is not None:
                    check_upstream(c, c["path"], up, u["id"], "rerun the stages after it (see run.sh)")
    common.check_same_teacher({common.STUDENT: st, FILES["semantics"]: ck["semantics"],
                               FILES["semantics-templates"]: ck["semantics-templates"]})


def check_upstream(ckpt, path, name, expected_id, hint):
    """Refuse a checkpoint built on another version of `name` than the one in the run folder."""
    if name in ckpt.get("upstream", {}) and ckpt["upstream"][name] != expected_id:
        raise common.UserError(f"{path} was built on another {name} than the one there now: {hint}")


def how_to_make(row, ck, run):
    """For a skipped row: the command that makes the first checkpoint it lacks."""
    missing = next(c for c in MADE_FROM[row[1]] + MADE_FROM[row[2]] if ck[c] is None)
    return f"{HOW[missing]} --run {run}" if missing in HOW else "bash run.sh (it makes the templates-only variant)"


def benchmark(rows, needs, feats, split, shots, args, device):
    """Episodes per second from cached features, per shot count (all rows together)."""
    with torch.no_grad():
        for k in shots:
            cls, idx = common.sample_episodes(split.labels, args.n_way, k, args.n_query, 2000, seed=args.episode_seed + 7)
            cls, idx = cls.to(device), idx.to(device)
            t = time.time()
            for method, key, need, fn in rows:
                batched(lambda sl: fn(needs[need], k, cls[sl], *common.split_episodes(feats[key], idx[sl], k)),
                        len(idx), args.batch)
            dt = time.time() - t
            print(f"benchmark {k}-shot: {len(idx) * len(rows) / dt:.0f} episode-rows/s "
                  f"({len(idx)} episodes x {len(rows)} rows in {dt:.2f}s on {device})")


if __name__ == "__main__":
    common.run_main(main)
