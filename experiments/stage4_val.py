"""
Paired comparisons of stage-4 variants on the val classes, where stage 4's choices are made.

  python experiments/stage4_val.py RUN [--dataset toy --clip toy-clip] \
      NAME=CLASSIFIER[,SEMANTICS,BRIDGE] NAME=... -> RUN/stage4_val.md and RUN/stage4_val.json

Every variant (a stage-4 checkpoint of the run folder, with the semantics and bridge files it
was trained on: default 02_semantics.pt, 03_bridge.pt) is scored as 05_eval.py scores the
syntrans row, on the same val episodes as results_val.md (episode seed 0, 600 per shot
count), and each one after the first is compared with the first by the mean of the
per-episode differences and its 95% interval; the last line gives each variant's mean over
1-shot and 5-shot (the criterion stage 4 keeps its checkpoint by). No novel class is read.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

ev = common.stage_module("05_eval")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run")
    p.add_argument("variants", nargs="+")
    p.add_argument("--dataset", default="toy")
    p.add_argument("--data-root", default=None)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--episode-seed", type=int, default=0)
    args = p.parse_args(argv)
    device = "cpu"
    student_ck = common.load_checkpoint(os.path.join(args.run, common.STUDENT), "distill", "")
    val = common.load_split(args.dataset, "val", args.data_root)
    f = ev.student_feats(args.run, student_ck, val, device)
    parts = {}

    def load(name, stage):
        return common.load_checkpoint(os.path.join(args.run, name), stage, "")
    with torch.no_grad():
        for v in args.variants:
            name, files = v.split("=")
            clf, sem, br = (files.split(",") + [common.SEMANTICS, common.BRIDGE])[:3]
            s = load(sem, "mine")["state"]["val"].float()
            parts[name] = ev.trained_classifier(args.run, "syntrans", load(clf, "classifier"),
                                                load(br, "bridge"), s, "val", device)
    names, acc, lines = list(parts), {}, []
    with torch.no_grad():
        for k in (1, 5):
            cls, idx = common.sample_episodes(val.labels, 5, k, 15, args.episodes,
                                              seed=args.episode_seed)
            for n in names:
                def fn(sl):
                    return ev.syntrans(parts[n], k, cls[sl], *common.split_episodes(f, idx[sl], k))
                acc[(n, k)] = ev.batched(fn, len(idx), 500) * 100
    out = {"variants": args.variants, "episodes": args.episodes, "rows": [], "comparisons": []}
    lines = [f"{args.dataset}: val classes, stage-4 variants scored as the syntrans row, "
             f"{args.episodes} episodes per shot count (episode seed {args.episode_seed}), "
             f"training seed {student_ck['config']['seed']}", "",
             "| variant | files | 1-shot | 5-shot | mean |", "|---|---|---|---|---|"]
    for v, n in zip(args.variants, names):
        a = [common.ci95(acc[(n, k)]) for k in (1, 5)]
        out["rows"].append({"variant": n, "acc": [round(m, 2) for m, _ in a],
                            "ci95": [round(c, 2) for _, c in a]})
        cells = " | ".join(f"{m:.2f} ± {c:.2f}" for m, c in a)
        lines.append(f"| {n} | {v.split('=')[1]} | {cells}"
                     + f" | {(a[0][0] + a[1][0]) / 2:.2f} |")
    lines += ["", "| paired difference | 1-shot | 5-shot |", "|---|---|---|"]
    for n in names[1:]:
        d = [common.ci95(acc[(n, k)] - acc[(names[0], k)]) for k in (1, 5)]
        out["comparisons"].append({"method": n, "vs": names[0],
                                   "delta": [round(m, 2) for m, _ in d],
                                   "ci95": [round(c, 2) for _, c in d]})
        cells = " | ".join(f"{m:+.2f} ± {c:.2f}" for m, c in d)
        lines.append(f"| {n} − {names[0]} | {cells} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.run, "stage4_val.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(os.path.join(args.run, "stage4_val.json"), "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=2)
    print(text)


if __name__ == "__main__":
    main()
