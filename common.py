"""
common.py: the little every SynTrans stage shares.

  1. the ResNet-12 student
  2. few-shot episodes, the cosine nearest-centroid classifier and the 95% confidence interval
  3. datasets (the toy world and the real benchmarks) and their class names
  4. the CLIP teacher, loaded through open_clip only
  5. feature extraction with an on-disk cache
  6. running a stage: one-line errors, Ctrl-C, device, seed, the shared flags
  7. checkpoints, written atomically with the record of what made them
  8. checks before any work: flags, the run folder, upstream checkpoints that must agree
  9. `python common.py check`: a dataset folder read whole before hours of training

Each stage script (01_distill.py ... 05_eval.py) tells its own story and imports
only these pieces; what only one stage uses lives in that stage.
"""
import argparse
import contextlib
import errno
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import random
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.abspath(__file__))
FORMAT_VERSION = 1  # bump when the checkpoint layout changes; older files are refused

# File names inside a run folder (`--run runs/toy`): every stage reads and writes there.
STUDENT = "01_student.pt"           # distilled student (01_distill.py)
STUDENT_CE = "01_student_ce.pt"     # CE-only student, the ablation baseline (01_distill.py --distill-weight 0)
SEMANTICS = "02_semantics.pt"       # one semantic vector per class (02_mine.py)
BRIDGE = "03_bridge.pt"             # (03_bridge.py)
CLASSIFIER = "04_classifier.pt"     # (04_classifier.py)
RESULTS = "results.json"            # (05_eval.py)


# ----------------------------------------------------------------------------------
# 1. The ResNet-12 student (the standard few-shot backbone: 4 residual blocks of
#    three 3x3 convs, BN and LeakyReLU 0.1, each followed by a 2x2 max-pool)

