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
import stat
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
# CE-only student, the ablation baseline (01_distill.py --distill-weight 0)
STUDENT_CE = "01_student_ce.pt"
SEMANTICS = "02_semantics.pt"       # one semantic vector per class (02_mine.py)
BRIDGE = "03_bridge.pt"             # (03_bridge.py)
CLASSIFIER = "04_classifier.pt"     # (04_classifier.py)
RESULTS = "results.json"            # (05_eval.py)


# ----------------------------------------------------------------------------------
# 1. The ResNet-12 student (the standard few-shot backbone: 4 residual blocks of
#    three 3x3 convs, BN and LeakyReLU 0.1, each followed by a 2x2 max-pool)

class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): drops square blocks of a feature map while training.
    `drop_rate` is the rate now (set_drop_rate warms it up); at a map no larger than the
    block, a dropped block is the whole channel (MetaOptNet's block 4 at 84 px)."""

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
        seeds = (torch.rand(x.shape[0], x.shape[1], h - bs + 1, h - bs + 1, device=x.device)
                 < gamma).float()
        mask = 1 - F.max_pool2d(F.pad(seeds, [bs - 1] * 4), bs, stride=1)
        return x * mask * mask.numel() / mask.sum().clamp(min=1)


class Block(nn.Module):
    def __init__(self, c_in, c_out, drop_rate=0.0, block_size=1, dropblock=True):
        super().__init__()
        self.conv1, self.bn1 = (nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                nn.BatchNorm2d(c_out))
        self.conv2, self.bn2 = (nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                                nn.BatchNorm2d(c_out))
        self.conv3, self.bn3 = (nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                                nn.BatchNorm2d(c_out))
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.pool = nn.MaxPool2d(2)
        # MetaOptNet: DropBlock after blocks 3 and 4, plain dropout at the same rate after 1 and 2
        self.drop = (DropBlock(drop_rate, block_size) if dropblock
                     else nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity())

    def forward(self, x):
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.shortcut(x), 0.1)
        return self.drop(self.pool(out))


class ResNet12(nn.Module):
    """ResNet-12: widths 64-160-320-640 by default (a 640-d feature after global
    average pooling). The toy world uses a narrower one (16-32-64-128) to train on a
    CPU. Regularised as in MetaOptNet (Lee et al. 2019), whose ResNet-12 few-shot work
    since has used: DropBlock with `block_size` (5 at 84 px, 2 at 32 px) after blocks 3 and 4,
    dropout after blocks 1 and 2, all at `drop_rate`; stage 1 warms the DropBlock rate up
    linearly (set_drop_rate). drop_rate 0 (the toy default) leaves every layer out."""

    def __init__(self, widths=(64, 160, 320, 640), drop_rate=0.0, block_size=5):
        super().__init__()
        c = [3, *widths]
        self.blocks = nn.Sequential(*[
            Block(c[i], c[i + 1], drop_rate, block_size, dropblock=i >= 2) for i in range(4)])
        self.out_dim = widths[-1]

    def forward(self, x):
        return self.blocks(x).mean(dim=(2, 3))


def dropblock_size(image_size):
    """MetaOptNet's block size: 5 for its 84-px datasets, 2 for its 32-px ones (CIFAR-FS, FC100)."""
    return 5 if image_size >= 84 else 2


def warm_up_dropblock(model, rate, step, warmup_steps):
    """MetaOptNet's linear warm-up: the DropBlock rate grows from 0 to `rate` over
    `warmup_steps` steps, then stays (its 40,000 of 60,000 batches: our default 2/3)."""
    if rate > 0:
        set_drop_rate(model, rate * min(1.0, step / warmup_steps) if warmup_steps > 0 else rate)


def set_drop_rate(model, rate):
    """Set the rate of every DropBlock of `model` (the warm-up of stage 1; dropout stays)."""
    for m in model.modules():
        if isinstance(m, DropBlock):
            m.drop_rate = rate


def load_student(ckpt, device):
    """The ResNet-12 of a stage-1 checkpoint (01_distill.py), in eval mode on `device`."""
    with reading(ckpt):  # a hand-edited or older file: one line
        student = ResNet12(tuple(ckpt["config"]["widths"]))
    return load_weights(student, ckpt, "student").to(device).eval()


IMAGE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # the student's own normalisation
IMAGE_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def to_student_input(images_uint8, device):
    """uint8 [B,3,H,W] -> normalised float on `device` (the student's preprocessing)."""
    x = images_uint8.to(device, non_blocking=True).float().div_(255)
    x = (x - IMAGE_MEAN.to(device)) / IMAGE_STD.to(device)
    # on a GPU, channels_last: cuDNN's NHWC kernels (and tensor cores under bf16); same values
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


# ----------------------------------------------------------------------------------
# 2. Few-shot episodes and the cosine nearest-centroid classifier

def sample_episodes(labels, n_way, k_shot, n_query, n_episodes, seed):
    """A fixed list of N-way K-shot episodes, Q queries per class, from a labelled set.

    Returns (classes [E, n_way], index [E, n_way, k_shot + n_query]): index[e, c, :k]
    are the support images of class classes[e, c], the rest its queries (disjoint).
    The same seed always gives the same episodes, so every method is scored on the
    same ones."""
    n_classes, per_class = class_index(torch.as_tensor(labels))
    if n_classes < n_way:
        raise ValueError(f"{n_way}-way episodes need {n_way} classes; this split has {n_classes}")
    short = [c for c, idx in enumerate(per_class) if len(idx) < k_shot + n_query]
    if short:
        raise ValueError(f"{k_shot}-shot episodes with {n_query} queries need "
                         f"{k_shot + n_query} images per class; "
                         f"class {short[0]} has {len(per_class[short[0]])}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.stack([torch.randperm(n_classes, generator=g)[:n_way]
                           for _ in range(n_episodes)])
    index = torch.stack([torch.stack([per_class[c][torch.randperm(len(per_class[c]),
                                                                  generator=g)[:k_shot + n_query]]
                                      for c in ep.tolist()]) for ep in classes])
    return classes, index


_CLASS_INDEX = {}  # id(labels) -> (weak reference, version, n_classes, per-class index lists)


def class_index(labels):
    """(n_classes, [indices of class c for each c]) of a labels tensor, computed once per tensor
    (a split's labels): stage 4 samples episodes every step, and rebuilding the lists costs
    N x C comparisons (157M for tiered-ImageNet). Recomputed if the tensor is changed in place."""
    import weakref
    hit = _CLASS_INDEX.get(id(labels))
    if hit and hit[0]() is labels and hit[1] == labels._version:
        return hit[2], hit[3]
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    order = torch.argsort(labels, stable=True)  # one sort, not one comparison per class
    counts = torch.bincount(labels, minlength=n_classes).tolist() if n_classes else []
    per_class = list(order.split(counts)) if n_classes else []
    key = id(labels)
    ref = weakref.ref(labels, lambda _, key=key: _CLASS_INDEX.pop(key, None))
    _CLASS_INDEX[key] = (ref, labels._version, n_classes, per_class)
    return n_classes, per_class


def parse_list(text, flag, kind=int, what="numbers", example="1,5", n=None, low=None):
    """'1,5' -> [1, 5]; anything else (an empty item, a word, nan; not `n` values, one below
    `low`) is refused in one line."""
    try:
        values = [kind(x) for x in str(text).split(",")]
    except ValueError:
        values = None
    if (not values or not all(math.isfinite(v) for v in values) or (n and len(values) != n)
            or (low is not None and min(values) < low)):
        raise UserError(f"{flag}: '{text}' is not a comma-separated list of {what} "
                        f"such as {example}")
    return values


def check_episodes(split, n_way, shots, n_query, flags=None, min_shot=1):
    """Refuse, before any training, N-way episodes with `shots` (an int, or a string such as
    "1,5") support and n_query query images per class that `split` cannot supply. `flags`
    names the command-line flags that set them. Returns the shot counts as a list of ints."""
    shots = parse_list(shots, flags or "shots", int, "shot counts", "1,5")
    fix = (f": lower {flags}" if flags
           else ": the dataset is incomplete (python common.py check finds such classes)")
    if n_way < 2 or min(shots) < min_shot or n_query < 1:
        raise UserError(f"{n_way}-way {','.join(map(str, shots))}-shot episodes with {n_query} "
                        f"queries: use at least 2 ways, {min_shot} shot{'s' * (min_shot != 1)} "
                        f"and 1 query ({flags or 'fixed here'})")
    if n_way > len(split.classes):
        raise UserError(f"{n_way}-way episodes need {n_way} classes; "
                        f"{split.dataset} {split.split} has {len(split.classes)}{fix}")
    counts = torch.bincount(split.labels, minlength=len(split.classes))
    need = max(shots) + n_query
    if counts.min() < need:
        c = int(counts.argmin())
        raise UserError(f"{split.dataset} {split.split} class '{split.classes[c]}' has "
                        f"{int(counts[c])} images; {max(shots)}-shot episodes with {n_query} "
                        f"queries need {need}{fix}")
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
    """logits [E, N, Q, N] (query of class n scored against every class) -> accuracy per
    episode [E]."""
    target = torch.arange(logits.shape[1], device=logits.device).view(1, -1, 1)
    return (logits.argmax(-1) == target).float().mean(dim=(1, 2))


