"""
Stage 5 of SynTrans: the results table, every row scored on the same episodes.

Paper component: the evaluation protocol of the paper (novel classes, 5-way 1-shot and 5-shot)
and its ablations, side by side in one run (docs/DESIGN.md, stage 5).

What it does
  Samples a fixed list of episodes per shot count (5-way, 15 queries per class, 600 episodes by
  default) from --episode-seed, which no training seed touches, extracts the features of the
  split once, and scores every row of ROWS below on exactly those episodes, in batches (no
  per-episode forward passes). Two splits:
    --split test  the novel classes: the final table (results.json, results.md);
    --split val   the val classes: where every default and every "which variant is better"
                  question is decided (results_val.json, results_val.md).
  A row whose checkpoint is absent is reported as skipped, with the command that makes it.
  Because every row sees the same episodes, COMPARISONS gives paired differences: the mean of
  the per-episode accuracy differences of two rows and its 95% interval, the fair test of "this
  component helps". Each stage-4 component has its own row, so that each step of the chain adds
  one thing.

Inputs   the run folder's checkpoints of stages 1-4 (and the ablations run.sh makes)
Outputs  <run>/results.json and results.md (--split test), or results_val.json and
         results_val.md (--split val); the table is also printed.

Our choices (reasons in docs/DESIGN.md): accuracy = mean over episodes of the per-episode query
accuracy, interval = 1.96 * std / sqrt(episodes); the fixed-fusion coefficient is picked per
shot count from --mixes on val episodes of another seed (also when --split val, so the reported
val episodes are not the ones it was picked on); zero-shot rows ignore the support set but are
scored on the same queries.
"""
import collections
import json
import os
import time

import torch
import torch.nn.functional as F

import common
import toyworld

bridge_stage = common.stage_module("03_bridge")
classifier_stage = common.stage_module("04_classifier")
Bridge, fixed_mix = bridge_stage.Bridge, bridge_stage.fixed_mix
FewShotClassifier = classifier_stage.FewShotClassifier


# ----------------------------------------------------------------------------------
# The rows. Each is a function (x, k, classes, support, query) -> logits [E, N, Q, N]:
# x is what the last of the row's checkpoints gives it beyond the features, always a dict
# ({} for the prototype rows; "text": the semantic vectors [C, m] of the split's classes;
# "w": h(t_c) [C, d] and "mix": the fixed-fusion coefficient per shot count; "model":
# stage 4's classifier), k the shot count, classes [E, N] the episodes' class indices in
# the split, support [E, N, K, d] and query [E, N, Q, d] their features.

def cosine_centroid(x, k, cls, s, q):
    """Nearest class centroid by cosine (SimpleShot without centring). The rows
    protonet-ce and protonet-distilled use it; ProtoNet's own metric is below."""
    return common.protonet_logits(s, q)


def euclidean_protonet(x, k, cls, s, q):
    """ProtoNet as Snell et al. 2017 score it: minus the squared Euclidean distance
    to the mean support feature, on unnormalised features."""
    return -torch.cdist(q.flatten(1, 2), s.mean(2)).pow(2).view(*q.shape[:3], -1)


def clip_zero_shot(x, k, cls, s, q):
    """The teacher's image features against the mined semantic vectors (q: teacher features)."""
    text = F.normalize(x["text"], dim=-1)[cls]
    return torch.einsum("enqd,ecd->enqc", F.normalize(q, dim=-1), text)


def semantic_only(x, k, cls, s, q):
    """The bridge's weights h(t_c) on student features; the support is not used."""
    return torch.einsum("enqd,ecd->enqc", F.normalize(q, dim=-1), x["w"][cls])


def fixed_fusion(x, k, cls, s, q):
    """SemFew-style: normalise(normalise(prototype) + mix * h(t_c)), mix chosen on val per
    shot count."""
    weights = fixed_mix(s.mean(2), x["w"][cls], x["mix"][k])
    return torch.einsum("enqd,ecd->enqc", F.normalize(q, dim=-1), weights)