class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): drops square blocks of a feature map while training."""

    def __init__(self, drop_rate, block_size):
        super().__init__()
        self.drop_rate, self.block_size = drop_rate, block_size

    def forward(self, x):
        if not self.training or self.drop_rate == 0:
            return x
        h = x.shape[-1]
        bs = min(self.block_size, h)
        # block centres are drawn only where a whole block fits, so that about drop_rate is dropped
        gamma = self.drop_rate / bs ** 2 * h ** 2 / (h - bs + 1) ** 2
        seeds = (torch.rand(x.shape[0], x.shape[1], h - bs + 1, h - bs + 1, device=x.device) < gamma).float()
        mask = 1 - F.max_pool2d(F.pad(seeds, [bs - 1] * 4), bs, stride=1)
        return x * mask * mask.numel() / mask.sum().clamp(min=1)


class Block(nn.Module):
    def __init__(self, c_in, c_out, drop_rate=0.0, block_size=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.conv3, self.bn3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.pool = nn.MaxPool2d(2)
        self.drop = DropBlock(drop_rate, block_size)

    def forward(self, x):
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.shortcut(x), 0.1)
        return self.drop(self.pool(out))


class ResNet12(nn.Module):
    """ResNet-12: widths 64-160-320-640 by default (a 640-d feature after global
    average pooling). The toy world uses a narrower one (16-32-64-128) to train on a
    CPU. DropBlock (used in few-shot ResNet-12s since MetaOptNet, Lee et al. 2019)
    acts on the last two blocks, with our own settings: single positions (block size
    1) after block 3, 5x5 blocks (clipped to the map) after block 4, at a constant
    rate with no warm-up schedule."""

    def __init__(self, widths=(64, 160, 320, 640), drop_rate=0.0, block_size=5):
        super().__init__()
        c = [3, *widths]
        self.blocks = nn.Sequential(*[
            Block(c[i], c[i + 1], drop_rate if i >= 2 else 0.0, block_size if i == 3 else 1) for i in range(4)])
        self.out_dim = widths[-1]

    def forward(self, x):
        return self.blocks(x).mean(dim=(2, 3))


def load_student(ckpt, device):
    """The ResNet-12 of a stage-1 checkpoint (01_distill.py), in eval mode on `device`."""
    student = ResNet12(tuple(ckpt["config"]["widths"])).to(device)
    student.load_state_dict(ckpt["state"]["student"])
    return student.eval()


IMAGE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # the student's own normalisation
IMAGE_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def to_student_input(images_uint8, device):
    """uint8 [B,3,H,W] -> normalised float on `device` (the student's preprocessing)."""
    x = images_uint8.to(device, non_blocking=True).float().div_(255)
    return (x - IMAGE_MEAN.to(device)) / IMAGE_STD.to(device)


# ----------------------------------------------------------------------------------
# 2. Few-shot episodes and the cosine nearest-centroid classifier

def sample_episodes(labels, n_way, k_shot, n_query, n_episodes, seed):
    """A fixed list of N-way K-shot episodes, Q queries per class, from a labelled set.

    Returns (classes [E, n_way], index [E, n_way, k_shot + n_query]): index[e, c, :k]
    are the support images of class classes[e, c], the rest its queries (disjoint).
    The same seed always gives the same episodes, so every method is scored on the
    same ones."""
    labels = torch.as_tensor(labels)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if n_classes < n_way:
        raise ValueError(f"{n_way}-way episodes need {n_way} classes; this split has {n_classes}")
    per_class = [torch.nonzero(labels == c).flatten() for c in range(n_classes)]
    short = [c for c, idx in enumerate(per_class) if len(idx) < k_shot + n_query]
    if short:
        raise ValueError(f"{k_shot}-shot episodes with {n_query} queries need {k_shot + n_query} images per class; "
                         f"class {short[0]} has {len(per_class[short[0]])}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.stack([torch.randperm(n_classes, generator=g)[:n_way] for _ in range(n_episodes)])
    index = torch.stack([torch.stack([per_class[c][torch.randperm(len(per_class[c]), generator=g)[:k_shot + n_query]]
                                      for c in ep.tolist()]) for ep in classes])
    return classes, index


def parse_list(text, flag, kind=int, what="numbers", example="1,5", n=None, low=None):
    """'1,5' -> [1, 5]; anything else (an empty item, a word, nan; not `n` values, one below
    `low`) is refused in one line."""
    try:
        values = [kind(x) for x in str(text).split(",")]
    except ValueError:
        values = None
    if (not values or not all(math.isfinite(v) for v in values) or (n and len(values) != n)
            or (low is not None and min(values) < low)):
        raise UserError(f"{flag}: '{text}' is not a comma-separated list of {what} such as {example}")
    return values


def check_episodes(split, n_way, shots, n_query, flags=None, min_shot=1):
    """Refuse, before any training, N-way episodes with `shots` (an int, or a string such as
    "1,5") support and n_query query images per class that `split` cannot supply. `flags`
    names the command-line flags that set them. Returns the shot counts as a list of ints."""
    shots = parse_list(shots, flags or "shots", int, "shot counts", "1,5")
    fix = f": lower {flags}" if flags else ": the dataset is incomplete (python common.py check warns about such classes)"
    if n_way < 2 or min(shots) < min_shot or n_query < 1:
        raise UserError(f"{n_way}-way {','.join(map(str, shots))}-shot episodes with {n_query} queries: use at "
                        f"least 2 ways, {min_shot} shot{'s' * (min_shot != 1)} and 1 query ({flags or 'fixed here'})")
    if n_way > len(split.classes):
        raise UserError(f"{n_way}-way episodes need {n_way} classes; {split.dataset} {split.split} has "
                        f"{len(split.classes)}{fix}")
    counts = torch.bincount(split.labels, minlength=len(split.classes))
    need = max(shots) + n_query
    if counts.min() < need:
        c = int(counts.argmin())
        raise UserError(f"{split.dataset} {split.split} class '{split.classes[c]}' has {int(counts[c])} images; "
                        f"{max(shots)}-shot episodes with {n_query} queries need {need}{fix}")
    return shots


VAL_WAYS, VAL_QUERIES = 5, 15  # the fixed validation episodes of stages 1, 3 and 4


def val_episodes(val, k_shot, n_episodes, seed, flags=None):
    """The fixed 5-way `k_shot`-shot val episodes (15 queries per class) on which stages 1, 3
    and 4 keep their best epoch or step: (classes, index) as sample_episodes returns them. A
    val split that cannot supply them is refused in one line (`flags`: what sets k_shot)."""
    check_episodes(val, VAL_WAYS, k_shot, VAL_QUERIES, flags)
    return sample_episodes(val.labels, VAL_WAYS, k_shot, VAL_QUERIES, n_episodes, seed)


def split_episodes(feats, index, k_shot):
    """support [E, N, K, d] and query [E, N, Q, d] features of a batch of episodes."""
    x = feats[index]
    return x[:, :, :k_shot], x[:, :, k_shot:]


def accuracy_from_logits(logits):
    """logits [E, N, Q, N] (query of class n scored against every class) -> accuracy per episode [E]."""
    target = torch.arange(logits.shape[1], device=logits.device).view(1, -1, 1)
    return (logits.argmax(-1) == target).float().mean(dim=(1, 2))


def protonet_logits(support, query):
    """Cosine nearest-centroid (ProtoNet's mean-support prototypes, scored by cosine rather than
    ProtoNet's squared Euclidean distance; SimpleShot without centring): [E, N, Q, N]."""
    protos = F.normalize(support.mean(2), dim=-1)  # [E, N, d]
    return torch.einsum("enqd,ecd->enqc", F.normalize(query, dim=-1), protos)


def protonet_accuracy(feats, index, k_shot, batch=500):
    """Per-episode cosine nearest-centroid accuracy [E] on precomputed features."""
    accs = [accuracy_from_logits(protonet_logits(*split_episodes(feats, index[i:i + batch], k_shot)))
            for i in range(0, len(index), batch)]
    return torch.cat(accs)


def class_centres(feats, labels, n_classes):
    """[C, d]: the normalised mean of each class's normalised features (the full-data
    class weight that the bridge and the reconstructor aim at)."""
    labels = labels.to(feats.device)
    return F.normalize(torch.stack([F.normalize(feats[labels == c], dim=-1).mean(0) for c in range(n_classes)]), dim=-1)


def ci95(values):
    """Mean and 95% interval half-width (1.96 * std / sqrt(n)) of per-episode values."""
    v = torch.as_tensor(values, dtype=torch.float64)
    return v.mean().item(), (1.96 * v.std(unbiased=True) / len(v) ** 0.5).item() if len(v) > 1 else 0.0


# ----------------------------------------------------------------------------------
# 3. Datasets. A Split holds one split's images (in memory as uint8, or as files read
#    on demand), integer labels 0..C-1 and the readable class names the semantic
#    stages use.

@dataclass
class Split:
    dataset: str
    split: str
    classes: list                 # readable class names, index = label
    labels: torch.Tensor          # [N] int64
    images: torch.Tensor = None   # [N, 3, H, W] uint8 (in-memory datasets), or
    paths: list = None            # N image files (read on demand)
    size: int = 32                # the student's input size
    ids: list = field(default_factory=list)  # dataset-specific class ids (wnids, CIFAR names)
    data_id: str = ""             # a hash of the data (file list, pickles or toy recipe): feature caches key on it

    def __len__(self):
        return len(self.labels)

    def pil(self, i):
        """Image i at its native resolution, as a PIL image (what open_clip's preprocessing takes)."""
        from PIL import Image
        if self.paths is None:  # (files are read even when decoded once: `images` holds them at the student's size)
            return Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        try:
            with Image.open(self.paths[i]) as im:
                return im.convert("RGB")
        except Exception as e:  # missing, not an image, truncated: name the file
            raise UserError(f"cannot read image {self.paths[i]} ({type(e).__name__}): replace or delete it "
                            f"(python common.py check --dataset {self.dataset} --data-root ... reads every image)")

    def student_batch(self, idx):
        """uint8 [B, 3, size, size] for the student."""
        if self.images is not None and self.images.shape[-1] == self.size:
            return self.images[idx]
        from PIL import Image
        out = [torch.from_numpy(np.array(self.pil(int(i)).resize((self.size, self.size), Image.BILINEAR)))
               for i in idx]
        return torch.stack(out).permute(0, 3, 1, 2).contiguous()


class StudentImages(torch.utils.data.Dataset):
    """Wraps a Split for a DataLoader (worker processes decode files in parallel);
    items are (uint8 image, label, index in the split)."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split.student_batch([i])[0], self.split.labels[i], i


def _toy(name, split, root, size=None, seed=0):
    """The toy world, rendered once into the image store (the same pixels as rendering it)."""
    import toyworld
    recipe = toyworld.split_recipe(name, split, seed)
    classes = [toyworld.class_name(a) for a in toyworld.make_classes(seed)[split]]
    labels = torch.arange(len(classes)).repeat_interleave(toyworld.SCALES[name]["n_train" if split == "train" else "n_eval"])

    def render(out):
        out[:] = toyworld.build_split(name, split, seed)[0].numpy()
    images = image_store(f"{name}-{split}-{recipe}", (len(labels), 3, toyworld.SIZE, toyworld.SIZE), render)
    return Split(name, split, classes, labels, images=images, size=toyworld.SIZE, ids=list(classes), data_id=recipe)


def image_store(key, shape, fill):
    """Decode once: uint8 images of `shape` [N, 3, H, W] in <cache>/images/<key>.npy, written by
    the first call (fill(out) decodes or renders them into the memory-mapped array `out`) and
    memory-mapped from disk by every later one, so tiered-ImageNet need not fit in memory.
    Written to a temporary file, then renamed: a killed run never leaves half a store."""
    path = os.path.join(cache_dir(), "images", f"{key}.npy")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npy"
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            fill(out)
            out.flush()
            del out
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    return torch.from_numpy(np.load(path, mmap_mode="c"))  # "c": pages read on demand, never written back


def decode_once(split, workers=None):
    """A split of image files with its images decoded once, at the student's size, into the
    image store (keyed by the split's file list); every later pass reads the store. Files are
    decoded by DataLoader workers; the teacher still reads the files (at its own resolution)."""
    if split.paths is None or split.images is not None:
        return split
    from tqdm import tqdm

    def decode(out):
        n_workers = min(8, os.cpu_count() or 1) if workers is None and len(split) >= 1000 else (workers or 0)
        loader = torch.utils.data.DataLoader(StudentImages(split), batch_size=64, num_workers=n_workers,
                                             generator=torch.Generator())  # the global RNG is untouched
        for images, _, idx in tqdm(loader, desc=f"decoding {split.dataset} {split.split} once", leave=False,
                                   disable=len(split) < 1000):
            out[idx.numpy()] = images.numpy()
    shape = (len(split), 3, split.size, split.size)
    split.images = image_store(f"{split.dataset}-{split.split}-{split.size}px-{split.data_id}", shape, decode)
    return split


def files_id(paths, *extra):
    """A short hash of a file list (paths, sizes, modification times) and `extra`: another copy
    of a dataset, or the same one changed, gets another id (without reading every file)."""
    h = hashlib.sha256(repr(extra).encode())
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# The four real benchmarks. Their class lists (id, readable name) are the project's own
# files data/splits/<dataset>/<split>.tsv (made from the published splits: see the README
# there); the row order of a file fixes the labels 0..C-1 of that split.

SPLIT_DIR = os.path.join(REPO, "data", "splits")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # compared in lower case: .JPEG counts
_CIFAR = "the folder that holds cifar-100-python/ (add --download to fetch it)"
_FOLDERS = "train/, val/, test/ holding one folder of images per wnid"
LAYOUTS = {"cifar-fs": _CIFAR, "fc100": _CIFAR, "tiered-imagenet": f"a folder with {_FOLDERS}",
           "folder": "a folder with train/, val/, test/ holding one folder of images per class "
                     "(and optionally classes.tsv: 'folder<TAB>readable name' lines)",
           "mini-imagenet": f"a folder with images/ and train.csv, val.csv, test.csv (Ravi layout) or {_FOLDERS}"}


def split_classes(dataset, split):
    """[(id, readable name), ...] of one split, in label order."""
    path = os.path.join(SPLIT_DIR, dataset, f"{split}.tsv")
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()][1:]  # [1:]: the header
    for row in rows:
        if len(row) < 2 or not row[1].strip():
            raise UserError(f"class {row[0]} has no readable name in {path}: add it (a second, tab-separated column)")
    return [(row[0], row[1]) for row in rows]


def _data_root(dataset, root):
    if not root or not os.path.isdir(root):
        problem = f"--data-root {root} is not a folder" if root else "no --data-root given"
        raise UserError(f"{problem}: {dataset} needs {LAYOUTS[dataset]}")
    return root


def _make_split(dataset, split, classes, labels, where, **data):
    """The Split, once every class of the split is known to have at least one image."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    counts = torch.bincount(labels, minlength=len(classes))
    if (counts == 0).any():
        cid, name = classes[int(torch.nonzero(counts == 0)[0])]
        raise UserError(f"{dataset} {split} class {cid} ({name}) has no images in {where}: the dataset is incomplete")
    return Split(dataset, split, [n for _, n in classes], labels, ids=[c for c, _ in classes], **data)


class _CifarUnpickler(pickle.Unpickler):
    """A pickle reader that admits only what the official CIFAR-100 files hold: dicts, lists,
    bytes, str, ints and numpy arrays. Any other global (os.system, eval, ...) is refused
    before it can run: a dataset folder is data, never code."""
    ALLOWED = {(m, n) for core in ("numpy.core", "numpy._core") for m, n in [
        (f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"), (f"{core}.numeric", "_frombuffer")]}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # encode: bytes in protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks to run {module}.{name}, which no CIFAR-100 file holds")
        return super().find_class(module, name)


def read_cifar100(root):
    """CIFAR-100 train + test from the 'python version' pickles, read with our own few lines
    (torchvision's reader verifies checksums) and a restricted unpickler:
    (uint8 images [N,3,32,32], fine labels [N], fine names)."""
    parts = []
    for name in ("meta", "train", "test"):
        path = os.path.join(root, "cifar-100-python", name)
        try:  # the official files hold a dict with bytes keys (b"data", b"fine_labels", ...)
            with open(path, "rb") as f:
                d = {k.decode() if isinstance(k, bytes) else k: v
                     for k, v in _CifarUnpickler(f, encoding="bytes").load().items()}
            if name == "meta":
                names = [n.decode() if isinstance(n, bytes) else n for n in d["fine_label_names"]]
            else:  # "data": a row of 3072 bytes per image, its red, green and blue 32x32 planes
                parts.append((torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)),
                              torch.as_tensor(d["fine_labels"], dtype=torch.int64)))
        except FileNotFoundError:
            raise UserError(f"{path} not found: --data-root should be {_CIFAR}")
        except Exception as e:  # not a pickle, truncated, another dict...
            raise UserError(f"{path} is not a CIFAR-100 python-version pickle ({type(e).__name__}: {e}): "
                            f"delete cifar-100-python/ and fetch it again (--download)")
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), names


def _cifar(dataset, split, root, size=None):
    """cifar-fs (64/16/20 classes) and fc100 (60/20/20, by superclass): all 600 images of a class, 32x32."""
    images, fine, names = read_cifar100(_data_root(dataset, root))
    data_id = files_id([os.path.join(root, "cifar-100-python", n) for n in ("meta", "train", "test")], dataset, split)
    classes = split_classes(dataset, split)
    index = {cid: c for c, (cid, _) in enumerate(classes)}
    labels = torch.tensor([index.get(n, -1) for n in names])[fine]  # -1: a class of another split
    keep = labels >= 0
    return _make_split(dataset, split, classes, labels[keep], os.path.join(root, "cifar-100-python"),
                       images=images[keep], size=32, data_id=data_id)


def _ravi(dataset, split, root, index):
    """Ravi & Larochelle's layout: images/<file> plus <split>.csv rows 'filename,label' (label = wnid)."""
    import csv
    path = os.path.join(root, f"{split}.csv")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --data-root should be {LAYOUTS[dataset]}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if row]
    if not rows or rows[0][1] != ["filename", "label"]:
        raise UserError(f"{path} does not start with the header 'filename,label' of the Ravi split files")
    present = set(os.listdir(os.path.join(root, "images")))
    for n, row in rows[1:]:
        if len(row) != 2 or row[1] not in index:
            raise UserError(f"{path} line {n}: {','.join(row)!r} does not name one of the {len(index)} "
                            f"{dataset} {split} wnids (data/splits/{dataset}/{split}.tsv)")
        if row[0] not in present:
            raise UserError(f"{os.path.join(root, 'images', row[0])} (listed in {path} line {n}) not found")
    return [os.path.join(root, "images", r[0]) for _, r in rows[1:]], [index[r[1]] for _, r in rows[1:]], path


def _folders(dataset, split, root, index):
    """The folder layout: <split>/<wnid>/<image>, any image extension."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserError(f"{folder} not found: --data-root should be {LAYOUTS[dataset]}")
    paths, labels = [], []
    for wnid in sorted(os.listdir(folder)):
        sub = os.path.join(folder, wnid)
        if wnid.startswith(".") or not os.path.isdir(sub):
            continue  # stray files (.DS_Store, a README)
        if wnid not in index:
            raise UserError(f"unknown class folder {sub}: not one of the {len(index)} {dataset} {split} wnids "
                            f"(data/splits/{dataset}/{split}.tsv)")
        files = sorted(f for f in os.listdir(sub) if os.path.splitext(f)[1].lower() in IMAGE_EXTS)
        paths += [os.path.join(sub, f) for f in files]
        labels += [index[wnid]] * len(files)
    return paths, labels, folder


def _imagenet(dataset, split, root, size=None):
    """mini-imagenet (Ravi or folder layout) and tiered-imagenet (folder layout): image files
    read on demand, resized to 84x84 for the student."""
    root, classes = _data_root(dataset, root), split_classes(dataset, split)
    index = {wnid: c for c, (wnid, _) in enumerate(classes)}
    ravi = dataset == "mini-imagenet" and os.path.isdir(os.path.join(root, "images"))  # else the folder layout
    paths, labels, where = (_ravi if ravi else _folders)(dataset, split, root, index)
    return _make_split(dataset, split, classes, labels, where, paths=paths, size=84,
                       data_id=files_id(paths, labels))


def folder_classes(root, split):
    """Your own dataset: [(folder, readable name), ...] of root/<split>/<class>/, sorted by folder
    (torchvision's ImageFolder order). Names come from root/classes.tsv ('folder<TAB>name' lines)
    when it names the folder, else from the folder name with '_' and '-' read as spaces."""
    folder = os.path.join(_data_root("folder", root), split)
    if not os.path.isdir(folder):
        raise UserError(f"{folder} not found: --data-root should be {LAYOUTS['folder']}")
    names, tsv = {}, os.path.join(root, "classes.tsv")
    if os.path.isfile(tsv):
        with open(tsv, encoding="utf-8") as f:
            names = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line and line.strip())
    subs = sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
    return [(d, names.get(d, "").strip() or " ".join(d.replace("_", " ").replace("-", " ").split())) for d in subs]


def _own(dataset, split, root, size=None):
    """--dataset folder: root/{train,val,test}/<class>/<images>, at --image-size (default 84)."""
    classes = folder_classes(root, split)
    index = {d: c for c, (d, _) in enumerate(classes)}
    paths, labels, where = _folders(dataset, split, root, index)
    size = size or 84
    return _make_split(dataset, split, classes, labels, where, paths=paths, size=size,
                       data_id=files_id(paths, labels, size))


# name -> loader(name, split, root, size). The toy worlds are rendered once into the image store.
DATASETS = {"toy": _toy, "toy-tiny": _toy, "cifar-fs": _cifar, "fc100": _cifar,
            "mini-imagenet": _imagenet, "tiered-imagenet": _imagenet, "folder": _own}
SPLITS = ("train", "val", "test")  # base / validation / novel classes


def read_split(dataset, split, root=None, size=None):
    """One split as listed on disk (files not decoded yet); `size` is --image-size (folder only)."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}': choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset](dataset, split, root, size)


def load_split(dataset, split, root=None, size=None):
    """One split, its image files decoded once (decode_once) for every later pass."""
    return decode_once(read_split(dataset, split, root, size))


def base_split(dataset, part, root=None, size=None, heldout=0.2):
    """The base classes' images, in two parts disjoint by index: "train", the images stage 1
    trains the student on, and "heldout", images the student never sees, on which stage 4
    meta-trains (its episodes as hard as a novel class's: docs/DESIGN.md, stage 4). The toy
    world renders its held-out images (toyworld.build_heldout: later indices of the same
    classes, so the student keeps its few per class); real data holds out the last
    `heldout` fraction of each class's images (01_distill.py --heldout)."""
    if dataset.startswith("toy"):
        if part == "train":
            return load_split(dataset, "train", root, size)
        return _toy_heldout(dataset)
    full = read_split(dataset, "train", root, size)
    if part == "train" and heldout == 0:
        return decode_once(full)  # nothing held out: the split as before
    if heldout == 0:
        raise UserError("stage 4 meta-trains on held-out base images, and this student was trained "
                        "on all of them (01_distill.py --heldout 0): rerun 01_distill.py with "
                        "--heldout above 0")
    held = heldout_mask(full.labels, heldout)
    idx = torch.nonzero(held if part == "heldout" else ~held).flatten()
    images = full.images[idx] if full.images is not None else None
    paths = [full.paths[int(i)] for i in idx] if full.paths is not None else None
    sub = replace(full, split=part, labels=full.labels[idx], images=images, paths=paths,
                  data_id=f"{full.data_id}-{part}{heldout}")
    return decode_once(sub)


def heldout_mask(labels, fraction):
    """[N] bool: per class, the last round(fraction * n) of its images (by index) are held out;
    at least one is, and at least one is kept, where a class has two or more."""
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        n = min(max(round(fraction * len(idx)), 1), len(idx) - 1) if len(idx) > 1 else 0
        held[idx[len(idx) - n:]] = n > 0
    return held


def _toy_heldout(name, seed=0):
    """The toy world's held-out base images, rendered once into the image store."""
    import toyworld
    recipe = toyworld.heldout_recipe(name, seed)
    classes = [toyworld.class_name(a) for a in toyworld.make_classes(seed)["train"]]
    labels = torch.arange(len(classes)).repeat_interleave(toyworld.N_HELDOUT[name])

    def render(out):
        out[:] = toyworld.build_heldout(name, seed)[0].numpy()
    images = image_store(f"{name}-heldout-{recipe}", (len(labels), 3, toyworld.SIZE, toyworld.SIZE),
                         render)
    return Split(name, "heldout", classes, labels, images=images, size=toyworld.SIZE,
                 ids=list(classes), data_id=recipe)


def class_names(dataset, root=None):
    """Readable class names per split: {"train": [...], "val": [...], "test": [...]}.
    Read from the class lists alone (no image is loaded); `root` is needed only by folder."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}': choose one of {', '.join(DATASETS)}")
    if dataset.startswith("toy"):
        import toyworld
        return {s: [toyworld.class_name(a) for a in toyworld.make_classes()[s]] for s in SPLITS}
    if dataset == "folder":
        return {s: [name for _, name in folder_classes(root, s)] for s in SPLITS}
    return {s: [name for _, name in split_classes(dataset, s)] for s in SPLITS}


# ----------------------------------------------------------------------------------
# 4. The CLIP teacher, always through open_clip: a model name plus `pretrained`, an
#    open_clip tag ("openai", "laion2b_s34b_b79k", ...) or a local checkpoint file.

TOY_TEACHERS = {"toy-clip": "toy", "toy-clip-tiny": "toy-tiny"}  # teacher -> the toy web set it learns from


def cache_dir():
    return os.environ.get("SYNTRANS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "syntrans"))


RANDOM = "random"  # --clip-pretrained random: an untrained CLIP, only when asked for (smoke tests)


def check_teacher(args):
    """Refuse, before any work, a teacher that would silently spoil a run: the toy teacher on
    real data, or an open_clip model without weights. Returns the teacher's identity."""
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{args.dataset}': choose one of {', '.join(DATASETS)}")
    if args.clip in TOY_TEACHERS and not args.dataset.startswith("toy"):
        raise UserError(f"{args.dataset} needs a real CLIP teacher, not the toy world's {args.clip}: pass "
                        f"--clip ViT-B-32 --clip-pretrained openai (or a weights file)")
    return teacher_identity(args.clip, args.clip_pretrained)


def toy_teacher_file(name):
    """Where the stand-in teacher `name` is cached; the file name records its recipe (renderer,
    captions, config, sizes), so a changed toy world never reuses a teacher trained on the old one."""
    import toyworld
    return os.path.join(cache_dir(), f"{name}-{toyworld.teacher_recipe(TOY_TEACHERS[name])}.pt")


def teacher_identity(name, pretrained):
    """What names a teacher in checkpoints and cache keys, without building it: the model,
    its tag or file (by content), and QuickGELU when its weights were trained with it.
    Refuses an unknown model, tag or file, and a missing --clip-pretrained (random weights)."""
    if name in TOY_TEACHERS:
        if pretrained and not os.path.exists(pretrained):  # (without one, the stand-in is trained once)
            raise UserError(f"--clip-pretrained '{pretrained}' is neither a file nor an open_clip tag of toy-clip "
                            f"(tags: none)")
        pretrained = pretrained or toy_teacher_file(name)
        arch = "toy-clip"
    else:
        import open_clip
        arch = name
        if name not in open_clip.list_models():
            raise UserError(f"unknown teacher '{name}': choose toy-clip, toy-clip-tiny or an open_clip model "
                            f"such as ViT-B-32, RN50, ViT-B-16 (open_clip.list_models() has all)")
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained is None:
            raise UserError(f"--clip {name} without --clip-pretrained is a CLIP with random weights: pass "
                            f"--clip-pretrained {'openai' if 'openai' in tags else (tags or ['FILE'])[0]} or a "
                            f"weights file (--clip-pretrained {RANDOM} only for a smoke test)")
        if pretrained != RANDOM and not os.path.exists(pretrained) and pretrained not in tags:
            raise UserError(f"--clip-pretrained '{pretrained}' is neither a file nor an open_clip tag of {name} "
                            f"(tags: {', '.join(tags) or 'none'})")
    is_file = pretrained != RANDOM and os.path.exists(pretrained)
    ident = {"name": name, "pretrained": os.path.basename(pretrained) if is_file else pretrained,
             "file_id": file_id(pretrained) if is_file else ""}
    if arch != "toy-clip" and quick_gelu(arch, pretrained):
        ident["quick_gelu"] = True
    return ident


def quick_gelu(arch, pretrained):
    """Were these weights trained with QuickGELU (OpenAI's CLIPs were)? open_clip builds most
    models with GELU and only warns for a tag (and not at all for a file), so we decide:
    the tag's own record; for a file, OpenAI's TorchScript release or a path that says openai;
    a '-quickgelu' model name always."""
    import open_clip
    if arch.endswith("-quickgelu"):
        return True
    if pretrained == RANDOM or not pretrained:
        return False
    if not os.path.exists(pretrained):
        return bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))
    return is_torchscript(pretrained) or "openai" in os.path.abspath(pretrained).lower()