def protonet_logits(support, query):
    """Cosine nearest-centroid (ProtoNet's mean-support prototypes, scored by cosine rather than
    ProtoNet's squared Euclidean distance; SimpleShot without centring): [E, N, Q, N]."""
    protos = F.normalize(support.mean(2), dim=-1)  # [E, N, d]
    return torch.einsum("enqd,ecd->enqc", F.normalize(query, dim=-1), protos)


def protonet_accuracy(feats, index, k_shot, batch=500):
    """Per-episode cosine nearest-centroid accuracy [E] on precomputed features."""
    accs = [accuracy_from_logits(protonet_logits(*split_episodes(feats, index[i:i + batch],
                                                                 k_shot)))
            for i in range(0, len(index), batch)]
    return torch.cat(accs)


def class_centres(feats, labels, n_classes):
    """[C, d]: the normalised mean of each class's normalised features (the full-data
    class weight that the bridge and the reconstructor aim at)."""
    labels = labels.to(feats.device)
    means = torch.stack([F.normalize(feats[labels == c], dim=-1).mean(0) for c in range(n_classes)])
    return F.normalize(means, dim=-1)


def ci95(values):
    """Mean and 95% interval half-width (1.96 * std / sqrt(n)) of per-episode values."""
    v = torch.as_tensor(values, dtype=torch.float64)
    return v.mean().item(), ((1.96 * v.std(unbiased=True) / len(v) ** 0.5).item() if len(v) > 1
                             else 0.0)


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
    # a hash of the data (file list, pickles or toy recipe): feature caches key on it
    data_id: str = ""

    def __len__(self):
        return len(self.labels)

    def pil(self, i):
        """Image i at its native resolution, as a PIL image (what open_clip's preprocessing
        takes)."""
        from PIL import Image
        # (files are read even when decoded once: `images` holds them at the student's size)
        if self.paths is None:
            return Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        return read_image(self.paths[i], hint=f" (python common.py check --dataset {self.dataset} "
                                              f"--data-root ... reads every image)")

    def student_batch(self, idx):
        """uint8 [B, 3, size, size] for the student."""
        if self.images is not None and self.images.shape[-1] == self.size:
            return self.images[idx]
        from PIL import Image
        out = [torch.from_numpy(np.array(self.pil(int(i)).resize((self.size, self.size),
                                                                 Image.BILINEAR)))
               for i in idx]
        return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def read_image(path, draft=None, hint=""):
    """An image file as an RGB PIL image: the one way every reader opens one (the student's
    decoding into the store, the teacher, python common.py check). `draft` (check): decode a
    JPEG at reduced scale. Pillow's convert("RGB") clips 16-bit greyscale (a 16-bit PNG opens
    as I;16) at 255, which turns it white: it is scaled to 8 bits here, by its high byte, as
    Pillow itself reads 16-bit colour PNGs. Float pixels have no fixed range: refused."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if draft:
                im.draft("RGB", draft)
            if im.mode == "F":
                pixels = "32-bit float"
            elif im.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N; I: older Pillows' 16-bit PNG
                grey = np.asarray(im).astype(np.int64)
                if grey.size and (grey.min() < 0 or grey.max() > 65535):
                    pixels = "32-bit integer"
                else:
                    return Image.fromarray((grey >> 8).astype(np.uint8)).convert("RGB")
            else:
                return im.convert("RGB")
    except Exception as e:  # missing, not an image, truncated: name the file
        raise UserError(f"cannot read image {path} ({type(e).__name__}): "
                        f"replace or delete it{hint}")
    raise UserError(f"cannot read image {path} ({pixels} pixels, which have no 8-bit meaning): "
                    f"save it as an 8-bit or 16-bit image{hint}")


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
    per_class = toyworld.SCALES[name]["n_train" if split == "train" else "n_eval"]
    labels = torch.arange(len(classes)).repeat_interleave(per_class)

    def render(out):
        out[:] = toyworld.build_split(name, split, seed)[0].numpy()
    images = image_store(f"{name}-{split}-{recipe}", (len(labels), 3, toyworld.SIZE, toyworld.SIZE),
                         render)
    return Split(name, split, classes, labels, images=images, size=toyworld.SIZE, ids=list(classes),
                 data_id=recipe)


# The image store: <cache>/images/<key>.npy and beside it <key>.json, its record (key, shape,
# dtype and a hash of a few rows), written before the store is renamed into place and checked
# whenever the store is opened: a swapped, truncated or damaged store is built again, never used
# (val features once came from the test split's store). While a store is written it is a
# temporary file named like the checkpoint writer's, whose process holds a lock on it.

STORE_ROWS = 16               # rows hashed into the record (hashing all would take minutes)


def image_store(key, shape, fill):
    """Decode once: uint8 images of `shape` [N, 3, H, W] in <cache>/images/<key>.npy, written by
    the first call (fill(out) decodes or renders them into the memory-mapped array `out`) and
    memory-mapped from disk by every later one, so tiered-ImageNet need not fit in memory.
    A store that is not the one its record describes is built again (and says so)."""
    folder = os.path.join(cache_dir(), "images")
    path = os.path.join(folder, f"{key}.npy")
    remove_stale_temp_files([folder], folder, writers_lock=True)
    wrong = None
    if os.path.exists(path):
        images, wrong = open_store(path, key, shape)
        if wrong is None:
            return torch.from_numpy(images)
        print(f"the image store {path} {wrong}: building it again")
    write_store(path, key, shape, fill, remove_first=wrong is not None)
    return torch.from_numpy(np.load(path, mmap_mode="c"))  # "c": read on demand, never written


def store_record(key, images):
    """What identifies a store: its key, shape and dtype and the hashes of STORE_ROWS rows
    spread over it (the first and last included)."""
    n = len(images)
    rows = sorted({int(i) for i in np.linspace(0, n - 1, min(n, STORE_ROWS)).round()})
    return dict(key=key, shape=list(images.shape), dtype=str(images.dtype),
                rows={str(i): hashlib.sha256(np.ascontiguousarray(images[i])).hexdigest()[:16]
                      for i in rows})


def record_path(path):
    return os.path.splitext(path)[0] + ".json"


def open_store(path, key, shape):
    """(the store at `path`, memory-mapped, None) when it is the store of `key` and `shape` that
    its record describes, else (None, what is wrong with it)."""
    if not os.path.isfile(path):  # a FIFO, say, which would be read forever
        return None, "is not a regular file"
    if not os.path.isfile(record_path(path)):
        return None, "has no record (written by an older version, or its record was lost)"
    try:
        with open(record_path(path), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None, "has no readable record (damaged)"
    try:
        images = np.load(path, mmap_mode="c")
    except Exception as e:  # empty, truncated, random bytes, not a .npy at all
        return None, f"is damaged ({type(e).__name__})"
    if images.dtype != np.uint8 or images.shape != tuple(shape):
        return None, (f"holds {images.dtype} images of shape {list(images.shape)}, "
                      f"not uint8 {list(shape)}")
    if not isinstance(record, dict) or record.get("key") != key:
        return None, "has the record of another store (was the pair renamed?)"
    if record != store_record(key, images):
        return None, "does not hold the images its record describes (replaced or changed since)"
    return images, None


def write_store(path, key, shape, fill, remove_first=False):
    """Write a store: create its temporary file, locked while it is written, and reserve its
    space on disk first, so that a full disk is an OSError here and not a SIGBUS (which kills the
    process without a word) when a page of the memory map is first written; then fill it, write
    its record and rename it into place. Whatever stops it leaves no temporary file.
    `remove_first`: the store there was found wrong, and its space may be needed."""
    import fcntl
    cache_folder("images")
    tmp = temp_path(path)
    try:
        if remove_first:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        with open(tmp, "wb") as f:
            with contextlib.suppress(OSError):  # a file system without locks: the pid tells
                fcntl.flock(f, fcntl.LOCK_EX)
            header = {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
            np.lib.format.write_array_header_1_0(f, header)
            reserve(f, f.tell() + math.prod(shape))
            out = np.lib.format.open_memmap(tmp, mode="r+")
            fill(out)
            out.flush()
            record = store_record(key, out)
            del out
            atomic_write_text(json.dumps(record), record_path(path))
            os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C included
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError):
            full = (" (the disk is full: free some space there, or set SYNTRANS_CACHE to a folder "
                    "on another disk)" if e.errno == errno.ENOSPC else "")
            raise UserError(f"cannot write the image store {path}: {e.strerror or e}{full}; "
                            f"no temporary file was left") from None
        raise


def reserve(f, size):
    """Allocate the first `size` bytes of the open file `f` on disk now (a full disk: OSError)."""
    f.flush()
    try:
        os.posix_fallocate(f.fileno(), 0, size)
        return
    except AttributeError:  # macOS has no posix_fallocate
        pass
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # ENOSPC, EIO, ...
            raise
    f.seek(0, os.SEEK_END)  # a file system that cannot: the zeros are written
    for left in range(size - f.tell(), 0, -(1 << 24)):
        f.write(bytes(min(left, 1 << 24)))
    f.flush()


def _locked(path):
    """Whether a live process holds the lock on `path` (write_store holds its temporary file's)."""
    import fcntl
    try:
        with open(path, "rb+") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when f is closed
    except BlockingIOError:
        return True
    except OSError:  # gone already, or no locks on this file system: the pid decides
        pass
    return False


def decode_once(split, workers=None):
    """A split of image files with its images decoded once, at the student's size, into the
    image store (keyed by the split's file list); every later pass reads the store. Files are
    decoded by DataLoader workers; the teacher still reads the files (at its own resolution)."""
    if split.paths is None or split.images is not None:
        return split
    from tqdm import tqdm

    def decode(out):
        n_workers = (min(8, os.cpu_count() or 1) if workers is None and len(split) >= 1000
                     else (workers or 0))
        # its own generator: the global RNG is untouched
        loader = torch.utils.data.DataLoader(StudentImages(split), batch_size=64,
                                             num_workers=n_workers, generator=torch.Generator())
        for images, _, idx in tqdm(loader, desc=f"decoding {split.dataset} {split.split} once",
                                   leave=False, disable=len(split) < 1000):
            out[idx.numpy()] = images.numpy()
    shape = (len(split), 3, split.size, split.size)
    split.images = image_store(f"{split.dataset}-{split.split}-{split.size}px-{split.data_id}",
                               shape, decode)
    return split


def files_id(paths, *extra):
    """A short hash of a file list (paths, sizes, modification times) and `extra`: another copy
    of a dataset, or the same one changed, gets another id (without reading every file).
    Every loader makes its file list with it, so each file is vetted here (data_file).
    Computed once per split and cached (files_id_cached): tiered-ImageNet has 779k files."""
    return files_id_cached(paths, extra, lambda: _files_id(paths, *extra))


def _files_id(paths, *extra):
    h = hashlib.sha256(repr(extra).encode())
    for path in paths:
        st = data_file(path)
        h.update(f"{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


_FILES_IDS = {}  # this process's ids: (list key, folder stamps) -> id


def files_id_cached(paths, extra, compute):
    """compute() (every file stat'ed and vetted) once per file list, then kept in this process
    and in <cache>/files/<hash of the list>.json, keyed by the folders' own modification times
    (one stat per class folder, not per file): adding, removing, renaming or replacing a file
    changes its folder's time, so the list is vetted again. A file rewritten in place, which
    leaves its folder alone, is not seen: delete <cache>/files/ after editing images in place.
    A folder changed in the last 2 s is not trusted (its time may not have moved yet)."""
    import time
    paths = [os.path.abspath(p) for p in paths]
    h = hashlib.sha256(repr(extra).encode())
    for path in paths:
        h.update(path.encode("utf-8", "surrogateescape") + b"\n")
    key = h.hexdigest()[:24]
    try:
        stamps = {d: os.stat(d).st_mtime_ns for d in sorted({os.path.dirname(p) for p in paths})}
    except OSError:
        return compute()  # a folder gone: the full pass names the file
    fresh = all(time.time_ns() - t > 2e9 for t in stamps.values())
    memo = (key, tuple(stamps.items()))
    if fresh and memo in _FILES_IDS:
        return _FILES_IDS[memo]
    path = os.path.join(cache_dir(), "files", f"{key}.json")
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        if fresh and rec["folders"] == {shown(d): t for d, t in stamps.items()}:
            _FILES_IDS[memo] = rec["id"]
            return rec["id"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: computed again
    ident = compute()
    if fresh:
        _FILES_IDS[memo] = ident
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(json.dumps({"id": ident, "folders": {shown(d): t for d, t in
                                                                   stamps.items()}}), path)
    return ident


def shown(path):
    """A path as a message can print it: bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def data_file(path):
    """os.stat of a data file, which must be a regular file with a UTF-8 name: anything else is
    refused in one line before it is opened (opening a FIFO waits forever for a writer, and a
    name that is not UTF-8 cannot be written into the run's records)."""
    import stat
    if shown(path) != path:  # (os.listdir gives bytes that are not UTF-8 as surrogates)
        raise UserError(f"the file name {shown(path)} is not UTF-8: rename it (or its folder)")
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            problem = "is a symbolic link loop"
        elif os.path.islink(path) and e.errno == errno.ENOENT:
            problem = f"is a symbolic link to {shown(os.readlink(path))}, which does not exist"
        else:
            problem = f"cannot be read ({e.strerror})"
        raise UserError(f"{shown(path)} {problem}: replace or delete it") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else
                "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        raise UserError(f"{shown(path)} is {kind}, not a file: a data file must be a regular file; "
                        f"move it away")
    return st


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
           "mini-imagenet": f"a folder with images/ and train.csv, val.csv, test.csv (Ravi layout) "
                            f"or {_FOLDERS}"}


def split_classes(dataset, split):
    """[(id, readable name), ...] of one split, in label order."""
    path = os.path.join(SPLIT_DIR, dataset, f"{split}.tsv")
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()][1:]  # [1:]: the header
    for row in rows:
        if len(row) < 2 or not row[1].strip():
            raise UserError(f"class {row[0]} has no readable name in {path}: "
                            f"add it (a second, tab-separated column)")
    return [(row[0], row[1]) for row in rows]


def _data_root(dataset, root):
    if not root or not os.path.isdir(root):
        problem = f"--data-root {root} is not a folder" if root else "no --data-root given"
        raise UserError(f"{problem}: {dataset} needs {LAYOUTS[dataset]}")
    return root


def _make_split(dataset, split, classes, labels, where, **data):
    """The Split, once every class of the split is known to have at least one image."""
    if len(classes) < 2:  # one base class "trains" at loss 0; an episode compares 2 or more
        n = len(classes)
        raise UserError(f"{dataset} {split} has {n} class{'es' * (n != 1)} in {where}: "
                        f"a split needs at least 2 (add class folders)")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    counts = torch.bincount(labels, minlength=len(classes))
    if (counts == 0).any():
        cid, name = classes[int(torch.nonzero(counts == 0)[0])]
        raise UserError(f"{dataset} {split} class {cid} ({name}) has no images in {where}: "
                        f"the dataset is incomplete")
    return Split(dataset, split, [n for _, n in classes], labels, ids=[c for c, _ in classes],
                 **data)


class _CifarUnpickler(pickle.Unpickler):
    """A pickle reader that admits only what the official CIFAR-100 files hold: dicts, lists,
    bytes, str, ints and numpy arrays. Any other global (os.system, eval, ...) is refused
    before it can run: a dataset folder is data, never code."""
    ALLOWED = {(m, n) for core in ("numpy.core", "numpy._core") for m, n in [
        (f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
        (f"{core}.numeric", "_frombuffer")]}
    # encode: bytes in protocol 2
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks to run {module}.{name}, "
                                         f"which no CIFAR-100 file holds")
        return super().find_class(module, name)


def read_cifar100(root):
    """CIFAR-100 train + test from the 'python version' pickles, read with our own few lines
    (torchvision's reader verifies checksums) and a restricted unpickler:
    (uint8 images [N,3,32,32], fine labels [N], fine names)."""
    parts = []
    for name in ("meta", "train", "test"):
        path = os.path.join(root, "cifar-100-python", name)
        if os.path.lexists(path):
            data_file(path)  # a FIFO would be opened and wait forever
        try:  # the official files hold a dict with bytes keys (b"data", b"fine_labels", ...)
            with open(path, "rb") as f:
                d = {k.decode() if isinstance(k, bytes) else k: v
                     for k, v in _CifarUnpickler(f, encoding="bytes").load().items()}
            if name == "meta":
                names = [n.decode() if isinstance(n, bytes) else n for n in d["fine_label_names"]]
            else:  # "data": a row of 3072 bytes per image, its red, green and blue 32x32 planes
                pixels = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                parts.append((torch.from_numpy(pixels),
                              torch.as_tensor(d["fine_labels"], dtype=torch.int64)))
        except FileNotFoundError:
            raise UserError(f"{path} not found: --data-root should be {_CIFAR}")
        except Exception as e:  # not a pickle, truncated, another dict...
            raise UserError(f"{path} is not a CIFAR-100 python-version pickle "
                            f"({type(e).__name__}: {e}): "
                            f"delete cifar-100-python/ and fetch it again (--download)")
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), names