def visual_generator(x, k, cls, s, q):
    """Stage 4's visual weight generator trained alone, without semantics (support mean +
    attention read-out over base weights; its own checkpoint)."""
    return x["model"].logits(q, x["model"].visual_weight(s))


def syntrans(x, k, cls, s, q):
    """Stage 4's classifier: w_v and its reconstructed w_s fused by its gate."""
    return x["model"].logits(q, classify(x, cls, s)[0])


def classify(x, cls, s):
    """Stage 4's (w, w_v, w_s, alpha) for the episodes' classes: the reconstructor reads the
    support into the semantic space with the bridge's g and maps back with its h."""
    read = {"t": x["t"][cls], "g": F.normalize(x["bridge"].to_semantic(s).mean(2), dim=-1),
            "h": x["bridge"].to_visual}
    return x["model"](s, x["w"][cls], read=read)


# name, function, the features it scores, the checkpoints it needs (keys of FILES, in stage
# order: the last one gives the function its x)
Row = collections.namedtuple("Row", "name fn features files")
ROWS = [
    Row("protonet-ce", cosine_centroid, "student-ce", ["student-ce"]),
    Row("protonet-distilled", cosine_centroid, "student", []),
    Row("protonet-euclidean", euclidean_protonet, "student", []),
    Row("clip-zero-shot", clip_zero_shot, "teacher", ["semantics"]),
    Row("semantic-only", semantic_only, "student", ["semantics", "bridge"]),
    Row("fixed-fusion", fixed_fusion, "student", ["semantics", "bridge"]),
    Row("visual-generator", visual_generator, "student",
        ["semantics", "bridge", "visual-generator"]),
    Row("syntrans-no-reconstructor", syntrans, "student",
        ["semantics", "bridge", "syntrans-no-reconstructor"]),
    Row("syntrans-one-way", syntrans, "student", ["semantics", "bridge", "syntrans-one-way"]),
    Row("syntrans-fixed-gate", syntrans, "student", ["semantics", "bridge", "syntrans-fixed-gate"]),
    Row("syntrans", syntrans, "student", ["semantics", "bridge", "syntrans"]),
    Row("syntrans-shuffled", syntrans, "student", ["semantics", "bridge", "syntrans-shuffled"]),
    Row("syntrans-templates", syntrans, "student",
        ["semantics-templates", "bridge-templates", "syntrans-templates"]),
]

# paired differences (row, minus row, what the difference isolates); the first four are
# the chain protonet-ce -> ... -> syntrans, each step adding one thing
COMPARISONS = [
    ("protonet-distilled", "protonet-ce", "distillation from the teacher (stage 1)"),
    ("visual-generator", "protonet-distilled",
     "stage 4's visual weight generator, trained alone (attention read-out over base weights)"),
    ("syntrans-no-reconstructor", "visual-generator",
     "adding semantics, w_s = h(t_c), through the per-class gate"),
    ("syntrans", "syntrans-no-reconstructor", "the semantic weight reconstructor"),
    ("syntrans", "syntrans-one-way",
     "the reconstructor's use of g (both directions of the bridge against h alone)"),
    ("syntrans", "syntrans-fixed-gate", "the per-class gate"),
    ("fixed-fusion", "protonet-distilled",
     "semantics through the bridge, one fixed mix (stages 2-3)"),
    ("syntrans", "fixed-fusion", "all of stage 4"),
    ("syntrans", "protonet-distilled", "the whole method against the student's own prototypes"),
    ("syntrans", "syntrans-shuffled",
     "what the semantics say (shuffled across classes: no information)"),
    ("syntrans", "syntrans-templates",
     "SynMine's descriptions against prompt templates of the class name"),
    ("protonet-euclidean", "protonet-distilled", "squared Euclidean against cosine prototypes"),
]

# ----------------------------------------------------------------------------------
# The run: the checkpoints it reads, its flags, then main() (load, score every row, write)

