"""
Smoke test of the real-scale path: all five stages at the standard widths for a few
steps, on a fake mini-ImageNet in the real (Ravi) layout with 84-px JPEGs, with a real
open_clip architecture (ViT-B-32) whose random weights are asked for explicitly
(--clip-pretrained random). Prints per stage its wall time, images/s, peak GPU memory and
the time a full mini-ImageNet run (run.sh's preset: 90 epochs) would take at those rates.
Runs on a CPU too, slowly (docs/REAL_DATA.md gives the CPU figures).

    HF_HUB_OFFLINE=1 python3 bench/real_smoke.py                 # cuda when available
    HF_HUB_OFFLINE=1 python3 bench/real_smoke.py --device cpu --clip RN50
    HF_HUB_OFFLINE=1 python3 bench/real_smoke.py --stage1-only --no-amp --steps 20

--stage1-only: stage 1 alone (CE-only, no teacher), for its images/s with and without --amp
(bench/gpu_check.sh runs both). Not a benchmark of accuracy (random teacher, a few images per
base class): of speed and memory. The projection is rates x the real sizes (38,400 base,
9,600 val, 12,000 novel images), an estimate: real JPEGs decode slower than these.
"""
import argparse
import importlib
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# mini-ImageNet and run.sh's mini-imagenet preset
BASE, VAL, NOVEL = 38400, 9600, 12000
EPOCHS1, VAL_EVERY1, EPOCHS3, STEPS4 = 90, 2, 60, 4000