def _cifar(dataset, split, root, size=None):
    """cifar-fs (64/16/20 classes) and fc100 (60/20/20, by superclass): all 600 images of a
    class, 32x32."""
    images, fine, names = read_cifar100(_data_root(dataset, root))
    data_id = files_id([os.path.join(root, "cifar-100-python", n)
                        for n in ("meta", "train", "test")], dataset, split)
    classes = split_classes(dataset, split)
    index = {cid: c for c, (cid, _) in enumerate(classes)}
    labels = torch.tensor([index.get(n, -1) for n in names])[fine]  # -1: a class of another split
    keep = labels >= 0
    return _make_split(dataset, split, classes, labels[keep],
                       os.path.join(root, "cifar-100-python"),
                       images=images[keep], size=32, data_id=data_id)


def _ravi(dataset, split, root, index):
    """Ravi & Larochelle's layout: images/<file> plus <split>.csv rows 'filename,label'
    (label = wnid)."""
    import csv
    path = os.path.join(root, f"{split}.csv")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --data-root should be {LAYOUTS[dataset]}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if row]
    if not rows or rows[0][1] != ["filename", "label"]:
        raise UserError(f"{path} does not start with the header 'filename,label' "
                        f"of the Ravi split files")
    present = set(os.listdir(os.path.join(root, "images")))
    for n, row in rows[1:]:
        if len(row) != 2 or row[1] not in index:
            raise UserError(f"{path} line {n}: {','.join(row)!r} does not name one of the "
                            f"{len(index)} {dataset} {split} wnids "
                            f"(data/splits/{dataset}/{split}.tsv)")
        if row[0] not in present:
            raise UserError(f"{os.path.join(root, 'images', row[0])} "
                            f"(listed in {path} line {n}) not found")
    return ([os.path.join(root, "images", r[0]) for _, r in rows[1:]],
            [index[r[1]] for _, r in rows[1:]], path)


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
            raise UserError(f"unknown class folder {sub}: not one of the {len(index)} "
                            f"{dataset} {split} wnids (data/splits/{dataset}/{split}.tsv)")
        files = sorted(
f for f in os.listdir(sub) if os.path.splitext(f)[1].lower() in IMAGE_EXTS)
        paths += [os.path.join(sub, f) for f in files]
        labels += [index[wnid]] * len(files)
    return paths, labels, folder