# every checkpoint a row can need: the stage that writes it, its name in the run folder and the
# command that makes it (the templates-only files: bash run.sh makes them)
File = collections.namedtuple("File", "stage name how")
TEMPLATES = "bash run.sh (it makes the templates-only variant)"
FILES = {
    "student": File("distill", common.STUDENT, "run 01_distill.py --run {run}"),
    "student-ce": File("distill", common.STUDENT_CE,
                       "run 01_distill.py --distill-weight 0 --run {run}"),
    "semantics": File("mine", common.SEMANTICS, "run 02_mine.py --run {run}"),
    "bridge": File("bridge", common.BRIDGE, "run 03_bridge.py --run {run}"),
    "syntrans": File("classifier", common.CLASSIFIER, "run 04_classifier.py --run {run}"),
    "visual-generator": File("classifier", "04_classifier_visual.pt",
                             "run 04_classifier.py --visual-only --out {name} --run {run}"),
    "syntrans-no-reconstructor": File("classifier", "04_classifier_no_rec.pt",
                                      "run 04_classifier.py --reconstructor none --out {name} "
                                      "--run {run}"),
    "syntrans-one-way": File("classifier", "04_classifier_one_way.pt",
                             "run 04_classifier.py --reconstructor one-way --out {name} "
                             "--run {run}"),
    "syntrans-fixed-gate": File("classifier", "04_classifier_fixed_gate.pt",
                                "run 04_classifier.py --gate shared --out {name} --run {run}"),
    "syntrans-shuffled": File("classifier", "04_classifier_shuffled.pt",
                              "run 04_classifier.py --shuffle-semantics --out {name} --run {run}"),
    "semantics-templates": File("mine", "02_semantics_templates.pt", TEMPLATES),
    "bridge-templates": File("bridge", "03_bridge_templates.pt", TEMPLATES),
    "syntrans-templates": File("classifier", "04_classifier_templates.pt", TEMPLATES),
}


def get_args():
    p = common.parser(__doc__)
    flag = common.flag
    flag(p, "--split", default="test", choices=["test", "val"],
         help="test: the novel classes, the final table; val: the val classes, where choices "
              "are made")
    flag(p, "--episode-seed", type=int, default=0,
         help="seed of the evaluation episodes (independent of --seed, so every training seed "
              "is scored on the same episodes)")
    flag(p, "--episodes", type=int, default=600, within="[1, inf)",
         help="episodes per shot count (2000 / 10000 work too)")
    flag(p, "--shots", default="1,5", help="shot counts")
    flag(p, "--n-way", type=int, default=5, help="classes per episode")
    flag(p, "--n-query", type=int, default=15, within="[1, inf)", help="queries per class")
    flag(p, "--mixes", default="0.25,0.5,1,2,4",
         help="fixed-fusion coefficients tried on val classes")
    flag(p, "--batch", type=int, default=500, within="[1, inf)", help="episodes scored at once")
    flag(p, "--benchmark", action="store_true",
         help="also time episode scoring from cached features")
    return p


