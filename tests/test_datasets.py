"""The real-benchmark loaders of common.py on small fake folders in the real on-disk
formats, written here: CIFAR-100 python-version pickles, miniImageNet (Ravi csv and
folder layouts) and tieredImageNet (folder layout). Every class of a split is present
with a few tiny images; the broken variants must give a one-line UserError."""
import io
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

SHARED = os.path.join(REPO, "..", "shared", "splits")
SPLIT_SIZES = {"cifar-fs": (64, 16, 20), "fc100": (60, 20, 20),
               "mini-imagenet": (64, 16, 20), "tiered-imagenet": (351, 97, 160)}


def ids(dataset, split):
    return [cid for cid, _ in common.split_classes(dataset, split)]


def jpeg_bytes(color=(200, 30, 30), size=(10, 8), fmt="JPEG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------
# The project's split files

@pytest.mark.parametrize("dataset,shared", [("cifar-fs", "cifar_fs"), ("fc100", "fc100"),
                                            ("mini-imagenet", "miniimagenet"), ("tiered-imagenet", "tieredimagenet")])
def test_split_files_match_shared(dataset, shared):
    if not os.path.isdir(SHARED):
        pytest.skip("../shared/splits not present")
    for split, n in zip(common.SPLITS, SPLIT_SIZES[dataset]):
        ours = common.split_classes(dataset, split)
        with open(os.path.join(SHARED, shared, f"{split}.txt"), encoding="utf-8") as f:
            theirs = [tuple(line.rstrip("\n").split("\t")[:2]) for line in f if line.strip()]
        assert len(ours) == len(theirs) == n
        assert set(ours) == set(theirs)


@pytest.mark.parametrize("dataset", SPLIT_SIZES)
def test_split_files_are_disjoint_with_unique_names(dataset):
    rows = [r for s in common.SPLITS for r in common.split_classes(dataset, s)]
    assert len({cid for cid, _ in rows}) == len(rows) == sum(SPLIT_SIZES[dataset])
    assert len({name for _, name in rows}) == len(rows)


def test_class_without_name_is_an_error(tmp_path, monkeypatch):
    shutil.copytree(common.SPLIT_DIR, tmp_path / "splits")
    path = tmp_path / "splits" / "mini-imagenet" / "val.tsv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].split("\t")[0] + "\t "
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(common, "SPLIT_DIR", str(tmp_path / "splits"))
    with pytest.raises(common.UserError, match=f"class {lines[3].split()[0]} has no readable name"):
        common.split_classes("mini-imagenet", "val")


# ------------------------------------------------------------------------------
# CIFAR-FS and FC100 from cifar-100-python/{meta,train,test}

FINE = sorted(cid for s in common.SPLITS for cid in ids("cifar-fs", s))  # the CIFAR-100 label order


def write_cifar(root, per_class=(2, 1), skip=()):
    """Real-format pickles (bytes keys, as in the official files); every pixel of an image
    holds its fine label, so a test can see which class an image came from."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in FINE],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, f, protocol=2)
    for name, n in zip(("train", "test"), per_class):
        fine = [c for c in range(100) for _ in range(n) if FINE[c] not in skip]
        data = np.repeat(np.array(fine, dtype=np.uint8)[:, None], 3072, axis=1)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"fine_labels": fine, b"coarse_labels": [0] * len(fine),
                         b"filenames": [f"{i}.png".encode() for i in range(len(fine))], b"data": data}, f, protocol=2)
    return str(root)


@pytest.mark.parametrize("dataset", ["cifar-fs", "fc100"])
def test_cifar_loads(tmp_path, dataset):
    root = write_cifar(tmp_path)
    for split, n in zip(common.SPLITS, SPLIT_SIZES[dataset]):
        s = common.load_split(dataset, split, root)
        assert (len(s.classes), len(s), s.size, s.paths) == (n, 3 * n, 32, None)
        assert s.images.shape == (3 * n, 3, 32, 32) and s.images.dtype == common.torch.uint8
        assert sorted(s.labels.tolist()) == sorted(list(range(n)) * 3)
        assert s.ids == ids(dataset, split)
        # each image is the class its label names (pixels = CIFAR fine index)
        assert [FINE[int(v)] for v in s.images[:, 0, 0, 0]] == [s.ids[c] for c in s.labels.tolist()]
    s = common.load_split("cifar-fs", "train", root)
    assert s.classes[:2] == ["apple", "aquarium fish"] and s.ids[1] == "aquarium_fish"


def test_cifar_str_keys_also_load(tmp_path):
    """Pickles written with str keys (as torchvision's latin1 reading would give) load too."""
    root = write_cifar(tmp_path)
    for name in ("meta", "train", "test"):
        path = tmp_path / "cifar-100-python" / name
        d = pickle.loads(path.read_bytes())
        path.write_bytes(pickle.dumps({k.decode(): v for k, v in d.items()}))
    assert len(common.load_split("fc100", "test", root)) == 60


def test_cifar_errors(tmp_path):
    with pytest.raises(common.UserError, match="no --data-root given.*cifar-100-python"):
        common.load_split("cifar-fs", "train", None)
    with pytest.raises(common.UserError, match="cifar-100-python/meta not found.*--download"):
        common.load_split("cifar-fs", "train", str(tmp_path))
    root = write_cifar(tmp_path / "a")
    os.remove(tmp_path / "a" / "cifar-100-python" / "test")
    with pytest.raises(common.UserError, match="cifar-100-python/test not found"):
        common.load_split("fc100", "val", root)
    root = write_cifar(tmp_path / "b")
    (tmp_path / "b" / "cifar-100-python" / "train").write_bytes(b"<html>not a pickle</html>")
    with pytest.raises(common.UserError, match="train is not a CIFAR-100 python-version pickle"):
        common.load_split("cifar-fs", "val", root)
    root = write_cifar(tmp_path / "c", skip={"crab"})
    with pytest.raises(common.UserError, match=r"cifar-fs val class crab \(crab\) has no images"):
        common.load_split("cifar-fs", "val", root)
    assert len(common.load_split("cifar-fs", "train", root)) == 192  # the other splits are fine


def test_download_refuses_imagenet():
    with pytest.raises(common.UserError, match="--download needs --dataset cifar-fs or fc100"):
        common.download("mini-imagenet", "/tmp")


# ------------------------------------------------------------------------------
# miniImageNet (Ravi csv layout and folder layout) and tieredImageNet (folder layout)

def write_ravi(root, per_class=2):
    """images/<wnid><8 digits>.jpg plus {train,val,test}.csv, as Ravi & Larochelle's files."""
    (root / "images").mkdir(parents=True)
    jpg = jpeg_bytes()
    for split in common.SPLITS:
        rows = ["filename,label"]
        for wnid in ids("mini-imagenet", split):
            for i in range(per_class):
                name = f"{wnid}{i + 1:08d}.jpg"
                (root / "images" / name).write_bytes(jpg)
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return str(root)


def write_folders(root, dataset, per_class=1):
    """{train,val,test}/<wnid>/<file>, with mixed image extensions and a stray file."""
    files = {".JPEG": jpeg_bytes(), ".png": jpeg_bytes(fmt="PNG")}
    for split in common.SPLITS:
        for k, wnid in enumerate(ids(dataset, split)):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                ext = list(files)[(k + i) % 2]
                (root / split / wnid / f"{wnid}_{i}{ext}").write_bytes(files[ext])
        (root / split / ".DS_Store").write_bytes(b"\0")
    (root / "train" / ids(dataset, "train")[0] / "notes.txt").write_text("not an image")
    return str(root)


def assert_file_split(s, dataset, split, per_class):
    n = SPLIT_SIZES[dataset][common.SPLITS.index(split)]
    assert (len(s.classes), len(s), s.size) == (n, n * per_class, 84)
    assert s.images.shape == (len(s), 3, 84, 84)  # decoded once into the image store
    assert s.ids == ids(dataset, split)
    assert sorted(s.labels.tolist()) == sorted(list(range(n)) * per_class)
    assert all(os.path.basename(p)[:9] == s.ids[c] for p, c in zip(s.paths, s.labels.tolist()))
    assert s.student_batch([0, len(s) - 1]).shape == (2, 3, 84, 84)


def test_mini_ravi_loads(tmp_path):
    root = write_ravi(tmp_path)
    for split in common.SPLITS:
        assert_file_split(common.load_split("mini-imagenet", split, root), "mini-imagenet", split, 2)
    s = common.load_split("mini-imagenet", "train", root)
    assert s.classes[:3] == ["house finch", "robin", "triceratops"]
    assert s.paths[0] == os.path.join(root, "images", "n0153282900000001.jpg")


@pytest.mark.parametrize("dataset", ["mini-imagenet", "tiered-imagenet"])
def test_folder_layout_loads(tmp_path, dataset):
    root = write_folders(tmp_path, dataset)
    for split in common.SPLITS:
        assert_file_split(common.load_split(dataset, split, root), dataset, split, 1)
        common.check_images(common.load_split(dataset, split, root))
    assert common.load_split(dataset, "train", root).classes[0] == ("house finch" if dataset == "mini-imagenet"
                                                                    else "brambling")


def test_mini_ravi_errors(tmp_path):
    with pytest.raises(common.UserError, match="nowhere is not a folder: .*images/ and train.csv.* or train/, val/"):
        common.load_split("mini-imagenet", "train", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="empty/train not found: .*images/ and train.csv.* or train/, val/"):
        common.load_split("mini-imagenet", "train", str(tmp_path / "empty"))
    root = write_ravi(tmp_path / "a")
    os.remove(os.path.join(root, "val.csv"))
    with pytest.raises(common.UserError, match="val.csv not found"):
        common.load_split("mini-imagenet", "val", root)
    csv = tmp_path / "a" / "test.csv"
    text = csv.read_text()
    csv.write_text(text.replace("filename,label", "file,wnid"))
    with pytest.raises(common.UserError, match="test.csv does not start with the header 'filename,label'"):
        common.load_split("mini-imagenet", "test", root)
    csv.write_text(text + "n9999999900000001.jpg,n99999999\n")
    with pytest.raises(common.UserError, match="test.csv line 42: 'n9999999900000001.jpg,n99999999' does not name "
                                               "one of the 20 mini-imagenet test wnids"):
        common.load_split("mini-imagenet", "test", root)
    first = ids("mini-imagenet", "test")[0]
    csv.write_text("".join(line + "\n" for line in text.splitlines() if first not in line))
    with pytest.raises(common.UserError, match=f"mini-imagenet test class {first} \\(nematode\\) has no images"):
        common.load_split("mini-imagenet", "test", root)
    os.remove(os.path.join(root, "images", "n0153282900000002.jpg"))
    with pytest.raises(common.UserError, match="images/n0153282900000002.jpg .listed in .*train.csv line 3. not found"):
        common.load_split("mini-imagenet", "train", root)


@pytest.mark.parametrize("dataset", ["mini-imagenet", "tiered-imagenet"])
def test_folder_layout_errors(tmp_path, dataset):
    with pytest.raises(common.UserError, match=f"no --data-root given: {dataset} needs a folder"):
        common.load_split(dataset, "train", None)
    root = write_folders(tmp_path, dataset)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(common.UserError, match="val not found: --data-root should be .*train/, val/, test/"):
        common.load_split(dataset, "val", root)
    other = ids(dataset, "test")[0]
    (tmp_path / "train" / other).mkdir()
    with pytest.raises(common.UserError, match=f"unknown class folder .*train/{other}: not one of the "
                                               f"{SPLIT_SIZES[dataset][0]} {dataset} train wnids"):
        common.load_split(dataset, "train", root)
    wnid, name = common.split_classes(dataset, "test")[5]
    for f in (tmp_path / "test" / wnid).iterdir():
        f.unlink()
    with pytest.raises(common.UserError, match=f"{dataset} test class {wnid} \\({name}\\) has no images"):
        common.load_split(dataset, "test", root)
    shutil.rmtree(tmp_path / "test" / wnid)  # a missing folder reads the same
    with pytest.raises(common.UserError, match=f"{dataset} test class {wnid} \\({name}\\) has no images"):
        common.load_split(dataset, "test", root)


def test_unreadable_image_is_named(tmp_path):
    root = write_folders(tmp_path, "tiered-imagenet")
    s = common.load_split("tiered-imagenet", "val", root)
    common.check_images(s)
    noise = np.random.RandomState(0).randint(0, 256, (96, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    with open(s.paths[7], "wb") as f:  # a truncated download: the header opens, the pixels do not decode
        f.write(buf.getvalue()[:len(buf.getvalue()) * 7 // 10])
    Image.open(s.paths[7]).close()
    with pytest.raises(common.UserError, match=f"cannot read image {s.paths[7]} .OSError."):
        common.check_images(s)
    with open(s.paths[3], "wb") as f:  # not an image at all
        f.write(b"<html>404</html>")
    with pytest.raises(common.UserError, match=f"cannot read image {s.paths[3]} .UnidentifiedImageError."):
        common.check_images(s)


# ------------------------------------------------------------------------------
# python common.py check

def run_check(dataset, root):
    """The real command line, in a fresh process: exit code, stdout, stderr."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "common.py"), "check", "--dataset", dataset,
                           "--data-root", root], capture_output=True, text=True, env=env, timeout=120)


def test_check_cli(tmp_path):
    r = run_check("mini-imagenet", write_ravi(tmp_path / "small"))  # what stage 1 would refuse
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == ("error: mini-imagenet val class 'goose' has 2 images; 1-shot episodes with 15 queries "
                        "need 16: the dataset is incomplete (python common.py check finds such classes)\n")
    root = write_ravi(tmp_path, per_class=20)  # 5-shot episodes with 15 queries
    r = run_check("mini-imagenet", root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "train: 64 classes, 1280 images (house finch, robin, triceratops, ...)"
    assert lines[1] == "val: 16 classes, 320 images (goose, Ibizan hound, white wolf, ...)"
    assert lines[2] == "test: 20 classes, 400 images (nematode, king crab, golden retriever, ...)"
    bad = os.path.join(root, "images", "n0198127600000002.jpg")  # a test image
    with open(bad, "wb") as f:
        f.write(b"GIF89a broken")
    r = run_check("mini-imagenet", root)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == f"error: cannot read image {bad} (UnidentifiedImageError): replace or delete it\n"
    assert r.stdout.startswith("train: 64 classes") and "test:" not in r.stdout


def test_check_in_process(tmp_path, monkeypatch, capsys):
    """The same command on CIFAR, run in this process (a fresh one costs seconds)."""
    def check(dataset, root):
        monkeypatch.setattr(sys, "argv", ["common.py", "check", "--dataset", dataset, "--data-root", root])
        with pytest.raises(SystemExit) as e:
            common.run_main(common._check)
            sys.exit(0)
        out, err = capsys.readouterr()
        return e.value.code, out, err
    code, out, err = check("cifar-fs", write_cifar(tmp_path, per_class=(15, 5)))
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "train: 64 classes, 1280 images (apple, aquarium fish, bear, ...)"
    assert out.splitlines()[-1] == "test: 20 classes, 400 images (baby, bed, bicycle, ...)"
    code, out, err = check("fc100", str(tmp_path / "nowhere"))
    assert (code, out) == (2, "")
    assert err == f"error: --data-root {tmp_path / 'nowhere'} is not a folder: fc100 needs {common.LAYOUTS['fc100']}\n"