def is_torchscript(path):
    """OpenAI's own downloads (ViT-B-32.pt, ...) are TorchScript archives: a zip with code/ and constants.pkl."""
    import zipfile
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def load_teacher(name, pretrained=None, device="cpu"):
    """Returns (model in eval mode with frozen parameters, image preprocess, tokenizer, identity).
    The toy teachers are an open_clip config shipped in data/ plus a checkpoint file trained
    once here; real ones are any open_clip model with a tag, a weights file (OpenAI's TorchScript
    files too) or, asked for explicitly, random weights."""
    import open_clip
    ident = teacher_identity(name, pretrained)
    arch, given = name, pretrained
    if name in TOY_TEACHERS:
        import toyworld
        open_clip.add_model_config(toyworld.TEACHER_CONFIG)
        arch, pretrained = "toy-clip", pretrained or toy_teacher_file(name)
        if not os.path.exists(pretrained):
            print(f"training the stand-in teacher {name} once (cached at {pretrained})")
            teacher = toyworld.train_teacher(TOY_TEACHERS[name])
            atomic_save(teacher.state_dict(), pretrained)  # a kill or full disk leaves no half file
            ident = teacher_identity(name, pretrained)
    jit = pretrained != RANDOM and os.path.exists(pretrained) and is_torchscript(pretrained)
    weights = None if pretrained == RANDOM or jit else pretrained
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=weights, device=device, force_quick_gelu=bool(ident.get("quick_gelu")))
    except Exception as e:
        if weights and os.path.isfile(weights):  # truncated, empty, random bytes, another model's weights
            again = "pass a good weights file" if given else "it is trained again on the next run"
            raise UserError(f"{weights} is not a readable weights file of {arch} ({type(e).__name__}): "
                            f"delete it ({again})") from None
        if isinstance(e, RuntimeError) and "download" in str(e).lower():
            raise UserError(f"could not fetch the weights of {arch}/{pretrained} (offline?): download them once "
                            f"on a connected machine and pass the file with --clip-pretrained")
        raise
    if jit:  # OpenAI's TorchScript file: its state dict has open_clip's names, plus three constants
        state = torch.jit.load(pretrained, map_location="cpu").state_dict()
        unsaved = {n for n, _ in model.named_buffers()} - set(model.state_dict())  # e.g. the text attn_mask
        for k in ("input_resolution", "context_length", "vocab_size", *unsaved):
            state.pop(k, None)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{pretrained} holds the weights of another model than {arch} "
                            f"({str(e).splitlines()[0]}): pass the matching --clip")
    model.eval().requires_grad_(False)
    if arch != "toy-clip":
        print(f"teacher {name} (" + ("random weights, as asked)" if pretrained == RANDOM else
              f"{ident['pretrained']}, QuickGELU)" if ident.get("quick_gelu") else f"{ident['pretrained']}, "
              f"GELU: if these are OpenAI's weights, name the model {name}-quickgelu)"))
    return model, preprocess, open_clip.get_tokenizer(arch), ident