def main(argv=None):
    args, device = common.start(get_args(), argv)
    shots = common.parse_list(args.shots, "--shots", int, "shot counts", "1,5")
    mixes = common.parse_list(args.mixes, "--mixes", float, "fusion coefficients", "0.25,0.5,1")
    classes = common.class_names(args.dataset, args.data_root)
    run, split_name = args.run, args.split
    t0 = time.time()
    log = common.Log(run, "results" if split_name == "test" else "results_val")

    # ---- checkpoints (all but the distilled student are optional), checked against each other
    ck = common.load_upstream(args, {key: (f.stage, f.name) for key, f in FILES.items()}, classes,
                              optional=[key for key in FILES if key != "student"])
    rows = [r for r in ROWS if all(ck[key] is not None for key in r.files)]

    # ---- features of the evaluated split, once, shared by every row
    split = common.load_split(args.dataset, split_name, args.data_root, args.image_size)
    val = split if split_name == "val" else common.load_split(args.dataset, "val", args.data_root,
                                                              args.image_size)
    flags = "--n-way, --shots or --n-query"
    common.check_episodes(split, args.n_way, args.shots, args.n_query, flags)
    if ck["bridge"] is not None:  # fixed-fusion picks its mix on val episodes of the same shape
        common.check_episodes(val, args.n_way, args.shots, args.n_query, flags)
    feats = {"student": student_feats(run, ck["student"], split, device)}
    if ck["student-ce"] is not None:
        feats["student-ce"] = student_feats(run, ck["student-ce"], split, device)
    if ck["semantics"] is not None:
        feats["teacher"] = teacher_feats(args, ck["semantics"], split, device)
    seconds_features = time.time() - t0
    log.write(phase="features", images=len(split) * len(feats))

    # ---- what a row's function gets beyond features, by the last file it needs: the semantic
    #      vectors, h(t_c) and the fixed mix, a trained classifier and its h(t_c)
    semantics = lambda key: ck[key]["state"][split_name].float().to(device)  # noqa: E731
    parts = {"student-ce": {}}
    with torch.no_grad():
        if ck["semantics"] is not None:
            parts["semantics"] = {"text": semantics("semantics")}
            if ck["bridge"] is not None:
                bridge = Bridge.from_checkpoint(ck["bridge"], device)
                f_val = (feats["student"] if split_name == "val"
                         else student_feats(run, ck["student"], val, device))
                mix = choose_mix(bridge, ck["semantics"], f_val, val, shots, mixes, args, device)
                parts["bridge"] = {"w": bridge.to_visual(parts["semantics"]["text"]), "mix": mix}
        for sem, br, name in [r.files for r in rows if len(r.files) == 3]:  # stage 4's rows
            if name not in parts:
                parts[name] = trained_classifier(run, name, ck[name], ck[br], semantics(sem),
                                                 split_name, device)

    # ---- every row on the same episodes
    skipped = [{"method": r.name, "how": how_to_make(r, ck, run)} for r in ROWS if r not in rows]
    results, per_episode, gates = [], {}, {}
    t1 = time.time()
    with torch.no_grad():
        for k in shots:
            cls, idx = common.sample_episodes(split.labels, args.n_way, k, args.n_query,
                                              args.episodes, seed=args.episode_seed)
            cls, idx = cls.to(device), idx.to(device)
            for r in rows:
                accs = score(r, parts, feats, k, cls, idx, args.batch).cpu()
                per_episode[(r.name, k)] = accs
                acc, ci = common.ci95(accs * 100)
                results.append({"method": r.name, "shots": k, "acc": round(acc, 2),
                                "ci95": round(ci, 2)})
            if "syntrans" in parts:  # where the per-class gate put its weight (on the visual side)
                gates[k] = gate_per_class(parts["syntrans"], feats["student"], cls, idx, k,
                                          len(split.classes), args.batch)
    seconds_episodes = time.time() - t1

    comparisons = [paired_difference(per_episode, a, b, k, what) for a, b, what in COMPARISONS
                   for k in shots if (a, k) in per_episode and (b, k) in per_episode]
    mix = {str(k): v for k, v in parts["bridge"]["mix"].items()} if "bridge" in parts else None
    out = {"dataset": args.dataset, "split": split_name, "episodes": args.episodes,
           "n_way": args.n_way, "n_query": args.n_query, "episode_seed": args.episode_seed,
           "seed": args.seed, "rows": results, "comparisons": comparisons, "skipped": skipped,
           "gate": gate_report(gates, ck["semantics"], classes[split_name]) if gates else None,
           "fixed_fusion_mix": mix,
           "seconds": {"features": round(seconds_features, 2),
                       "episodes": round(seconds_episodes, 2)}}
    log.write(phase="episodes", episodes=args.episodes * len(shots), rows=results)
    stem = os.path.join(run, "results" if split_name == "test" else "results_val")
    table = markdown(out, shots)
    common.write_files({stem + ".json": (json.dumps(out, indent=2) + "\n").encode(),
                        stem + ".md": table.encode()})  # in one step: both describe this run
    print(table)

    if args.benchmark:
        benchmark(rows, parts, feats, split, shots, args, device)


# ----------------------------------------------------------------------------------
# Features, the fixed-fusion mix, the trained classifiers

def student_feats(run, ck, split, device):
    student = common.load_student(ck, device)
    return common.student_features(run, student, ck["id"], split, device).to(device)