def _imagenet(dataset, split, root, size=None):
    """mini-imagenet (Ravi or folder layout) and tiered-imagenet (folder layout): image files
    read on demand, resized to 84x84 for the student."""
    root, classes = _data_root(dataset, root), split_classes(dataset, split)
    index = {wnid: c for c, (wnid, _) in enumerate(classes)}
    # else the folder layout
    ravi = dataset == "mini-imagenet" and os.path.isdir(os.path.join(root, "images"))
    paths, labels, where = (_ravi if ravi else _folders)(dataset, split, root, index)
    return _make_split(dataset, split, classes, labels, where, paths=paths, size=84,
                       data_id=files_id(paths, labels))


def folder_classes(root, split):
    """Your own dataset: [(folder, readable name), ...] of root/<split>/<class>/, sorted by folder
    (torchvision's ImageFolder order). Names come from root/classes.tsv ('folder<TAB>name' lines)
    when it names the folder, else from the folder name with '_' and '-' read as spaces.
    All three splits are read, so that a class named twice is refused whichever is loaded."""
    return _folder_splits(_data_root("folder", root))[split]


def _classes_tsv(root):
    """root/classes.tsv as {folder: readable name} ({} when there is none)."""
    tsv = os.path.join(root, "classes.tsv")
    if not os.path.isfile(tsv):
        return {}
    try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first folder
        with open(tsv, encoding="utf-8-sig") as f:
            lines = f.read().split("\n")  # (text mode reads \r\n as \n)
    except UnicodeDecodeError as e:
        raise UserError(f"{tsv} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                        f"{e.start}): save it as UTF-8") from None
    names = {}
    for n, line in enumerate(lines, start=1):
        row = line.split("\t")
        if len(row) > 2:  # a tab inside a name, or a third column: which is the name is a guess
            raise UserError(f"{tsv} line {n} has {len(row)} tab-separated columns: write "
                            f"'folder<TAB>readable name', with no tab inside the name")
        if len(row) == 2 and line.strip():
            names[row[0]] = row[1].strip()
    return names


def _folder_splits(root):
    """{split: [(folder, readable name), ...]} of a folder dataset, refused in one line where a
    class has no usable name, or shares a folder or a name with another: two such classes would
    get the same semantic vector (or the same class would be base and novel at once)."""
    names, tsv, out = _classes_tsv(root), os.path.join(root, "classes.tsv"), {}
    seen_folder, seen_name = {}, {}
    for split in SPLITS:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UserError(f"{folder} not found: --data-root should be {LAYOUTS['folder']}")
        subs = sorted(d for d in os.listdir(folder)
                      if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
        out[split] = []
        for d in subs:
            where = f"{split}/{d}"
            if shown(d) != d:  # not UTF-8 (see data_file)
                raise UserError(f"the class folder {shown(os.path.join(folder, d))} is not UTF-8: "
                                f"rename it")
            name = names.get(d) or " ".join(d.replace("_", " ").replace("-", " ").split())
            if not name:
                raise UserError(f"the class folder {os.path.join(folder, d)} has no readable name: "
                                f"add a line '{d}<TAB>readable name' to {tsv}")
            if d in seen_folder:
                raise UserError(f"the class folder {d} is in both {seen_folder[d]}/ and {split}/: "
                                f"a class belongs to one split (base, val or novel classes)")
            key = " ".join(name.lower().split())  # CLIP's tokenizer reads 'Red  Fox' as 'red fox'
            if key in seen_name:
                raise UserError(f"the classes {seen_name[key]} and {where} have the same readable "
                                f"name '{name}': give one of them another name in {tsv}")
            seen_folder[d], seen_name[key] = split, where
            out[split].append((d, name))
    return out


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

# teacher -> the toy web set it learns from
TOY_TEACHERS = {"toy-clip": "toy", "toy-clip-tiny": "toy-tiny"}


def cache_dir():
    """$SYNTRANS_CACHE, or ~/.cache/syntrans when it is unset or empty (as XDG_CACHE_HOME is
    read: an empty value would put the cache in whatever folder a stage is run from)."""
    home = os.path.join(os.path.expanduser("~"), ".cache", "syntrans")
    return os.environ.get("SYNTRANS_CACHE") or home


def cache_folder(*parts):
    """<cache>/<parts>, made if missing, before anything is written there: a cache folder that
    cannot be written (HOME=/dev/null, read-only, a file) is one line saying what to set, and
    nothing is made in it."""
    root = cache_dir()
    folder = os.path.join(root, *parts)
    try:
        writable_part(folder, os.path.lexists)  # (a dangling link there: not a folder)
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        unset = "" if os.environ.get("SYNTRANS_CACHE") else " (unset, it is ~/.cache/syntrans)"
        raise UserError(f"cannot write the cache folder {root} ({e.strerror}): set SYNTRANS_CACHE "
                        f"to a folder you can write to{unset}") from None
    return folder


RANDOM = "random"  # --clip-pretrained random: an untrained CLIP, only when asked for (smoke tests)


def check_teacher(args):
    """Refuse, before any work, a teacher that would silently spoil a run: the toy teacher on
    real data, or an open_clip model without weights. Returns the teacher's identity."""
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{args.dataset}': choose one of {', '.join(DATASETS)}")
    if args.clip in TOY_TEACHERS and not args.dataset.startswith("toy"):
        raise UserError(f"{args.dataset} needs a real CLIP teacher, not the toy world's "
                        f"{args.clip}: pass --clip ViT-B-32 "
                        f"--clip-pretrained openai (or a weights file)")
    return teacher_identity(args.clip, args.clip_pretrained)


def toy_teacher_file(name):
    """Where the stand-in teacher `name` is cached; the file name records its recipe (renderer,
    captions, config, sizes), so a changed toy world never reuses a teacher trained on the old
    one."""
    import toyworld
    return os.path.join(cache_dir(), f"{name}-{toyworld.teacher_recipe(TOY_TEACHERS[name])}.pt")


def teacher_identity(name, pretrained):
    """What names a teacher in checkpoints and cache keys, without building it: the model,
    its tag or file (by content), and QuickGELU when its weights were trained with it.
    Refuses an unknown model, tag or file, and a missing --clip-pretrained (random weights)."""
    if name in TOY_TEACHERS:
        # (without one, the stand-in is trained once)
        if pretrained and not os.path.exists(pretrained):
            raise UserError(f"--clip-pretrained '{pretrained}' is neither a file nor an open_clip "
                            f"tag of toy-clip (tags: none)")
        pretrained = pretrained or toy_teacher_file(name)
        arch = "toy-clip"
    else:
        import open_clip
        arch = name
        if name not in open_clip.list_models():
            raise UserError(f"unknown teacher '{name}': choose toy-clip, toy-clip-tiny or an "
                            f"open_clip model such as ViT-B-32, RN50, ViT-B-16 "
                            f"(open_clip.list_models() has all)")
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained is None:
            raise UserError(f"--clip {name} without --clip-pretrained is a CLIP with random "
                            f"weights: pass --clip-pretrained "
                            f"{'openai' if 'openai' in tags else (tags or ['FILE'])[0]} or a "
                            f"weights file (--clip-pretrained {RANDOM} only for a smoke test)")
        if pretrained != RANDOM and not os.path.exists(pretrained) and pretrained not in tags:
            raise UserError(f"--clip-pretrained '{pretrained}' is neither a file nor an open_clip "
                            f"tag of {name} (tags: {', '.join(tags) or 'none'})")
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
    """OpenAI's own downloads (ViT-B-32.pt, ...) are TorchScript archives: a zip with code/ and
    constants.pkl."""
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
            if not given:
                cache_folder()  # one that cannot be written: refused before the training
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
        # truncated, empty, random bytes, another model's weights
        if weights and os.path.isfile(weights):
            again = "pass a good weights file" if given else "it is trained again on the next run"
            raise UserError(f"{weights} is not a readable weights file of {arch} "
                            f"({type(e).__name__}): delete it ({again})") from None
        if isinstance(e, RuntimeError) and "download" in str(e).lower():
            raise UserError(f"could not fetch the weights of {arch}/{pretrained} (offline?): "
                            f"download them once on a connected machine "
                            f"and pass the file with --clip-pretrained")
        raise
    if jit:  # OpenAI's TorchScript file: its state dict has open_clip's names, plus three constants
        state = torch.jit.load(pretrained, map_location="cpu").state_dict()
        # e.g. the text attn_mask
        unsaved = {n for n, _ in model.named_buffers()} - set(model.state_dict())
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
              f"{ident['pretrained']}, QuickGELU)" if ident.get("quick_gelu") else
              f"{ident['pretrained']}, "
              f"GELU: if these are OpenAI's weights, name the model {name}-quickgelu)"))
    return model, preprocess, open_clip.get_tokenizer(arch), ident


