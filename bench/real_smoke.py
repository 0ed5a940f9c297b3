"""
GPU smoke test of the real-scale path: all five stages at the standard widths for a few
steps, on a fake mini-ImageNet in the real (Ravi) layout with 84-px JPEGs, with a real
open_clip architecture (ViT-B-32) whose random weights are asked for explicitly
(--clip-pretrained random). Prints img/s per stage and peak GPU memory. Runs on a CPU too,
slowly (docs/REAL_DATA.md gives the CPU figures).

    HF_HUB_OFFLINE=1 python3 bench/real_smoke.py                 # cuda when available
    HF_HUB_OFFLINE=1 python3 bench/real_smoke.py --device cpu --clip RN50

Not a benchmark of accuracy (random teacher, 4 images per base class): of speed and memory.
"""
import argparse
import importlib
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--clip", default="ViT-B-32", help="open_clip architecture (random weights)")
    p.add_argument("--n-train", type=int, default=4, help="images per base class (64 classes)")
    p.add_argument("--workers", type=int, default=4, help="stage-1 DataLoader workers")
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
    batch = min(64, n_train)
    stages = [  # (script, flags, images the stage reads, what they are)
        ("01_distill", ["--widths", "64,160,320,640", "--epochs", "1", "--batch-size", str(batch),
                        "--drop-rate", "0.1", "--val-episodes", "20", "--workers", str(args.workers)],
         n_train + n_train + 16 * 20, "teacher + student on base images, student on val"),
        ("02_mine", ["--sources", "templates"], 0, "text encoding of the prompt templates"),
        ("03_bridge", ["--hidden", "1024", "--epochs", "2", "--val-episodes", "20"], n_train + 16 * 20,
         "student features of base and val images"),
        ("04_classifier", ["--steps", "20", "--val-every", "10", "--val-episodes", "20", "--shots", "1,3",
                           "--n-query", "1"], 0, "features cached (base episodes fit 4 images per class)"),
        ("05_eval", ["--episodes", "100"], 2 * n_eval, "student + teacher features of novel images"),
    ]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} "
          f"{'' if device.type == 'cuda' else 'CPU cores, '}torch threads {torch.get_num_threads()}); teacher "
          f"{args.clip} (random weights); fake mini-ImageNet 84 px: {n_train} base, 320 val, {n_eval} novel images")
    total = time.time()
    for script, flags, images, what in stages:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.time()
        importlib.import_module(script).main(base + flags)
        dt = time.time() - t
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak" if device.type == "cuda" else ""
        rate = f"{images / dt:7.1f} img/s" if images else " " * 13
        print(f"SMOKE {script:<14s} {dt:7.1f}s {rate} {peak:>14s}  ({images} images: {what})", flush=True)
    print(f"SMOKE total {time.time() - total:.1f}s; results in {run}/results.md")


if __name__ == "__main__":
    main()