# ----------------------------------------------------------------------------------
# 5. Features of a whole split, computed once and cached in the run folder. The key
#    records what produced them, so a changed model or dataset never reuses them.

@torch.no_grad()
def extract(fn, split, batch_fn, device, batch=256, desc="features"):
    from tqdm import tqdm
    feats = []
    for i in tqdm(range(0, len(split), batch), desc=desc, leave=False, disable=len(split) <= 4 * batch):
        feats.append(fn(batch_fn(range(i, min(i + batch, len(split)))).to(device)).float().cpu())
    return torch.cat(feats)


def cached_features(run, key, compute):
    """Return compute() cached at run/cache/<hash of key>.pt; `key` is a dict naming the
    model (and its checkpoint id), dataset and split."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(run, "cache", f"{key.get('kind', 'feat')}-{key.get('split', '')}-{h}.pt")
    if os.path.exists(path):
        try:
            return torch.load(path, weights_only=True)["features"]
        except Exception:
            pass  # a broken cache file is simply recomputed
    feats = compute()
    atomic_save({"key": key, "features": feats}, path)
    return feats


class TeacherImages(torch.utils.data.Dataset):
    """A split through the teacher's own preprocessing (its resolution and normalisation),
    from the image files at their native size; for a DataLoader whose workers decode them."""

    def __init__(self, split, preprocess):
        self.split, self.preprocess = split, preprocess

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.preprocess(self.split.pil(i))


def teacher_image_features(run, model, preprocess, ident, split, device):
    """L2-normalised teacher embeddings of every image of a split, cached. `model` may instead
    be a function returning (model, preprocess) (with preprocess None): it is called only when
    the features are not cached yet, so that a warm run never builds the teacher."""
    def compute():
        from tqdm import tqdm
        m, p = model() if preprocess is None else (model, preprocess)
        workers = min(8, os.cpu_count() or 1) if split.paths is not None and len(split) >= 500 else 0
        loader = torch.utils.data.DataLoader(TeacherImages(split, p), batch_size=256, num_workers=workers,
                                             generator=torch.Generator())  # its own: the global RNG is untouched
        with torch.no_grad():
            feats = [m.encode_image(x.to(device)).float().cpu()
                     for x in tqdm(loader, desc=f"teacher {split.split}", leave=False, disable=len(split) <= 1024)]
        return F.normalize(torch.cat(feats), dim=-1)
    key = dict(kind="teacher", teacher=ident, dataset=split.dataset, split=split.split, n=len(split), data=split.data_id)
    return cached_features(run, key, compute)


def student_features(run, student, student_id, split, device):
    """Student features (before any head) of every image of a split, cached."""
    student.eval()

    def compute():
        return extract(student, split, lambda idx: to_student_input(split.student_batch(list(idx)), device),
                       device, desc=f"student {split.split}")
    key = dict(kind="student", student=student_id, dataset=split.dataset, split=split.split, n=len(split),
               data=split.data_id)
    return cached_features(run, key, compute)


# ----------------------------------------------------------------------------------
# 6. Running a stage: a one-line error for a user's mistake, Ctrl-C and SIGTERM, the
#    device, the seed and the flags every stage takes

class UserError(Exception):
    """A mistake in the input (a path, a flag, a missing stage) rather than a bug:
    reported as one line that says what to do, without a traceback."""


_interrupt_hint = None  # set by on_interrupt(): what to say when the user presses Ctrl-C
INTERRUPTED = "files are written whole or not at all, so nothing half-written was left; rerun the command"


def on_interrupt(hint):
    """Say what a Ctrl-C (SIGINT) leaves behind and how to go on: `hint` is a string or a
    function returning one (called when the interrupt comes, so it can look at the disk)."""
    global _interrupt_hint
    _interrupt_hint = hint


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a batch system's time limit): handled as a Ctrl-C is, exit code 143."""