# ----------------------------------------------------------------------------------
# 5. Features of a whole split, computed once and cached in the run folder. The key
#    records what produced them, so a changed model or dataset never reuses them.

@torch.no_grad()
def extract(fn, split, batch_fn, device, batch=256, desc="features"):
    from tqdm import tqdm
    feats = []
    for i in tqdm(range(0, len(split), batch), desc=desc, leave=False,
                  disable=len(split) <= 4 * batch):
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
        workers = (min(8, os.cpu_count() or 1) if split.paths is not None and len(split) >= 500
                   else 0)
        # its own generator: the global RNG is untouched
        loader = torch.utils.data.DataLoader(TeacherImages(split, p), batch_size=256,
                                             num_workers=workers, generator=torch.Generator())
        with torch.no_grad():
            feats = [m.encode_image(x.to(device)).float().cpu()
                     for x in tqdm(loader, desc=f"teacher {split.split}", leave=False,
                                   disable=len(split) <= 1024)]
        return F.normalize(torch.cat(feats), dim=-1)
    key = dict(kind="teacher", teacher=ident, dataset=split.dataset, split=split.split,
               n=len(split), data=split.data_id)
    return cached_features(run, key, compute)


def student_features(run, student, student_id, split, device):
    """Student features (before any head) of every image of a split, cached."""
    student.eval()

    def compute():
        return extract(student, split,
                       lambda idx: to_student_input(split.student_batch(list(idx)), device),
                       device, desc=f"student {split.split}")
    key = dict(kind="student", student=student_id, dataset=split.dataset, split=split.split,
               n=len(split), data=split.data_id)
    return cached_features(run, key, compute)


# ----------------------------------------------------------------------------------
# 6. Running a stage: a one-line error for a user's mistake, Ctrl-C and SIGTERM, the
#    device, the seed and the flags every stage takes

class UserError(Exception):
    """A mistake in the input (a path, a flag, a missing stage) rather than a bug:
    reported as one line that says what to do, without a traceback."""


_interrupt_hint = None  # set by on_interrupt(): what to say when the user presses Ctrl-C
INTERRUPTED = ("files are written whole or not at all, so nothing half-written was left; "
               "rerun the command")


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
    (`cmd &` in a script, nohup). Printing that fails (see _Stdout) never stops the work:
    it is one line and exit code 2 once the stage has finished."""
    on_interrupt(None)
    before = {s: signal.signal(s, h) for s, h in [(signal.SIGINT, signal.default_int_handler),
                                                   (signal.SIGTERM, _terminate)]}
    given = sys.stdout
    stdout = sys.stdout = _Stdout(given or io.StringIO())  # (None: started with stdout closed)
    try:
        try:
            main()
        finally:  # what is still buffered is printed now, where a failure can be told
            stdout.flush()
            sys.stdout = given
    except UserError as e:
        msg = str(e).strip()
        # re-raised from a DataLoader worker: "Caught UserError in ...\n<traceback>"
        if "\n" in msg:
            msg = msg.splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        hint = _interrupt_hint() if callable(_interrupt_hint) else _interrupt_hint
        print(f"interrupted: {hint or INTERRUPTED}", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except SystemExit as e:  # --help, or argparse's own one-line error
        if stdout.failed is None or e.code not in (0, None):
            raise
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    if stdout.failed is not None:
        print(f"error: {stdout.problem()}", file=sys.stderr)
        sys.exit(2)


class _Stdout:
    """sys.stdout while a stage runs. Printing can fail where the work did not: stdout on a
    full disk (or /dev/full), a closed pipe, or an encoding (PYTHONIOENCODING=ascii) without
    a character of stage 5's table. The first failure is kept for run_main to report when
    the stage has finished; the text goes on with such characters escaped (\\xb1), or, when
    stdout cannot be written at all, is dropped: a failed print never costs a run its files."""

    def __init__(self, stream):
        self.stream, self.failed, self.lost = stream, None, False

    def write(self, text):
        if not self.lost:
            try:
                return self.stream.write(text)
            except UnicodeEncodeError as e:
                self.failed = self.failed or e
                try:
                    self.stream.reconfigure(errors="backslashreplace")
                    return self.stream.write(text)
                except (AttributeError, OSError) as again:  # no reconfigure; or see below
                    self._lose(again)
            except OSError as e:
                self._lose(e)
        return len(text)

    def flush(self):
        if not self.lost:
            try:
                self.stream.flush()
            except OSError as e:
                self._lose(e)

    def _lose(self, e):
        self.failed, self.lost = self.failed or e, True
        # Python flushes stdout again at exit (a second error, and exit code 120): into nothing
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def problem(self):
        """The one line run_main reports."""
        e, done = self.failed, "the command ran to the end and its files are written"
        if isinstance(e, UnicodeEncodeError):
            shown = "what it printed is lost" if self.lost else "it was printed escaped"
            return (f"stdout's encoding {e.encoding} cannot show {ascii(e.object[e.start:e.end])} "
                    f"({shown}): set PYTHONIOENCODING=utf-8 to see it; {done}")
        return f"cannot print to stdout ({e.strerror or e}): what it printed is lost, but {done}"

    def __getattr__(self, name):  # encoding, isatty, fileno, ...: those of the stream
        return getattr(self.stream, name)


def get_device(name=None):
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device: "
                        f"use cpu or cuda (cuda:N for GPU N)") from None
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device {name}, but torch sees {torch.cuda.device_count()} usable "
                        f"CUDA GPU(s) here (no driver, or another index): "
                        f"use --device cpu or omit --device")
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
    flag(p, "--run", default="runs/toy",
         help="run folder: every stage reads and writes its files here")
    flag(p, "--dataset", default="toy", help=f"one of {', '.join(DATASETS)}")
    flag(p, "--data-root", default=None,
         help="folder of the real dataset (unused for the toy world)")
    flag(p, "--image-size", type=int, default=84,
         help="the student's input size for --dataset folder")
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
    cache = os.path.join(args.run, "cache")
    remove_stale_temp_files([args.run, cache, os.path.join(cache, "llm")], args.run)
    device = get_device(args.device)
    set_seed(args.seed)
    gpu_settings(args, device)
    return args, device


def gpu_settings(args, device):
    """On CUDA: cuDNN picks its fastest convolution for our fixed shapes (cudnn.benchmark) and
    --amp (when a stage has it) defaults to on; on a CPU nothing changes and --amp to off."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if getattr(args, "amp", False) is None:
        args.amp = device.type == "cuda"


