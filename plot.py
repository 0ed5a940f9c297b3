"""
Draw a run: the training curves of every stage and the results table as a chart.

    python3 plot.py --run runs/toy-tiny

Reads the logs every stage writes as it trains (<run>/<output>_log.jsonl: one JSON record a
line, see common.Log) and results.json / results_val.json (05_eval.py), and writes
<run>/curves.png (one panel per log with a loss: its loss, left axis, and its validation
accuracies in %, right axis, against the step or epoch) and <run>/results.png (results_val.png):
the accuracy of every method with its 95% interval, one panel per shot count.
matplotlib is needed here only: pip install matplotlib (or -r requirements-dev.txt).
"""
import argparse
import glob
import json
import os

import common


def curves(run, plt):
    """<run>/curves.png from every log with a loss; returns its path (None: no such log)."""
    logs = {}
    for path in sorted(glob.glob(os.path.join(run, "*_log.jsonl"))):
        records = [r for r in common.read_log(path) if isinstance(r.get("loss"), (int, float))]
        if records:
            logs[os.path.basename(path)[:-len("_log.jsonl")]] = records
    if not logs:
        return None
    cols = min(3, len(logs))
    rows = -(-len(logs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, records) in zip(axes.flat, logs.items()):
        x_key = "step" if any("step" in r for r in records) else "epoch"
        phases = list(dict.fromkeys(r.get("phase", "") for r in records))
        right = ax.twinx()
        for phase in phases:  # stage 3: the main bridge, then its cross-fitting folds
            rs = [r for r in records if r.get("phase", "") == phase and x_key in r]
            main = phase in ("", phases[0])
            train = [r for r in rs if not any(k.startswith("val_") for k in r)] or rs
            ax.plot([r[x_key] for r in train], [r["loss"] for r in train], color="black",
                    lw=1.4 if main else 0.6, alpha=1 if main else 0.4,
                    label="loss" if main else None)
            if not main:
                continue
            vals = sorted({k for r in rs for k in r if k.startswith("val_")})
            for i, key in enumerate(vals):
                pts = [(r[x_key], r[key]) for r in rs if key in r]
                right.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}", label=key)
        ax.set_title(name + (f" ({phases[0]}, thin: {len(phases) - 1} folds)"
                             if len(phases) > 1 else ""), fontsize=10)
        ax.set_xlabel(x_key)
        ax.ticklabel_format(axis="y", useOffset=False)
        right.ticklabel_format(axis="y", useOffset=False)
        ax.set_ylabel("training loss")
        right.set_ylabel("val accuracy (%)")
        handles = [h for a in (ax, right) for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="center right")
    for ax in list(axes.flat)[len(logs):]:
        ax.axis("off")
    fig.tight_layout()
    out = os.path.join(run, "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def results_chart(run, name, plt):
    """<run>/<name>.png from <run>/<name>.json: accuracy +- 95% interval per method and shot."""
    path = os.path.join(run, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    shots = sorted({r["shots"] for r in res["rows"]})
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    fig, axes = plt.subplots(1, len(shots), figsize=(5.5 * len(shots), 0.42 * len(methods) + 1.4),
                             squeeze=False, sharey=True)
    for ax, k in zip(axes[0], shots):
        rows = {r["method"]: r for r in res["rows"] if r["shots"] == k}
        y = range(len(methods))
        acc = [rows[m]["acc"] if m in rows else float("nan") for m in methods]
        ci = [rows[m]["ci95"] if m in rows else 0 for m in methods]
        ax.barh(y, acc, xerr=ci, color=["C3" if m == "syntrans" else "C0" for m in methods],
                capsize=3, alpha=0.85)
        for i, (a, c) in enumerate(zip(acc, ci)):
            ax.text(a + c + 0.5, i, f"{a:.2f} ± {c:.2f}", va="center", fontsize=7)
        ax.set_yticks(list(y), methods, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, min(100, max(a + c for a, c in zip(acc, ci) if a == a) + 15))
        ax.set_xlabel("accuracy (%), bars: 95% interval")
        ax.set_title(f"{res['dataset']} {res['split']}: {res['n_way']}-way {k}-shot, "
                     f"{res['episodes']} episodes", fontsize=10)
    fig.tight_layout()
    out = os.path.join(run, f"{name}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--run", default="runs/toy", help="the run folder to draw")
    args = p.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        raise common.UserError("plot.py needs matplotlib: pip install matplotlib "
                               "(or pip install -r requirements-dev.txt)") from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    if not os.path.isdir(args.run):
        raise common.UserError(f"--run {args.run} is not a folder: give a run folder")
    wrote = [curves(args.run, plt), results_chart(args.run, "results", plt),
             results_chart(args.run, "results_val", plt)]
    wrote = [w for w in wrote if w]
    if not wrote:
        raise common.UserError(f"{args.run} has no *_log.jsonl and no results.json: run the "
                               f"stages first (bash run.sh)")
    print("wrote " + ", ".join(wrote))


if __name__ == "__main__":
    common.run_main(main)