def _terminate(signum, frame):
    raise Terminated


def run_main(main):
    """Call a stage's main(); user errors become a one-line message and exit code 2,
    a Ctrl-C or SIGTERM a one-line message and exit code 130 or 143. Other exceptions are
    bugs: traceback. Ctrl-C works even where the shell started us with SIGINT ignored
    (`cmd &` in a script, nohup)."""
    on_interrupt(None)
    before = {s: signal.signal(s, h) for s, h in [(signal.SIGINT, signal.default_int_handler),
                                                   (signal.SIGTERM, _terminate)]}
    try:
        main()
    except UserError as e:
        msg = str(e).strip()
        if "\n" in msg:  # re-raised from a DataLoader worker: "Caught UserError in ...\n<traceback>"
            msg = msg.splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        hint = _interrupt_hint() if callable(_interrupt_hint) else _interrupt_hint
        print(f"interrupted: {hint or INTERRUPTED}", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def get_device(name=None):
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device: use cpu or cuda (cuda:N for GPU N)") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device {name}, but torch sees {torch.cuda.device_count()} usable CUDA GPU(s) here "
                        f"(no driver, or another index): use --device cpu or omit --device")
    return device


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parser(doc):
    """The flag parser of a stage: its description is the header's second line, the defaults
    are shown in --help, and the flags every stage shares are declared already."""
    p = argparse.ArgumentParser(description=(doc or "\n").split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag(p, "--run", default="runs/toy", help="run folder: every stage reads and writes its files here")
    flag(p, "--dataset", default="toy", help=f"one of {', '.join(DATASETS)}")
    flag(p, "--data-root", default=None, help="folder of the real dataset (unused for the toy world)")
    flag(p, "--image-size", type=int, default=84, help="the student's input size for --dataset folder")
    flag(p, "--clip", default="toy-clip",
         help="open_clip model name (e.g. ViT-B-32), or toy-clip / toy-clip-tiny")
    flag(p, "--clip-pretrained", default=None,
         help="open_clip pretrained tag (e.g. openai) or a local checkpoint file; "
              "toy teachers are trained once and cached when omitted")
    flag(p, "--seed", type=int, default=0, within="[0, 4294967295]",  # numpy takes 32-bit seeds
         help="random seed")
    flag(p, "--device", default=None, help="cuda / cpu (default: cuda when available)")
    return p


def flag(p, *names, within=None, **kw):
    """Declare a flag once: argparse's own arguments (default, type, help, ...) and, for a
    number, `within`, the interval it must lie in ("(0, inf)", "[0, 1)"; NaN lies in none),
    which start() checks before any work."""
    action = p.add_argument(*names, **kw)
    if within:
        p.within = {**getattr(p, "within", {}), action.dest: within}


def start(p, argv, stage=None, out=None):
    """Begin a stage: parse the flags and refuse, before any work, a number outside its
    declared interval, a --run folder that cannot be written and, for a stage that writes a
    checkpoint, a file of that name there that is not an earlier output of `stage`. Then
    remove the temporary files a killed run left in the run folder, pick the device and
    seed every random generator. `out(args)` names the output when its default depends on
    other flags (else --out). Returns (args, device); args.out is the output's name."""
    args = p.parse_args(argv)
    for name, interval in getattr(p, "within", {}).items():
        check_range(name, getattr(args, name), interval)
    if out is not None:
        args.out = out(args)
    check_run_folder(args.run)
    if stage is not None:
        check_output(os.path.join(args.run, args.out), stage)
    remove_stale_temp_files(args.run)
    device = get_device(args.device)
    set_seed(args.seed)
    return args, device


def check_range(name, value, interval):
    """`value` of flag `name` lies in `interval` ("[0, 1)": closed below, open above)."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = lo < value if interval[0] == "(" else lo <= value
    if not (above and (value < hi if interval[-1] == ")" else value <= hi)):
        raise UserError(f"--{name.replace('_', '-')} {value} is out of range: use a value in {interval}")


def check_finite(loss, where, last_finite=None, kept=None):
    """The NaN check of every training loop: returns loss.item(), or stops the stage with one
    line saying where the loss stopped being a number, the last finite loss and what is
    kept (`kept`: the last good checkpoint, if it exists; else nothing was written)."""
    value = loss.item()
    if math.isfinite(value):
        return value
    before = "none yet" if last_finite is None else f"{last_finite:.6g}"
    kept = f"the last good epoch is kept in {kept}" if kept and os.path.exists(kept) \
        else "no checkpoint was written"
    raise UserError(f"loss became {value} at {where} (last finite loss {before}): lower --lr; {kept}")


def cosine_schedule(opt, steps):
    """The learning rate decays from its value to 0 along half a cosine over `steps` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))


