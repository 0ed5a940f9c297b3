"""
The tables across runs that docs/RESULTS.md quotes, from the results files of 05_eval.py.

  python experiments/tables.py seeds OUT RUN [RUN ...]
      one run per training seed, all scored on the same episodes (05_eval.py's
      --episode-seed): per split, each row's mean, standard deviation and min-max over
      the seeds, and every paired difference per seed with a verdict: does its 95%
      interval exclude zero in every seed? -> OUT/seeds.md, OUT/seeds_val.md, OUT/seeds.json
  python experiments/tables.py sweep OUT [--val-only] GROUP/SEED=RUN [GROUP/SEED=RUN ...]
      the paired differences of runs that differ in one setting (GROUP, e.g. the toy
      describer's misread rate) and in the training seed, per split
      -> OUT/sweep.md, OUT/sweep_val.md, OUT/sweep.json
  python experiments/tables.py mining OUT SETTING/SEED=DESCRIPTIONS_JSON [...]
      stage 2's --compare figures of several mining settings -> OUT/mining.md

No training happens here: it only reads the files that 02_mine.py and 05_eval.py wrote.
"""
import json
import os
import statistics
import sys

SPLITS = {"test": "results.json", "val": "results_val.json"}
LABEL = {"test": "novel classes", "val": "val classes"}


def read(run, split):
    path = os.path.join(run, SPLITS[split])
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found: run bash run.sh with RUN={run} first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def seed_table(runs, split):
    """(markdown, summary) of one split over the runs of several training seeds."""
    res = [read(r, split) for r in runs]
    if len({(x["episode_seed"], x["episodes"], x["dataset"]) for x in res}) != 1:
        sys.exit("error: the runs were scored on different episodes or datasets: rerun 05_eval.py with the same flags")
    shots = sorted({r["shots"] for r in res[0]["rows"]})
    seeds = [x["seed"] for x in res]
    head = (f"{res[0]['dataset']}, {LABEL[split]}: training seeds {', '.join(map(str, seeds))}, every seed scored on "
            f"the same {res[0]['episodes']} episodes (episode seed {res[0]['episode_seed']}), accuracy %")
    lines = [head, "", "| method | " + " | ".join(f"{k}-shot mean ± std | min-max" for k in shots) + " |",
             "|---|" + "---|---|" * len(shots)]
    summary = {"split": split, "seeds": seeds, "rows": {}, "comparisons": []}
    methods = list(dict.fromkeys(r["method"] for x in res for r in x["rows"]))
    for m in methods:
        cells = []
        for k in shots:
            a = [next((r["acc"] for r in x["rows"] if (r["method"], r["shots"]) == (m, k)), None) for x in res]
            if None in a:
                cells.append("missing in a seed | ")
                continue
            sd = statistics.stdev(a) if len(a) > 1 else 0.0
            summary["rows"][f"{m} {k}-shot"] = {"mean": statistics.mean(a), "std": sd, "min": min(a), "max": max(a)}
            cells.append(f"{statistics.mean(a):.2f} ± {sd:.2f} | {min(a):.2f}-{max(a):.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences per seed (mean ± 95% interval over the episodes; "
              "'every seed' says whether the interval excludes zero in each seed, and on which side):", "",
              "| difference | shots | " + " | ".join(f"seed {s}" for s in seeds) + " | every seed |",
              "|---|---|" + "---|" * (len(seeds) + 1)]
    keys = list(dict.fromkeys((p["method"], p["vs"], p["shots"]) for x in res for p in x["comparisons"]))
    for a, b, k in keys:
        ps = [next((p for p in x["comparisons"] if (p["method"], p["vs"], p["shots"]) == (a, b, k)), None) for x in res]
        if None in ps:
            continue
        verdict = ("above zero" if all(p["delta"] - p["ci95"] > 0 for p in ps) else
                   "below zero" if all(p["delta"] + p["ci95"] < 0 for p in ps) else "no")
        summary["comparisons"].append({"method": a, "vs": b, "shots": k, "per_seed": ps, "every_seed": verdict})
        lines.append(f"| {a} − {b} | {k} | " + " | ".join(f"{p['delta']:+.2f} ± {p['ci95']:.2f}" for p in ps) +
                     f" | {verdict} |")
    return "\n".join(lines) + "\n", summary