def amp_flag(p):
    """--amp / --no-amp: bf16 autocast of the student's forward pass (default: on for CUDA, off
    on a CPU, where results stay bit-identical to the float32 code)."""
    flag(p, "--amp", action=argparse.BooleanOptionalAction, default=None,
         help="bf16 mixed precision (autocast); default on for CUDA, off on a CPU")


def autocast(device, amp):
    """The mixed-precision context of --amp: bf16 autocast on `device`, or nothing at all."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def check_range(name, value, interval):
    """`value` of flag `name` lies in `interval` ("[0, 1)": closed below, open above)."""
    if value is None:  # a flag left at its default None (chosen later, e.g. --block-size)
        return
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = lo < value if interval[0] == "(" else lo <= value
    if not (above and (value < hi if interval[-1] == ")" else value <= hi)):
        raise UserError(f"--{name.replace('_', '-')} {value} is out of range: "
                        f"use a value in {interval}")


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
    raise UserError(f"loss became {value} at {where} (last finite loss {before}): "
                    f"lower --lr; {kept}")


NAN_CHECK_EVERY = 50  # steps between two looks at the loss (each one waits for the GPU)


class LossWatch:
    """The NaN check without a host sync per step: step() keeps the loss on its device and
    every `every` steps (and at flush(), the end of an epoch) one transfer reads them all;
    the first that is not finite stops the stage with check_finite's one-line message, naming
    its own step (`kept`: check_finite's, or a function giving it). On a GPU the host thus runs
    up to `every` steps ahead (the optimiser steps a NaN takes change nothing kept: no
    checkpoint is written before the look at the epoch's end). `log`: a Log that gets
    one record per look (the mean loss since the last one, and `fields` of the last step)."""

    def __init__(self, every=NAN_CHECK_EVERY, kept=None, log=None, last=None):
        self.every, self.kept, self.log, self.last = every, kept, log, last
        self.losses, self.wheres, self.fields = [], [], {}

    def step(self, loss, where, bar=None, **fields):
        self.losses.append(loss.detach().float())
        self.wheres.append(where)
        self.fields = fields
        if len(self.losses) >= self.every:
            self.flush(bar)

    def flush(self, bar=None):
        """Look at the losses kept since the last look; returns the last finite loss."""
        if not self.losses:
            return self.last
        values = torch.stack(self.losses).tolist()  # the one sync
        for value, where in zip(values, self.wheres):
            kept = self.kept() if callable(self.kept) else self.kept
            self.last = check_finite(torch.tensor(value), where, self.last, kept)
        if self.log is not None and self.fields:
            self.log.write(**self.fields, loss=sum(values) / len(values))
        self.losses, self.wheres = [], []
        if bar is not None:
            bar.set_postfix(loss=f"{self.last:.3f}")
        return self.last


class Log:
    """<run>/<name>_log.jsonl, one JSON record a line, written (and flushed) as a stage trains:
    `name` is the stage's output file without .pt (01_student, 04_classifier_shuffled, ...),
    so the runs of one stage into one folder keep a log each. Every record gets `seconds`
    since the log opened and, when it has `images` (images so far), `img_s`. A new run
    starts the file again at its first record; append=True (a resumed run) adds to it.
    plot.py draws them."""

    def __init__(self, run, name, append=False):
        import time
        self.path = os.path.join(run, f"{os.path.splitext(os.path.basename(name))[0]}_log.jsonl")
        self.t0, self.clock, self.mode = time.time(), time.time, "a" if append else "w"

    def write(self, **record):
        seconds = self.clock() - self.t0
        rec = {**record, "seconds": round(seconds, 3)}
        if "images" in record:
            rec["img_s"] = round(record["images"] / max(seconds, 1e-9), 1)
        # the file is started by the first record: a stage stopped before it leaves none.
        # A log that cannot be written (a full disk) does not stop training: the checkpoint
        # that follows says so in one line, or is written.
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, self.mode, encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            self.mode = "a"
        except OSError:
            if self.mode == "w":  # not even the first record: leave no empty file
                with contextlib.suppress(OSError):
                    os.remove(self.path)


def read_log(path):
    """The records of a log file (a line cut short by a killed run is left out)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


class EpochBatches(torch.utils.data.Sampler):
    """The batches of one epoch: a permutation seeded by `seed_fn(epoch)`, exactly the one a
    DataLoader(shuffle=True, generator=Generator().manual_seed(seed_fn(epoch))) draws (its one
    base-seed draw first), so one DataLoader with persistent workers serves every epoch."""

    def __init__(self, n, batch_size, seed_fn):
        self.n, self.batch_size, self.seed_fn, self.epoch = n, batch_size, seed_fn, 0

    def __len__(self):
        return self.n // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed_fn(self.epoch))
        torch.empty((), dtype=torch.int64).random_(generator=g)  # DataLoader's base-seed draw
        order = torch.randperm(self.n, generator=g).tolist()
        for i in range(len(self)):
            yield order[i * self.batch_size:(i + 1) * self.batch_size]


class EpochLoader:
    """Stage 1's data: one DataLoader for all epochs (workers started once and kept, pinned
    memory for a fast copy to the GPU), epoch(e) giving epoch e's shuffled, full batches."""

    def __init__(self, dataset, batch_size, workers, device, seed_fn):
        self.batches = EpochBatches(len(dataset), batch_size, seed_fn)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.batches, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.type == "cuda",
            generator=torch.Generator())  # its own: the global RNG is untouched

    def epoch(self, e):
        self.batches.epoch = e
        return self.loader


def cosine_schedule(opt, steps):
    """The learning rate decays from its value to 0 along half a cosine over `steps` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))


def mlp(d_in, d_hidden, d_out, dropout=None):
    """Linear, LeakyReLU(0.1), (Dropout), Linear: the small maps of stages 3 and 4."""
    drop = [] if dropout is None else [nn.Dropout(dropout)]
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LeakyReLU(0.1), *drop,
                         nn.Linear(d_hidden, d_out))


def stage_module(name):
    """Another stage's module ("03_bridge"): its classes load the weights that stage wrote.
    (A file name that starts with a digit cannot be imported with `import`.)"""
    return importlib.import_module(name)


# ----------------------------------------------------------------------------------
# 7. Checkpoints: written whole or not at all, and loaded with the record of what made them

def open_regular(path, hint):
    """open(path, "rb"), refusing in one line (ending in `hint`) anything that is not a regular
    file: reading a FIFO waits for a writer forever, and a folder or device is never meant."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")
        raise UserError(f"{path} is {kind}, not a file: {hint}")
    os.set_blocking(fd, True)
    return open(fd, "rb")


def content_id(data):
    """A short hash of bytes: identifies the exact upstream checkpoint a stage was built on."""
    return hashlib.sha256(data).hexdigest()[:16]


def file_id(path):
    """content_id of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open_regular(path, "pass a file") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# The writer's temporary files: TEMP<pid>.<name> beside the file (a rename is atomic only within
# one file system). The prefix is this project's own, so that remove_stale_temp_files removes
# only what a killed run of ours left, never a file of the user's that merely looks temporary.
TEMP = ".syntrans-tmp"


def temp_path(path):
    """Where `path` is written before it is renamed into place."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{TEMP}{os.getpid()}.{name}")