def mlp(d_in, d_hidden, d_out, dropout=None):
    """Linear, LeakyReLU(0.1), (Dropout), Linear: the small maps of stages 3 and 4."""
    drop = [] if dropout is None else [nn.Dropout(dropout)]
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LeakyReLU(0.1), *drop, nn.Linear(d_hidden, d_out))


def stage_module(name):
    """Another stage's module ("03_bridge"): its classes load the weights that stage wrote.
    (A file name that starts with a digit cannot be imported with `import`.)"""
    return importlib.import_module(name)


# ----------------------------------------------------------------------------------
# 7. Checkpoints: written whole or not at all, and loaded with the record of what made them

def file_id(path):
    """A short content hash: identifies the exact upstream checkpoint a stage was built on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def write_files(files):
    """Write {path: bytes} as one step: each file to a temporary file, then all renamed. A
    crash never leaves half a file; a failed write (disk full, read-only folder) changes
    none of them, leaves no temporary file and is one line. Several files (02_semantics.pt
    and 02_descriptions.json, results.json and results.md) always describe the same run:
    Ctrl-C and SIGTERM wait until all are renamed, and another run's renames until ours are done."""
    tmps = {path: f"{path}.tmp{os.getpid()}" for path in files}
    path = None
    try:
        for path, data in files.items():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(tmps[path], "wb") as f:
                f.write(data)
        path = None
        with _one_step(files):
            for path in files:
                os.replace(tmps[path], path)
    except BaseException as e:  # Ctrl-C included: no temp file is left behind
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        if isinstance(e, OSError):
            full = " (the disk is full: free some space)" if e.errno == errno.ENOSPC else ""
            raise UserError(f"cannot write {path or ', '.join(files)}: {e.strerror or e}{full}; "
                            f"nothing was changed there") from None
        raise