def sweep_table(named_runs, split):
    """(markdown, summary): the paired differences of runs named GROUP/SEED, one column
    per group (e.g. a misread rate), the seeds' values side by side in each cell."""
    res = {name: read(run, split) for name, run in named_runs}
    groups = list(dict.fromkeys(n.split("/")[0] for n in res))
    first = next(iter(res.values()))
    lines = [f"{first['dataset']}, {LABEL[split]}: accuracy % and paired differences (mean ± 95% interval, points); "
             f"one value per training seed, in the order {', '.join(dict.fromkeys(n.split('/')[-1] for n in res))}), "
             f"{first['episodes']} episodes (episode seed {first['episode_seed']})", "",
             "| difference | shots | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    methods = list(dict.fromkeys((r["method"], r["shots"]) for x in res.values() for r in x["rows"]))
    for m, k in methods:  # first the accuracies, then the paired differences
        cells = [" / ".join(f"{r['acc']:.2f}" for n, x in res.items() if n.split("/")[0] == g
                            for r in x["rows"] if (r["method"], r["shots"]) == (m, k)) for g in groups]
        lines.append(f"| {m} (accuracy) | {k} | " + " | ".join(cells) + " |")
    if "syntrans" in {m for m, _ in methods}:  # the criterion stage 4 keeps its checkpoint by, over seeds
        means = []
        for g in groups:
            a = [r["acc"] for n, x in res.items() if n.split("/")[0] == g for r in x["rows"] if r["method"] == "syntrans"]
            means.append(f"{statistics.mean(a):.2f}")
        lines.append("| syntrans (accuracy, mean over shot counts and seeds) | all | " + " | ".join(means) + " |")
    keys = list(dict.fromkeys((p["method"], p["vs"], p["shots"]) for x in res.values() for p in x["comparisons"]))
    summary = {"split": split, "runs": dict(named_runs), "comparisons": []}
    for a, b, k in keys:
        ps = {n: next((p for p in x["comparisons"] if (p["method"], p["vs"], p["shots"]) == (a, b, k)), None)
              for n, x in res.items()}
        summary["comparisons"].append({"method": a, "vs": b, "shots": k, "per_run": ps})
        cells = [" / ".join(f"{p['delta']:+.2f} ± {p['ci95']:.2f}" for n, p in ps.items()
                            if p and n.split("/")[0] == g) for g in groups]
        lines.append(f"| {a} − {b} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", summary


def mining_table(named_files):
    """markdown: stage 2's --compare (teacher zero-shot accuracy of the mined vectors)
    for files named SETTING/SEED, one row per setting, the seeds side by side."""
    res = {}
    for name, path in named_files:
        with open(path, encoding="utf-8") as f:
            res[name] = json.load(f)["compare"]
    first = next(iter(res.values()))
    settings = list(dict.fromkeys(n.split("/")[0] for n in res))
    rows = [r for r in first["accuracy"] if all(r in x["accuracy"] for x in res.values())]  # e.g. not "toy@0 only"
    lines = [f"teacher zero-shot accuracy % on the {first['split']} classes, {first['ways']}-way, {first['episodes']} "
             f"episodes x {first['queries']} queries; one value per training seed "
             f"({', '.join(dict.fromkeys(n.split('/')[-1] for n in res))}), then their mean", "",
             "| setting | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for g in settings:
        cells = []
        for r in rows:
            a = [x["accuracy"][r]["mean"] for n, x in res.items() if n.split("/")[0] == g]
            cells.append(" / ".join(f"{v:.2f}" for v in a) + f" (mean {statistics.mean(a):.2f})")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv):
    if len(argv) < 3 or argv[0] not in ("seeds", "sweep", "mining"):
        sys.exit(__doc__)
    kind, out, runs = argv[0], argv[1], argv[2:]
    os.makedirs(out, exist_ok=True)
    if kind == "mining":
        md = mining_table([r.split("=", 1) for r in runs])
        write(os.path.join(out, "mining.md"), md)
        print(md)
        return
    splits = ("val", "test")
    if runs[0] == "--val-only":  # runs scored on val classes alone (choices are made there)
        splits, runs = ("val",), runs[1:]
    summaries = {}
    for split in splits:
        if kind == "seeds":
            md, summaries[split] = seed_table(runs, split)
            name = "seeds.md" if split == "test" else "seeds_val.md"
        else:
            md, summaries[split] = sweep_table([r.split("=", 1) for r in runs], split)
            name = "sweep.md" if split == "test" else "sweep_val.md"
        write(os.path.join(out, name), md)
        print(md)
    write(os.path.join(out, f"{kind}.json"), json.dumps(summaries, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
