"""
How fast file-based data reaches stage 1 and the teacher, on a fake mini-ImageNet in the
Ravi layout (84-px JPEGs, images/ + train.csv/val.csv/test.csv), written once to --root.

    HF_HUB_OFFLINE=1 python3 bench/store_speed.py                  # this checkout
    HF_HUB_OFFLINE=1 python3 bench/store_speed.py --repo /old/copy # another checkout, to compare

Prints img/s of: loading the train split (with the decode-once store: decoding it once),
one stage-1 epoch's data (the DataLoader of 01_distill.py, no training), one validation
pass's data, stage 1 itself (01_distill.py CE-only at the toy widths, 2 epochs,
validating each epoch: wall time per image trained), and teacher feature extraction of the
val split (the stand-in toy-clip-tiny, where decoding shows, and ViT-B-32 with random
weights). Each run uses a fresh, empty image store and feature cache. No assertion: numbers.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image


def write_fake_mini(root, repo, n_train, n_eval, size=84):
    """Random-noise JPEGs (decode like photos of that size) for every class of the real splits."""
    if os.path.exists(os.path.join(root, "test.csv")):
        return
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        with open(os.path.join(repo, "data", "splits", "mini-imagenet", f"{split}.tsv"), encoding="utf-8") as f:
            wnids = [line.split("\t")[0] for line in f.read().splitlines()[1:] if line.strip()]
        rows = ["filename,label"]
        for w in wnids:
            for i in range(n):
                name = f"{w}{i:08d}.jpg"
                noise = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
                Image.fromarray(noise).resize((size, size), Image.BILINEAR).save(os.path.join(root, "images", name))
                rows.append(f"{name},{w}")
        with open(os.path.join(root, f"{split}.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")


def timed(label, n, fn):
    t = time.time()
    out = fn()
    dt = time.time() - t
    print(f"{label:<58s} {n:5d} images {dt:7.2f}s {n / dt:8.1f} img/s", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "syntrans-fake-mini"))
    p.add_argument("--n-train", type=int, default=6, help="images per base class")
    p.add_argument("--n-eval", type=int, default=32, help="images per val / test class")
    p.add_argument("--skip-vit", action="store_true", help="no ViT-B-32 extraction (the slowest part)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = tempfile.mkdtemp(prefix="syntrans-bench-")
    os.environ["SYNTRANS_CACHE"] = os.path.join(work, "cache")  # a fresh store every time
    teacher_cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "tests")
    sys.path.insert(0, args.repo)
    os.chdir(args.repo)
    import torch
    import common
    write_fake_mini(args.root, args.repo, args.n_train, args.n_eval)
    print(f"repo {args.repo}; data {args.root}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f}; store {'yes' if hasattr(common, 'decode_once') else 'no'}")

    train = timed("load train split (store: decode once)", 64 * args.n_train,
                  lambda: common.load_split("mini-imagenet", "train", args.root))
    val = common.load_split("mini-imagenet", "val", args.root)
    loader = torch.utils.data.DataLoader(common.StudentImages(train), batch_size=128, shuffle=True)
    timed("stage-1 epoch data (DataLoader, 0 workers)", len(train), lambda: [b for b in loader])
    timed("validation pass data (student_batch)", len(val),
          lambda: [val.student_batch(list(range(i, min(i + 256, len(val))))) for i in range(0, len(val), 256)])

    distill = __import__("01_distill")
    run = os.path.join(work, "run")
    flags = ["--run", run, "--dataset", "mini-imagenet", "--data-root", args.root, "--distill-weight", "0",
             "--epochs", "2", "--val-every", "1", "--val-episodes", "50", "--batch-size", "64", "--device", "cpu"]
    timed("stage 1 CE-only, widths 16-32-64-128, 2 epochs + 2 val", 2 * (len(train) // 64 * 64),
          lambda: distill.main(flags))

    # the teacher reads the files themselves (its own resolution)
    os.environ["SYNTRANS_CACHE"] = teacher_cache  # the tests' stand-in teacher, trained once
    model, preprocess, _, ident = common.load_teacher("toy-clip-tiny")
    timed("teacher features, toy-clip-tiny (val split)", len(val),
          lambda: common.teacher_image_features(os.path.join(work, "t1"), model, preprocess, ident, val, "cpu"))
    if not args.skip_vit:
        pretrained = "random" if hasattr(common, "RANDOM") else None
        model, preprocess, _, ident = common.load_teacher("ViT-B-32", pretrained)
        timed("teacher features, ViT-B-32 random weights (val split)", len(val),
              lambda: common.teacher_image_features(os.path.join(work, "t2"), model, preprocess, ident, val, "cpu"))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