@contextlib.contextmanager
def _one_step(files):
    """Renames of several files: the first folder locked against other runs' renames, and
    Ctrl-C / SIGTERM held back until the end (the main thread handles signals)."""
    if len(files) < 2 or threading.current_thread() is not threading.main_thread():
        yield
        return
    import fcntl
    pending, fd = [], os.open(os.path.dirname(os.path.abspath(next(iter(files)))), os.O_RDONLY)
    before = {s: signal.signal(s, lambda n, _: pending.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock
        for s, h in before.items():
            signal.signal(s, h)
        if pending:
            signal.raise_signal(pending[0])


def checkpoint_bytes(obj):
    """torch.save into memory (so that a full disk is an OSError when the bytes are written,
    not the zip writer's 'unexpected pos')."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer()


def atomic_save(obj, path, together=None):
    """torch.save, atomically; `together` ({path: text}): files written in the same step."""
    write_files({path: checkpoint_bytes(obj), **{p: t.encode("utf-8") for p, t in (together or {}).items()}})


def atomic_write_text(text, path):
    write_files({path: text.encode("utf-8")})


def save_checkpoint(path, stage, config, dataset, classes, state, upstream=None, together=None, **extra):
    """Every checkpoint is a plain dict of tensors, numbers and strings, so that it
    loads with torch.load(weights_only=True). It records what made it: the stage,
    its config, the dataset and class names per split, and the upstream checkpoints
    (name -> content id) it was built on, so that the next stage can refuse a mismatch.
    `together` ({path: text}): files that describe the same run, written in the same step."""
    ckpt = dict(format=FORMAT_VERSION, stage=stage, config=config, dataset=dataset,
                classes=classes, state=state, upstream=upstream or {}, **extra)
    atomic_save(ckpt, path, together)


def load_checkpoint(path, stage, hint):
    """Load a checkpoint written by `stage`; `hint` says how to make it when missing."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it and {hint}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} has checkpoint format {found}, this code reads format {FORMAT_VERSION}: {hint}")
    if ckpt.get("stage") != stage:
        raise UserError(f"{path} was written by stage '{ckpt.get('stage')}', expected '{stage}': {hint}")
    ckpt["id"], ckpt["path"] = file_id(path), path
    return ckpt


class Resume:
    """--resume (stage 1): after every epoch, <out>.last.pt holds the state of every part
    (modules, optimiser, scheduler: anything with a state_dict), the random generators, the
    history and the best epoch so far, so that a stopped run goes on exactly where it was.
    Made before any work, it tells a Ctrl-C whether there is an epoch to go on from."""

    def __init__(self, out, wanted, stage, device):
        self.path, self.stage, self.device = out[:-len(".pt")] + ".last.pt", stage, device
        self.wanted = wanted
        self.ready = wanted and os.path.exists(self.path)  # an epoch of this run, not an older run's
        on_interrupt(lambda: f"the last completed epoch is kept in {self.path}: rerun the same "
                     f"command with --resume to continue" if self.ready
                     else "no epoch had finished, nothing to resume: rerun")

    def kept(self):
        """The file that holds this run's last completed epoch, or None."""
        return self.path if self.ready else None

    def load(self, parts, config, dataset, classes, teacher, ignore=()):
        """Restore `parts` from the last epoch when resuming: (epoch, history, (best accuracy,
        best state)), or (0, [], (-1.0, None)) for a fresh start. The file must come from the
        same dataset, teacher and flags (those in `ignore` may differ)."""
        if not self.ready:
            if self.wanted:
                print(f"no {self.path} to resume from: starting at epoch 1")
            return 0, [], (-1.0, None)
        ck = load_checkpoint(self.path, self.stage, "rerun without --resume")
        check_same_world(ck, self.path, dataset, classes, teacher)
        check_same_config(ck, self.path, config, ignore)
        for name, part in parts.items():
            part.load_state_dict(ck["state"][name])
        torch.set_rng_state(ck["state"]["rng"])
        if self.device.type == "cuda" and "cuda_rng" in ck["state"]:  # DropBlock draws on the GPU
            torch.cuda.set_rng_state(ck["state"]["cuda_rng"], self.device)
        print(f"resumed from {self.path} at epoch {ck['epoch']}")
        return ck["epoch"], ck["history"], (ck["best_acc"], ck["state"]["best"])

    def save(self, parts, config, dataset, classes, teacher, epoch, history, best):
        """The checkpoint of a completed epoch (atomic: a kill never leaves half a file)."""
        cuda = self.device.type == "cuda"
        state = {name: part.state_dict() for name, part in parts.items()}
        state |= {"rng": torch.get_rng_state(),
                  **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if cuda else {}),
                  "best": best[1]}
        save_checkpoint(self.path, self.stage, config, dataset, classes, teacher=teacher,
                        epoch=epoch, history=history, best_acc=best[0], state=state)
        self.ready = True


def check_same_config(ckpt, path, config, ignore=()):
    """Refuse to resume from a checkpoint made with other flags (the result would be neither run)."""
    diff = [k for k in sorted(set(config) | set(ckpt["config"])) if k not in ignore
            and ckpt["config"].get(k) != config.get(k)]
    if diff:
        k = diff[0]
        more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
        raise UserError(f"{path} was made with --{k.replace('_', '-')} {ckpt['config'].get(k)}, "
                        f"not {config.get(k)}{more}: resume with the same flags, "
                        f"or start over without --resume")


# ----------------------------------------------------------------------------------
# 8. Checks before any work: flags in range, a writable run folder, and upstream
#    checkpoints of this dataset and teacher

def check_run_folder(run):
    """Refuse, before any work, a --run folder that cannot be written (or is a file)."""
    folder = os.path.abspath(run)
    while not os.path.exists(folder):  # the part of --run that exists already
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"--run {run}: {folder} is a file, not a folder: choose another --run")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"--run {run} cannot be written ({e.strerror}): "
                        f"choose a folder you can write to") from None


def check_output(path, stage):
    """Refuse to replace a file that is not a checkpoint of `stage` (stage 2 with --out
    01_student.pt would destroy hours of training): checked before any work."""
    name = os.path.basename(path)
    if not name.endswith(".pt") or name == ".pt":
        raise UserError(f"--out '{name}' is not a checkpoint file name: use a name ending in .pt")
    if not os.path.lexists(path):
        return
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
        found = found.get("stage") if isinstance(found, dict) else None
    except Exception:
        found = None
    if found != stage:
        what = f"a checkpoint of stage '{found}'" if found else "not a checkpoint"
        raise UserError(f"{path} exists and is {what}; this stage ('{stage}') does not replace it: "
                        f"choose another --out, or delete the file first")