def teacher_feats(args, semantics_ck, split, device):
    tid = common.check_teacher(args)  # its identity: the teacher is built only if not cached
    common.check_teacher_flags(semantics_ck, tid)  # the vectors were mined with this teacher
    teacher = lambda: common.load_teacher(args.clip, args.clip_pretrained, device)[:2]  # noqa: E731
    return common.teacher_image_features(args.run, teacher, None, tid, split, device).to(device)


def choose_mix(bridge, semantics_ck, f_val, val, shots, mixes, args, device):
    """Per shot count, the --mixes coefficient with which the fixed-fusion row scores best
    on 300 val episodes (seed --episode-seed + 1: never the episodes a table reports)."""
    w_val = bridge.to_visual(semantics_ck["state"]["val"].float().to(device))
    best = {}
    for k in shots:
        vcls, vidx = common.sample_episodes(val.labels, args.n_way, k, args.n_query, 300,
                                            seed=args.episode_seed + 1)
        vs, vq = common.split_episodes(f_val, vidx.to(device), k)
        acc = {}
        for m in mixes:
            logits = fixed_fusion({"w": w_val, "mix": {k: m}}, k, vcls.to(device), vs, vq)
            acc[m] = common.accuracy_from_logits(logits).mean().item()
        best[k] = max(acc, key=acc.get)
    return best


def trained_classifier(run, name, c, bridge_ck, sem, split_name, device):
    """Stage 4's classifier and the h(t_c) of the evaluated split's classes, through the
    bridge as stage 4 left it; the shuffled ablation reads its classes' semantics in
    stage 4's shuffled order."""
    cfg = c["config"]
    m = FewShotClassifier(torch.zeros(c["n_base"], c["dim"]), cfg["hidden"],
                          per_class_gate=cfg.get("gate", "per-class") == "per-class",
                          reconstructor=cfg.get("reconstructor", "none"),
                          semantics=not cfg.get("visual_only", False)).to(device)
    try:
        m.load_state_dict(c["state"]["model"])
    except RuntimeError:  # written by an older 04_classifier.py with other layer shapes
        raise common.UserError(f"{os.path.join(run, FILES[name].name)} does not fit this code's "
                               f"classifier (an older version wrote it): rerun 04_classifier.py "
                               f"--run {run}")
    b = common.load_weights(Bridge.from_checkpoint(bridge_ck, device), c, "bridge")
    if cfg.get("shuffle_semantics"):
        sem = sem[classifier_stage.shuffled_order(len(sem), cfg["seed"], split_name).to(device)]
    return {"model": m.eval(), "w": b.eval().to_visual(sem), "t": sem, "bridge": b}


# ----------------------------------------------------------------------------------
# Scoring, paired differences, the gate's weights, the table

def score(row, parts, feats, k, cls, idx, batch):
    """A row's per-episode accuracies [E]: its function gets what the last of its files
    gives ({} when it needs none) and the features of each batch of episodes."""
    x, f = parts[row.files[-1]] if row.files else {}, feats[row.features]
    return batched(lambda sl: row.fn(x, k, cls[sl], *common.split_episodes(f, idx[sl], k)),
                   len(idx), batch)


def batched(fn, n, batch):
    """Per-episode accuracies [E] of fn(slice) -> logits, over episode batches."""
    return torch.cat([common.accuracy_from_logits(fn(slice(i, min(i + batch, n))))
                      for i in range(0, n, batch)])


def paired_difference(per_episode, a, b, k, what):
    """Row a minus row b on the same episodes: mean and 95% interval of the differences."""
    d, ci = common.ci95((per_episode[(a, k)] - per_episode[(b, k)]) * 100)
    return {"method": a, "vs": b, "shots": k, "delta": round(d, 2), "ci95": round(ci, 2),
            "what": what}