def write_files(files):
    """Write {path: bytes} as one step: each file to a temporary file, then all renamed. A
    crash never leaves half a file; a failed write (disk full, read-only folder, a folder of
    that name) changes none of them, leaves no temporary file and is one line. Several files
    (02_semantics.pt and 02_descriptions.json, results.json and results.md) always describe
    the same run: every target is checked before the first rename, Ctrl-C and SIGTERM wait
    until all are renamed, and another run's renames until ours are done."""
    tmps = {path: temp_path(path) for path in files}
    path, done = None, []
    try:
        for path, data in files.items():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(tmps[path], "wb") as f:
                f.write(data)
        path = None
        with _one_step(files):
            for path in files:  # what would refuse a rename, before the first one
                if os.path.isdir(path) and not os.path.islink(path):
                    raise IsADirectoryError(errno.EISDIR, "a folder has that name (move it away)")
            for path in files:
                os.replace(tmps[path], path)
                done.append(path)
    except BaseException as e:  # Ctrl-C included: no temp file is left behind
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        if isinstance(e, OSError):
            full = " (the disk is full: free some space)" if e.errno == errno.ENOSPC else ""
            kept = (f"only {', '.join(done)} was replaced: rerun the command" if done
                    else "nothing was changed there")
            raise UserError(f"cannot write {path or ', '.join(files)}: {e.strerror or e}{full}; "
                            f"{kept}") from None
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
    before = {s: signal.signal(s, lambda n, _: pending.append(n))
              for s in (signal.SIGINT, signal.SIGTERM)}
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
    write_files({path: checkpoint_bytes(obj),
                 **{p: t.encode("utf-8") for p, t in (together or {}).items()}})


def atomic_write_text(text, path):
    write_files({path: text.encode("utf-8")})


def save_checkpoint(path, stage, config, dataset, classes, state, upstream=None, together=None,
                    **extra):
    """Every checkpoint is a plain dict of tensors, numbers and strings, so that it
    loads with torch.load(weights_only=True). It records what made it: the stage,
    its config, the dataset and class names per split, and the upstream checkpoints
    (name -> content id) it was built on, so that the next stage can refuse a mismatch.
    `together` ({path: text}): files that describe the same run, written in the same step."""
    ckpt = dict(format=FORMAT_VERSION, stage=stage, config=config, dataset=dataset,
                classes=classes, state=state, upstream=upstream or {}, **extra)
    atomic_save(ckpt, path, together)


def load_checkpoint(path, stage, hint):
    """Load a checkpoint written by `stage`; `hint` says how to make it when missing. Its
    bytes are read once: the id recorded downstream is that of the content loaded, even when
    the file is replaced meanwhile. A record that this code cannot read (another format or
    stage, a hand-edited structure, NaN or infinite values) is refused in one line."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: {hint}")
    try:
        with open_regular(path, hint) as f:
            data = f.read()
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); "
                        f"delete it and {hint}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} has checkpoint format {found}, "
                        f"this code reads format {FORMAT_VERSION}: {hint}")
    if ckpt.get("stage") != stage:
        raise UserError(f"{path} was written by stage '{ckpt.get('stage')}', "
                        f"expected '{stage}': {hint}")
    problem = _record_problem(ckpt)
    if problem:
        raise UserError(f"{path} is not a checkpoint as {SCRIPTS.get(stage, 'this code')} writes "
                        f"them ({problem}: edited by hand?); delete it and {hint}")
    where = _not_finite(ckpt)
    if where:
        raise UserError(f"{path} holds NaN or infinite values ({where}): the stage that wrote it "
                        f"went wrong; delete it and {hint}")
    ckpt["id"], ckpt["path"], ckpt["hint"] = content_id(data), path, hint
    return ckpt


def _record_problem(ckpt):
    """What is wrong with the structure save_checkpoint gives every record ('' if nothing)."""
    def texts(x):
        return isinstance(x, list) and all(isinstance(s, str) for s in x)
    teacher = ckpt.get("teacher")
    checks = [
        ("config is not a dict", isinstance(ckpt.get("config"), dict)),
        ("dataset is not a name", isinstance(ckpt.get("dataset"), str)),
        ("classes is not a list of names per split", isinstance(ckpt.get("classes"), dict)
         and all(texts(v) for v in ckpt["classes"].values())),
        ("state is not a dict of weights", isinstance(ckpt.get("state"), dict)),
        ("upstream is not a dict of file ids", isinstance(ckpt.get("upstream"), dict)
         and all(isinstance(v, str) for v in ckpt["upstream"].values())),
        ("teacher is not a teacher's identity", teacher is None
         or isinstance(teacher, dict) and isinstance(teacher.get("name"), str)),
    ]
    return next((what for what, ok in checks if not ok), "")


def _not_finite(x, where=""):
    """Where in a checkpoint's record (e.g. 'state.train') a float tensor holds a NaN or an
    infinity, or '' (a NaN vector of stage 2 would otherwise surface in stage 3 as a loss
    that 'became nan: lower --lr')."""
    if isinstance(x, torch.Tensor):
        return where if x.is_floating_point() and not bool(torch.isfinite(x).all()) else ""
    items = (x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple))
             else ())
    for k, v in items:
        found = _not_finite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return ""


@contextlib.contextmanager
def reading(ckpt):
    """Build a model from a loaded checkpoint's record and load its weights inside
    `with reading(ckpt):`: a file whose record lacks a key or whose weights have other names
    or shapes (edited by hand, or written by an older version) stops the stage with one line
    that names the file, not a traceback."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        why = " ".join(str(e).split())  # load_state_dict's message has one line per problem
        why = why if len(why) <= 160 else why[:160] + "..."
        hint = ckpt.get("hint", "rerun the stage that writes it")  # (set by load_checkpoint)
        raise UserError(f"{ckpt.get('path', 'a checkpoint')} does not fit this code "
                        f"({type(e).__name__}: {why}); delete it and {hint}") from None


def load_weights(module, ckpt, *keys):
    """module.load_state_dict(ckpt["state"][keys[0]][keys[1]]...), one line if it does not fit."""
    with reading(ckpt):
        state = ckpt["state"]
        for k in keys:
            state = state[k]
        module.load_state_dict(state)
    return module


class Resume:
    """--resume (stage 1): after every epoch, <out>.last.pt holds the state of every part
    (modules, optimiser, scheduler: anything with a state_dict), the random generators, the
    history and the best epoch so far, so that a stopped run goes on exactly where it was.
    Made before any work, it tells a Ctrl-C whether there is an epoch to go on from."""

    def __init__(self, out, wanted, stage, device):
        self.path, self.stage, self.device = out[:-len(".pt")] + ".last.pt", stage, device
        self.wanted = wanted
        # an epoch of this run, not an older run's
        self.ready = wanted and os.path.exists(self.path)
        on_interrupt(lambda: f"the last completed epoch is kept in {self.path}: rerun the same "
                     f"command with --resume to continue" if self.ready
                     else "no epoch had finished, nothing to resume: rerun")

    def kept(self):
        """The file that holds this run's last completed epoch, or None."""
        return self.path if self.ready else None

    def load(self, parts, config, dataset, classes, teacher, ignore=()):
        """Restore `parts` from the last epoch when resuming: (epoch, history, (best accuracy,
        best state)), or (0, [], (-1.0, None)) for a fresh start. The file must come from the
        same dataset, teacher and flags (those in `ignore` may differ) and the same data:
        config["data_id"], the data ids of the splits read, which another --data-root with
        other images changes and the same folder by another path does not."""
        if not self.ready:
            if self.wanted:
                print(f"no {self.path} to resume from: starting at epoch 1")
            return 0, [], (-1.0, None)
        ck = load_checkpoint(self.path, self.stage, "rerun without --resume")
        check_same_world(ck, self.path, dataset, classes, teacher)
        if ck["config"].get("data_id") != config.get("data_id"):  # the images, not their path
            raise UserError(f"{self.path} was made from other data than this run reads "
                            f"(--data-root {config.get('data_root')} now, "
                            f"{ck['config'].get('data_root')} then): resume with the data it was "
                            f"made from, or start over without --resume")
        check_same_config(ck, self.path, config, ignore)
        with reading(ck):
            for name, part in parts.items():
                part.load_state_dict(ck["state"][name])
            torch.set_rng_state(ck["state"]["rng"])
            if self.device.type == "cuda" and "cuda_rng" in ck["state"]:  # DropBlock: on the GPU
                torch.cuda.set_rng_state(ck["state"]["cuda_rng"], self.device)
            epoch, history, best = ck["epoch"], ck["history"], (ck["best_acc"], ck["state"]["best"])
        print(f"resumed from {self.path} at epoch {epoch}")
        return epoch, history, best

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
    """Refuse to resume from a checkpoint made with other flags (the result would be neither
    run)."""
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
    try:
        writable_part(run)
    except NotADirectoryError as e:
        raise UserError(f"--run {run}: {e.filename} is a file, not a folder: "
                        f"choose another --run") from None
    except OSError as e:
        raise UserError(f"--run {run} cannot be written ({e.strerror}): "
                        f"choose a folder you can write to") from None