def remove_stale_temp_files(run):
    """Remove, and say so, the temporary files (NAME.tmpPID) that a killed run (SIGKILL, a
    power cut) left in the run folder: those of a process that no longer exists."""
    gone = []
    for folder in (run, os.path.join(run, "cache"), os.path.join(run, "cache", "llm")):
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            pid = name.rpartition(".tmp")[2]
            if pid.isdigit() and not _alive(int(pid)):
                os.remove(os.path.join(folder, name))
                gone.append(name)
    if gone:
        print(f"removed {len(gone)} temporary file(s) that a killed run left in {run} ({', '.join(gone[:3])})")


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a number no pid has
        pass
    return True


def check_same_world(ckpt, path, dataset, classes=None, teacher=None):
    """Refuse an upstream checkpoint built on another dataset, class list or teacher."""
    if ckpt["dataset"] != dataset:
        raise UserError(f"{path} was built on dataset '{ckpt['dataset']}', not '{dataset}': "
                        f"use another --run folder or rerun that stage with --dataset {dataset}")
    if classes is not None and ckpt["classes"] != classes:
        raise UserError(f"{path} was built with other class names than dataset '{dataset}' has now: rerun that stage")
    if teacher is not None and not same_teacher(ckpt.get("teacher"), teacher):
        raise UserError(f"{path} was built with teacher {ckpt.get('teacher')}, not {teacher}: "
                        f"{teacher_advice(ckpt.get('teacher'), teacher, 'rerun that stage')}")


def check_same_teacher(ckpts):
    """Refuse upstream checkpoints ({path: checkpoint}) made with different teachers
    (a checkpoint without one, e.g. the CE-only student, is compatible with any)."""
    made = [(p, c["teacher"]) for p, c in ckpts.items() if c is not None and c.get("teacher")]
    for p, t in made[1:]:
        if not same_teacher(t, made[0][1]):
            who = [" ".join(str(x[k]) for k in ("name", "pretrained", "file_id") if x.get(k)) for x in (made[0][1], t)]
            raise UserError(f"{made[0][0]} was made with teacher {who[0]} but {p} with {who[1]}: "
                            f"{teacher_advice(made[0][1], t, 'rerun the stages')}")


def same_teacher(a, b):
    """Two teacher identities name the same teacher: the same model and, for weights read
    from a file, the same file content (wherever it lies), else the same pretrained tag."""
    if not a or not b:
        return a == b
    if a.get("quick_gelu", False) != b.get("quick_gelu", False):  # the same weights in another network
        return False
    if a.get("file_id") or b.get("file_id"):
        return a["name"] == b["name"] and a.get("file_id") == b.get("file_id")
    return a["name"] == b["name"] and a.get("pretrained") == b.get("pretrained")


def teacher_advice(a, b, rerun):
    """What to do about two teachers that differ: the same flags with other file content
    means the weights file itself was replaced since (e.g. in $SYNTRANS_CACHE)."""
    if a and b and a["name"] == b["name"] and a.get("pretrained") == b.get("pretrained"):
        return f"the teacher file {a.get('pretrained')} has other content now: rerun the stages from 01_distill.py"
    return f"{rerun} with the same --clip/--clip-pretrained"


SCRIPTS = {"distill": "01_distill.py", "mine": "02_mine.py", "bridge": "03_bridge.py",
           "classifier": "04_classifier.py"}  # stage -> the script that writes its checkpoints


def load_upstream(args, files, classes, optional=(), built_on=None):
    """The checkpoints a stage builds on, files = {key: (stage, file name in the run folder)},
    loaded and checked before any work. Each must exist (else: the command that makes it; a
    key in `optional` is None instead), be of this dataset and class list, agree with the
    others on the teacher, and be built on the files now in the run folder (a stage rerun
    since makes what was built on it stale); built_on = {key: [keys]}: the files that one
    must have been built on. Returns {key: checkpoint}."""
    ck = {}
    for key, (stage, name) in files.items():
        path = os.path.join(args.run, name)
        if key in optional and not os.path.exists(path):
            ck[key] = None
            continue
        hint = ("rerun the stage that writes it (or leave it deleted: its rows are then skipped)"
                if key in optional else f"run {SCRIPTS[stage]} --run {args.run} first")
        ck[key] = load_checkpoint(path, stage, hint)
        check_same_world(ck[key], path, args.dataset, classes)
    loaded = [c for c in ck.values() if c is not None]
    check_same_teacher({c["path"]: c for c in loaded})
    pairs = [(ck[k], ck[u], True) for k, ups in (built_on or {}).items() for u in ups]
    for c, u, required in pairs + [(c, u, False) for c in loaded for u in loaded]:
        name = os.path.basename(u["path"])
        if (required or name in c["upstream"]) and c["upstream"].get(name) != u["id"]:
            raise UserError(f"{c['path']} was built on another {name} than the one there now: "
                            f"rerun {SCRIPTS[c['stage']]} --run {args.run} and the stages after it")
    return ck


# ----------------------------------------------------------------------------------
# 9. `python common.py check`: is a dataset folder complete and readable? (run.sh runs it first)

def download(dataset, root):
    """Fetch CIFAR-100 into root/cifar-100-python with torchvision (used only to download)."""
    if LAYOUTS.get(dataset) != _CIFAR or not root:
        raise UserError("--download needs --dataset cifar-fs or fc100 and a --data-root")
    import torchvision
    try:
        torchvision.datasets.CIFAR100(root, train=True, download=True)
    except Exception as e:  # offline, disk full, ...
        raise UserError(f"could not download CIFAR-100 into {root} ({type(e).__name__}: {e})")


def check_images(split):
    """Decode every image file of a split (JPEGs at reduced scale, which is fast) to find broken ones."""
    from PIL import Image
    for path in split.paths or []:
        try:
            with Image.open(path) as im:
                im.draft("RGB", (split.size, split.size))
                im.load()
        except Exception as e:
            raise UserError(f"cannot read image {path} ({type(e).__name__}): replace or delete it")


def _check():
    """python common.py check --dataset D --data-root R [--download] [--clip M --clip-pretrained P]:
    loads every split of a dataset and decodes each image file, then (with --clip) loads the
    teacher; a bad folder or teacher gives a one-line error (exit code 2)."""
    import argparse
    p = argparse.ArgumentParser(description=_check.__doc__)
    p.add_argument("command", choices=["check"])
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-root", default=None, help="the dataset folder")
    p.add_argument("--image-size", type=int, default=None, help="the student's input size (--dataset folder)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR-100 first (cifar-fs, fc100)")
    p.add_argument("--clip", default=None, help="also load this teacher (as the stages would)")
    p.add_argument("--clip-pretrained", default=None, help="its tag or weights file")
    args = p.parse_args()
    if args.clip:  # a wrong teacher is refused before the images are read
        check_teacher(args)
    if args.download:
        download(args.dataset, args.data_root)
    for s in SPLITS:
        split = read_split(args.dataset, s, args.data_root, args.image_size)
        check_images(split)
        print(f"{s}: {len(split.classes)} classes, {len(split)} images ({', '.join(split.classes[:3])}, ...)")
        counts = torch.bincount(split.labels, minlength=len(split.classes))
        if counts.min() < 20:  # a few-shot episode takes 5 shots + 15 queries per class
            print(f"  warning: class {split.classes[int(counts.argmin())]} has only {int(counts.min())} images; "
                  f"5-shot episodes with 15 queries need 20")
    if args.clip:
        print("teacher:", load_teacher(args.clip, args.clip_pretrained)[3])


if __name__ == "__main__":
    run_main(_check)