def gate_per_class(clf, f, cls, idx, k, n_classes, batch):
    """Mean gate alpha (weight on w_v) per class of the split over the episodes [C]."""
    total, count = torch.zeros(n_classes), torch.zeros(n_classes)
    for i in range(0, len(idx), batch):
        s, _ = common.split_episodes(f, idx[i:i + batch], k)
        alpha = classify(clf, cls[i:i + batch], s)[3]                            # [E, N]
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
            report[str(k)].update(misread=round(g[m].mean().item(), 3),
                                  others=round(g[~m].mean().item(), 3), n_misread=int(m.sum()))
    return report


def toy_misread(semantics_ck, names):
    """Per class: did the toy describer that stage 2 used misread it? None when stage 2
    asked no toy describer (a real language model's mistakes are not known)."""
    seeds = [int(s[4:]) for s in semantics_ck.get("sources", []) if s.startswith("toy@")]
    if not seeds:
        return None
    rate = semantics_ck["config"]["toy_misread_rate"]
    return [any(toyworld.misread(n, seed, rate) is not None for seed in seeds) for n in names]


def markdown(out, shots):
    """The accuracy table, then the paired differences."""
    acc = {(r["method"], r["shots"]): f"{r['acc']:.2f} ± {r['ci95']:.2f}" for r in out["rows"]}
    what = "val classes" if out["split"] == "val" else "novel classes"
    lines = [f"{out['dataset']}: {what}, {out['n_way']}-way, {out['n_query']} queries per class, "
             f"{out['episodes']} episodes (episode seed {out['episode_seed']}; training seed "
             f"{out['seed']}), accuracy % with 95% interval", "",
             "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for m in [r.name for r in ROWS]:
        if any((m, k) in acc for k in shots):
            lines.append(f"| {m} | " + " | ".join(acc.get((m, k), "") for k in shots) + " |")
    for s in out["skipped"]:
        lines.append(f"| {s['method']} | skipped: {s['how']} |" + " |" * (len(shots) - 1))
    lines += ["", "protonet-ce and protonet-distilled are cosine nearest-centroid (SimpleShot "
              "without centring); protonet-euclidean is ProtoNet's squared Euclidean distance.", ""]
    if out["comparisons"]:
        d = {(p["method"], p["vs"], p["shots"]): f"{p['delta']:+.2f} ± {p['ci95']:.2f}"
             for p in out["comparisons"]}
        lines += ["Paired differences on the same episodes (mean ± 95% interval, points):", "",
                  "| difference | what it isolates | " + " | ".join(f"{k}-shot" for k in shots)
                  + " |", "|---|---|" + "---|" * len(shots)]
        for a, b, w in COMPARISONS:
            if any((a, b, k) in d for k in shots):
                lines.append(f"| {a} − {b} | {w} | "
                             + " | ".join(d.get((a, b, k), "") for k in shots) + " |")
    if out["gate"]:
        said = []
        for k, g in out["gate"].items():
            n = g.get("n_misread")
            said.append(f"{k}-shot {g['all']:.2f}" + (
                f" (the {n} class{'es' * (n != 1)} the toy describer misread {g['misread']:.2f}, "
                f"the others {g['others']:.2f})" if "misread" in g else ""))
        lines += ["", "syntrans's gate, mean weight on the visual side: " + "; ".join(said)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------
# Plumbing: how a skipped row is made, the speed benchmark

def how_to_make(row, ck, run):
    """For a skipped row: the command that makes the first checkpoint it lacks."""
    f = FILES[next(key for key in row.files if ck[key] is None)]
    return f.how.format(run=run, name=f.name)


def benchmark(rows, parts, feats, split, shots, args, device):
    """Episodes per second from cached features, per shot count (all rows together)."""
    with torch.no_grad():
        for k in shots:
            cls, idx = common.sample_episodes(split.labels, args.n_way, k, args.n_query, 2000,
                                              seed=args.episode_seed + 7)
            cls, idx = cls.to(device), idx.to(device)
            t = time.time()
            for r in rows:
                score(r, parts, feats, k, cls, idx, args.batch)
            dt = time.time() - t
            print(f"benchmark {k}-shot: {len(idx) * len(rows) / dt:.0f} episode-rows/s "
                  f"({len(idx)} episodes x {len(rows)} rows in {dt:.2f}s on {device})")


if __name__ == "__main__":
    common.run_main(main)