def writable_part(folder, exists=os.path.exists):
    """The part of `folder` that exists already, once it is known to be a folder that can be
    written to (a file there: NotADirectoryError naming it; else the OSError of trying)."""
    found = os.path.abspath(folder)
    while not exists(found):
        found = os.path.dirname(found)
    if not os.path.isdir(found):
        raise NotADirectoryError(errno.ENOTDIR, f"{found} is not a folder", found)
    tempfile.TemporaryFile(dir=found).close()
    return found


def check_output(path, stage):
    """Refuse to replace a file that is not a checkpoint of `stage` (stage 2 with --out
    01_student.pt would destroy hours of training): checked before any work."""
    name = os.path.basename(path)
    if not name.endswith(".pt") or name == ".pt":
        raise UserError(f"--out '{name}' is not a checkpoint file name: use a name ending in .pt")
    if not os.path.lexists(path):
        return
    try:
        with open_regular(path, "") as f:  # (a FIFO would block torch.load forever)
            found = torch.load(f, map_location="cpu", weights_only=True)
        found = found.get("stage") if isinstance(found, dict) else None
    except Exception:  # not a file, not readable, not a checkpoint
        found = None
    if found != stage:
        what = f"a checkpoint of stage '{found}'" if found else "not a checkpoint"
        raise UserError(f"{path} exists and is {what}; this stage ('{stage}') does not replace it: "
                        f"choose another --out, or delete the file first")


def remove_stale_temp_files(folders, where, writers_lock=False):
    """Remove, and say so, the temporary files that a killed run (kill -9, the OOM killer, a
    power cut) left in `folders`: those named by temp_path (TEMP<pid>.<name>) whose writer is
    dead. Any other file is the user's, however temporary its name looks. A writer is dead when
    no process here has its pid; with `writers_lock` (the image store, whose writer holds a lock
    on its file), also when the pid is ours (in a container every run may have the same pid),
    and never while a process holds the lock (a writer on another machine sharing the cache)."""
    gone = []
    for folder in folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError:  # none yet, or unreadable (which writing there will say)
            names = []
        for name in names:
            pid, dot, rest = name[len(TEMP):].partition(".")
            if not (name.startswith(TEMP) and pid.isdigit() and dot and rest):
                continue
            path = os.path.join(folder, name)
            dead = not _alive(int(pid)) or (writers_lock and int(pid) == os.getpid())
            if dead and not (writers_lock and _locked(path)):
                with contextlib.suppress(OSError):
                    os.remove(path)
                    gone.append(name)
    if gone:
        print(f"removed {len(gone)} temporary file(s) that a killed run left in {where} "
              f"({', '.join(gone[:3])})")


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
        raise UserError(f"{path} was built with other class names than dataset '{dataset}' "
                        f"has now: rerun that stage")
    if teacher is not None and not same_teacher(ckpt.get("teacher"), teacher):
        advice = teacher_advice(ckpt.get("teacher"), teacher, "rerun that stage " + WITH_SAME)
        raise UserError(f"{path} was built with teacher {ckpt.get('teacher')}, not {teacher}: "
                        f"{advice}")


def check_teacher_flags(ckpt, teacher):
    """Refuse --clip/--clip-pretrained that name another teacher (identity `teacher`) than
    the one `ckpt` was made with (stage 5 scores the teacher's image features against the
    semantic vectors it mined); a checkpoint that records none fits any."""
    made = ckpt.get("teacher")
    if made is not None and not same_teacher(made, teacher):
        advice = teacher_advice(made, teacher, "pass the same --clip/--clip-pretrained")
        raise UserError(f"{ckpt['path']} was made with teacher {made}, not {teacher}: {advice}")


def check_same_teacher(ckpts):
    """Refuse upstream checkpoints ({path: checkpoint}) made with different teachers
    (a checkpoint without one, e.g. the CE-only student, is compatible with any)."""
    made = [(p, c["teacher"]) for p, c in ckpts.items() if c is not None and c.get("teacher")]
    for p, t in made[1:]:
        if not same_teacher(t, made[0][1]):
            who = [" ".join(str(x[k]) for k in ("name", "pretrained", "file_id") if x.get(k))
                   for x in (made[0][1], t)]
            raise UserError(f"{made[0][0]} was made with teacher {who[0]} but {p} with {who[1]}: "
                            f"{teacher_advice(made[0][1], t, 'rerun the stages ' + WITH_SAME)}")


def same_teacher(a, b):
    """Two teacher identities name the same teacher: the same model and, for weights read
    from a file, the same file content (wherever it lies), else the same pretrained tag."""
    if not a or not b:
        return a == b
    # the same weights in another network
    if a.get("quick_gelu", False) != b.get("quick_gelu", False):
        return False
    if a.get("file_id") or b.get("file_id"):
        return a["name"] == b["name"] and a.get("file_id") == b.get("file_id")
    return a["name"] == b["name"] and a.get("pretrained") == b.get("pretrained")


WITH_SAME = "with the same --clip/--clip-pretrained"


def teacher_advice(a, b, otherwise):
    """What to do about two teachers that differ: the same flags with other file content
    means the weights file itself was replaced since (e.g. in $SYNTRANS_CACHE), and no flag
    brings the old one back; else `otherwise` (e.g. "rerun that stage " + WITH_SAME)."""
    if a and b and a["name"] == b["name"] and a.get("pretrained") == b.get("pretrained"):
        return (f"the teacher file {a.get('pretrained')} has other content now: rerun the stages "
                f"from 01_distill.py")
    return otherwise


SCRIPTS = {"distill": "01_distill.py", "distill-last": "01_distill.py", "mine": "02_mine.py",
           "bridge": "03_bridge.py", "classifier": "04_classifier.py"}  # stage -> its script


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
    """Decode every image file of a split as the stages will (read_image; JPEGs at reduced
    scale, which is fast) to find broken ones."""
    for path in split.paths or []:
        read_image(path, draft=(split.size, split.size))


def check_splits(splits, n_way, shots, n_query):
    """Refuse what a later stage would refuse about the splits, with the checks those stages
    run (and so with their messages): the fixed 5-way val episodes of stages 1 and 3 (1-shot)
    and 4 (each --shots), then the --n-way --shots --n-query episodes that stage 4 draws from
    train and stage 5 from test and val. (A split of one class is refused by its loader.)"""
    val_episodes(splits["val"], 1, 1, 0)
    for k in parse_list(shots, "--shots", int, "shot counts", "1,5"):
        val_episodes(splits["val"], k, 1, 0, "--shots")
    for s in SPLITS:
        check_episodes(splits[s], n_way, shots, n_query, "--n-way, --shots or --n-query")


def _check():
    """python common.py check --dataset D --data-root R [--download] [--clip M --clip-pretrained P]:
    loads every split of a dataset, refuses what a later stage would refuse about them and
    decodes each image file, then (with --clip) loads the teacher; a bad folder or teacher
    gives a one-line error (exit code 2)."""
    import argparse
    p = argparse.ArgumentParser(description=_check.__doc__)
    p.add_argument("command", choices=["check"])
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-root", default=None, help="the dataset folder")
    p.add_argument("--image-size", type=int, default=None,
                   help="the student's input size (--dataset folder)")
    p.add_argument("--download", action="store_true",
                   help="fetch CIFAR-100 first (cifar-fs, fc100)")
    p.add_argument("--clip", default=None, help="also load this teacher (as the stages would)")
    p.add_argument("--clip-pretrained", default=None, help="its tag or weights file")
    # the episodes of stages 4 and 5 (their defaults): pass what you will pass them
    p.add_argument("--n-way", type=int, default=5, help="classes per episode (stages 4 and 5)")
    p.add_argument("--shots", default="1,5", help="shot counts (stages 4 and 5)")
    p.add_argument("--n-query", type=int, default=15, help="queries per class (stages 4 and 5)")
    args = p.parse_args()
    if args.clip:  # a wrong teacher is refused before the images are read
        check_teacher(args)
    if args.download:
        download(args.dataset, args.data_root)
    splits = {s: read_split(args.dataset, s, args.data_root, args.image_size) for s in SPLITS}
    check_splits(splits, args.n_way, args.shots, args.n_query)  # before reading every image
    for s, split in splits.items():
        check_images(split)
        print(f"{s}: {len(split.classes)} classes, {len(split)} images "
              f"({', '.join(split.classes[:3])}, ...)")
    if args.clip:
        print("teacher:", load_teacher(args.clip, args.clip_pretrained)[3])


if __name__ == "__main__":
    run_main(_check)