def log_records(run, name):
    path = os.path.join(run, f"{name}_log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hours(s):
    return f"{s / 3600:6.2f} h" if s >= 360 else f"{s / 60:6.1f} min"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--clip", default="ViT-B-32", help="open_clip architecture (random weights)")
    p.add_argument("--n-train", type=int, default=4, help="images per base class (64 classes)")
    p.add_argument("--workers", type=int, default=4, help="stage-1 DataLoader workers")
    p.add_argument("--batch-size", type=int, default=64, help="stage-1 images per step")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 1's --amp (default: its own, on for CUDA)")
    p.add_argument("--stage1-only", action="store_true", help="stage 1 alone, CE-only")
    p.add_argument("--widths", default="64,160,320,640", help="stage-1 widths")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = tempfile.mkdtemp(prefix="syntrans-smoke-")
    os.environ["SYNTRANS_CACHE"] = os.path.join(work, "cache")
    os.chdir(REPO)
    import torch
    import common
    from store_speed import write_fake_mini
    root, run = os.path.join(work, "mini"), os.path.join(work, "run")
    write_fake_mini(root, REPO, args.n_train, 20)
    device = common.get_device(args.device)
    n_train, n_eval = 64 * args.n_train, 20 * 20
    base = ["--run", run, "--dataset", "mini-imagenet", "--data-root", root, "--clip", args.clip,
            "--clip-pretrained", "random", "--device", str(device)]
    batch = min(args.batch_size, n_train)
    amp = [] if args.amp is None else ["--amp" if args.amp else "--no-amp"]
    s1 = ["--widths", args.widths, "--epochs", "1", "--batch-size", str(batch),
          "--drop-rate", "0.1", "--val-episodes", "20", "--workers", str(args.workers), *amp]
    stages = [  # (script, flags, images the stage reads, what they are)
        ("01_distill", s1, n_train + n_train + 16 * 20,
         "teacher + student on base images, student on val"),
        ("02_mine", ["--sources", "templates"], 0, "text encoding of the prompt templates"),
        ("03_bridge", ["--hidden", "1024", "--epochs", "2", "--val-episodes", "20"],
         n_train + 16 * 20, "student features of base and val images"),
        ("04_classifier", ["--steps", "20", "--val-every", "10", "--val-episodes", "20",
                           "--shots", "1,3", "--n-query", "1"], 0,
         "features cached (base episodes fit 4 images per class)"),
        ("05_eval", ["--episodes", "100"], 2 * n_eval,
         "student + teacher features of novel images"),
    ]
    if args.stage1_only:
        stages = [("01_distill", s1 + ["--distill-weight", "0"], n_train + 16 * 20,
                   "student on base images (CE-only), student on val")]
    gpu = device.type == "cuda"
    where = (torch.cuda.get_device_name(device) if gpu
             else f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    print(f"device {device} ({where}); teacher {args.clip} (random weights); fake mini-ImageNet "
          f"84 px: {n_train} base, 320 val, {n_eval} novel images; stage-1 widths {args.widths}, "
          f"batch {batch}, amp {'default' if args.amp is None else args.amp}")
    total, full = time.time(), {}
    for script, flags, images, what in stages:
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        t = time.time()
        importlib.import_module(script).main(base + flags)
        dt = time.time() - t
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak" if gpu else ""
        rate = f"{images / dt:7.1f} img/s" if images else " " * 13
        print(f"SMOKE {script:<14s} {dt:7.1f}s {rate} {peak:>14s}  ({images} images: {what})",
              flush=True)
        full[script] = project(script, run, dt, n_train, n_eval, args.stage1_only)
    print(f"SMOKE total {time.time() - total:.1f}s; results in {run}/results.md")
    print("Full mini-ImageNet run at these rates (estimate: run.sh's preset, 90 epochs):")
    for script, (seconds, how) in full.items():
        print(f"FULL  {script:<14s} {hours(seconds)}  {how}")
    if not args.stage1_only:
        print(f"FULL  all stages     {hours(sum(s for s, _ in full.values()))}")


def project(script, run, wall, n_train, n_eval, stage1_only):
    """(seconds, how) of a full run of this stage, from the smoke run's log and wall time."""
    if script == "01_distill":
        name = "01_student_ce" if stage1_only else "01_student"
        steps = [r for r in log_records(run, name) if "val_1shot" not in r]
        train_s, rate = steps[-1]["seconds"], steps[-1]["img_s"]
        other = n_train * (0 if stage1_only else 1) + 16 * 20  # teacher, validation images
        other_rate = other / max(wall - train_s, 1e-9)
        full_other = (0 if stage1_only else BASE) + EPOCHS1 // VAL_EVERY1 * VAL
        one = EPOCHS1 * BASE / rate + full_other / other_rate
        runs = 1 if stage1_only else 2
        return runs * one, (f"training {rate:.1f} img/s: {EPOCHS1} x {BASE} images; validation "
                            f"and teacher {other_rate:.1f} img/s; x{runs} (CE-only baseline "
                            f"too)" if runs == 2 else f"training {rate:.1f} img/s x {EPOCHS1} "
                            f"epochs x {BASE} images, validation every {VAL_EVERY1}")
    if script == "02_mine":
        return 2 * wall, "x2 (templates-only ablation); language models not included"
    if script == "03_bridge":
        recs = [r for r in log_records(run, "03_bridge") if r.get("phase") == "bridge"]
        folds = len({r["phase"] for r in log_records(run, "03_bridge")})
        train_s = recs[-1]["seconds"] if recs else 0
        rate = recs[-1]["img_s"] if recs else 1
        extract = (n_train + 16 * 20) / max(wall - train_s * folds, 1e-9)
        one = folds * EPOCHS3 * BASE / rate + (BASE + VAL) / extract
        return 2 * one, (f"{rate:.0f} features/s x {EPOCHS3} epochs x {folds} fits, "
                         f"extraction {extract:.1f} img/s; x2 (templates bridge)")
    if script == "04_classifier":
        recs = log_records(run, "04_classifier")
        per_step = recs[-1]["seconds"] / recs[-1]["step"] if recs else wall / 20
        return 4 * STEPS4 * per_step, f"{per_step * 1000:.0f} ms/step x {STEPS4} steps x4 runs"
    rate = 2 * n_eval / wall
    return 2 * (VAL + NOVEL) / rate, (f"{rate:.1f} img/s x 2 (student, teacher) x {VAL} val + "
                                      f"{NOVEL} novel images")


if __name__ == "__main__":
    main()
