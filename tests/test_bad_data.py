"""Bad data that used to give silently wrong results, tracebacks or a hang (issue 22): 16-bit
images, classes.tsv files and class folders that name classes badly, splits that a later
stage refuses, and files that are not regular files with UTF-8 names. Each is refused in one
line by the loaders, and so by `python common.py check` before any work, or read correctly."""
import os
import re
import signal
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

CLASSES = {"train": ["ant", "bee"], "val": ["cat", "dog"], "test": ["eel", "fox"]}
FIVE = {"train": ["a1", "a2", "a3", "a4", "a5"], "val": ["b1", "b2", "b3", "b4", "b5"],
        "test": ["c1", "c2", "c3", "c4", "c5"]}  # enough classes for 5-way episodes


def write_folder(root, classes=CLASSES, per_class=1, tsv=None):
    """A --dataset folder of 8x8 PNGs, `per_class` in each class folder; `tsv`: the bytes of
    classes.tsv."""
    for split, folders in classes.items():
        for k, d in enumerate(folders):
            (root / split / d).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * k, i % 256, 90)).save(root / split / d / f"{i}.png")
    if tsv is not None:
        (root / "classes.tsv").write_bytes(tsv)
    return str(root)


def check(capsys, monkeypatch, root, *flags, dataset="folder"):
    """`python common.py check` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["common.py", "check", "--dataset", dataset,
                                      "--data-root", root, "--image-size", "8", *flags])
    capsys.readouterr()
    try:
        common.run_main(common._check)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, monkeypatch, root, part, *flags, dataset="folder"):
    """check stops with exit code 2 and one line on stderr that holds `part`; returns the line."""
    code, out, err = check(capsys, monkeypatch, root, *flags, dataset=dataset)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    assert part in err, err
    return err


@pytest.fixture
def no_hang():
    """Fail (rather than wait forever) when something blocks for 20 s, such as opening a FIFO."""
    def hung(*_):
        raise TimeoutError("blocked for 20 s (a FIFO opened?)")
    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


# ------------------------------------------------------------------------------
# 1. 16-bit images: scaled to 8 bits by every reader, not clipped to white

def write_16bit_png(path, grey, mode):
    """A real 16-bit greyscale PNG, written by Pillow from uint16 values."""
    data = grey.astype("<u2" if mode == "I;16" else ">u2").tobytes()
    Image.frombytes(mode, grey.shape[::-1], data).save(path, "PNG")
    with open(path, "rb") as f:
        assert f.read(26)[24] == 16  # the IHDR's bit depth: 16 bits per sample


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_png_is_scaled_not_white(tmp_path, mode):
    root = write_folder(tmp_path)
    grey = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    path = os.path.join(root, "val", "cat", "0.png")
    write_16bit_png(path, grey, mode)
    want = np.repeat((grey >> 8).astype(np.uint8)[:, :, None], 3, axis=2)  # 0 ... 255, not white
    files = common.read_split("folder", "val", root, 8)
    i = files.paths.index(path)
    assert np.array_equal(np.asarray(files.pil(i)), want)  # what the teacher reads
    common.check_images(files)
    stored = common.load_split("folder", "val", root, 8)  # the student's decoding, into the store
    assert np.array_equal(stored.images[i].permute(1, 2, 0).numpy(), want)


def test_float_pixels_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """A TIFF named .png (Pillow reads files by content) with 32-bit float pixels has no
    8-bit meaning: refused by the readers and by check."""
    root = write_folder(tmp_path, FIVE, per_class=20)  # splits that check lets through
    path = os.path.join(root, "test", "c1", "0.png")
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path, "TIFF")
    split = common.read_split("folder", "test", root, 8)
    with pytest.raises(common.UserError, match="cannot read image .*c1/0.png .32-bit float pixels"):
        split.pil(0)
    refused(capsys, monkeypatch, root, f"cannot read image {path} (32-bit float pixels")


# ------------------------------------------------------------------------------
# 2. classes.tsv and the class folders: every class gets one readable name of its own

def test_classes_tsv_with_a_byte_order_mark_names_its_first_class(tmp_path):
    root = write_folder(tmp_path, tsv="\ufeffant\tformica rufa\nbee\thoney bee\n".encode("utf-8"))
    assert common.class_names("folder", root)["train"] == ["formica rufa", "honey bee"]
    assert common.read_split("folder", "train", root).classes == ["formica rufa", "honey bee"]


def test_a_folder_named_only_underscores_may_be_named_in_classes_tsv(tmp_path):
    classes = dict(CLASSES, train=["___", "bee"])
    root = write_folder(tmp_path, classes, tsv=b"___\tmystery insect\n")
    assert common.class_names("folder", root)["train"] == ["mystery insect", "bee"]


BAD_CLASSES = {  # name: (classes, classes.tsv bytes, a part of the one-line error)
    "latin-1 classes.tsv": (CLASSES, "bee\tabeille d'\u00e9t\u00e9\n".encode("latin-1"),
                            "classes.tsv is not UTF-8 text (byte 0xe9 at offset 14): "
                            "save it as UTF-8"),
    "tab inside a name": (CLASSES, b"ant\tred\twood ant\n",
                          "classes.tsv line 1 has 3 tab-separated columns: write "
                          "'folder<TAB>readable name', with no tab inside the name"),
    "one name for two classes (classes.tsv)": (CLASSES, b"ant\tinsect\nbee\tinsect\n",
                                               "the classes train/ant and train/bee have the same "
                                               "readable name 'insect'"),
    "one name for two classes (folders, two splits)": (
        dict(CLASSES, test=["red_fox", "eel"], val=["red-fox", "dog"]), None,
        "the classes val/red-fox and test/red_fox have the same readable name 'red fox'"),
    "one name for two classes (letter case)": (CLASSES, b"cat\tDog\n",
                                               "the classes val/cat and val/dog have the same "
                                               "readable name 'dog'"),
    "one folder in two splits": (dict(CLASSES, val=["ant", "dog"]), None,
                                 "the class folder ant is in both train/ and val/: a class belongs "
                                 "to one split"),
    "a folder named ___": (dict(CLASSES, train=["___", "bee"]), None,
                           "/train/___ has no readable name: add a line '___<TAB>readable name' "
                           "to "),
}


@pytest.mark.parametrize("case", BAD_CLASSES)
def test_bad_class_names_are_refused_in_one_line(tmp_path, capsys, monkeypatch, case):
    classes, tsv, part = BAD_CLASSES[case]
    root = write_folder(tmp_path, classes, tsv=tsv)
    for split in common.SPLITS:  # whichever split a stage loads
        with pytest.raises(common.UserError, match=re.escape(part)):
            common.read_split("folder", split, root)
    with pytest.raises(common.UserError):
        common.class_names("folder", root)
    refused(capsys, monkeypatch, root, part)


# ------------------------------------------------------------------------------
# 3. check refuses what a later stage would refuse about the splits

def test_a_split_of_one_class_is_refused(tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path, dict(CLASSES, train=["ant"]), per_class=20)
    part = (f"folder train has 1 class in {os.path.join(root, 'train')}: a split needs at least 2 "
            f"(add class folders)")
    with pytest.raises(common.UserError, match=re.escape(part)):
        common.read_split("folder", "train", root)
    refused(capsys, monkeypatch, root, part)


def test_check_refuses_a_val_split_that_stage_1_refuses_with_its_message(tmp_path, capsys,
                                                                           monkeypatch):
    root = write_folder(tmp_path, dict(FIVE, val=FIVE["val"][:4]), per_class=20)
    with pytest.raises(common.UserError) as e:  # stage 1 itself, before any training
        common.stage_module("01_distill").main([
            "--run", str(tmp_path / "run"), "--dataset", "folder", "--data-root", root,
            "--image-size", "8", "--distill-weight", "0", "--device", "cpu"])
    assert "5-way episodes need 5 classes; folder val has 4" in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    code, out, err = check(capsys, monkeypatch, root)
    assert (code, out, err) == (2, "", f"error: {e.value}\n")


def test_check_refuses_what_stages_4_and_5_refuse_at_the_flags_given(tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path, FIVE, per_class=16)  # 16: enough for 1-shot, not 5-shot
    refused(capsys, monkeypatch, root, "folder val class 'b1' has 16 images; 5-shot episodes "
                                       "with 15 queries need 20: lower --shots")
    code, out, err = check(capsys, monkeypatch, root, "--shots", "1")
    assert (code, err) == (0, "")
    assert out.startswith("train: 5 classes, 80 images (a1, a2, a3, ...)")
    six = "6-way episodes need 6 classes; folder train has 5: lower --n-way, --shots or --n-query"
    refused(capsys, monkeypatch, root, six, "--n-way", "6", "--shots", "1")
    root = write_folder(tmp_path / "more", FIVE, per_class=20)
    code, out, err = check(capsys, monkeypatch, root)
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == "val: 5 classes, 100 images (b1, b2, b3, ...)"


def test_checks_defaults_are_stage_4s():
    p = common.stage_module("04_classifier").get_args()
    defaults = p.get_default("n_way"), p.get_default("shots"), p.get_default("n_query")
    assert defaults == (5, "1,5", 15)  # what check assumes unless told


# ------------------------------------------------------------------------------
# 4. The file list: only regular files with UTF-8 names, refused before any is opened

def no_utf8_file(root):
    cat = root / "val" / "cat"
    (cat / "caf\udce9.png").write_bytes((cat / "0.png").read_bytes())  # (a byte 0xe9 on disk)
    return "the file name {root}/val/cat/caf\\xe9.png is not UTF-8: rename it"


def no_utf8_folder(root):
    os.rename(root / "val" / "dog", root / "val" / "d\udcf6g")
    return "the class folder {root}/val/d\\xf6g is not UTF-8: rename it"


def dangling_link(root):
    os.symlink("gone.png", root / "val" / "cat" / "1.png")
    return "{root}/val/cat/1.png is a symbolic link to gone.png, which does not exist: replace or"


def link_loop(root):
    os.symlink("1.png", root / "val" / "cat" / "1.png")
    return "{root}/val/cat/1.png is a symbolic link loop: replace or delete it"


def fifo(root):
    os.mkfifo(root / "val" / "cat" / "1.png")
    return "{root}/val/cat/1.png is a named pipe (FIFO), not a file: a data file must be a regular"


@pytest.mark.parametrize("make", [no_utf8_file, no_utf8_folder, dangling_link, link_loop, fifo])
def test_bad_files_are_refused_in_one_line_when_listed(tmp_path, capsys, monkeypatch, no_hang,
                                                       make):
    root = write_folder(tmp_path / "data")
    part = make(tmp_path / "data").format(root=root)
    with pytest.raises(common.UserError) as e:
        common.read_split("folder", "val", root)
    assert part in str(e.value)
    refused(capsys, monkeypatch, root, part)  # (names that are not UTF-8 shown as \xNN)


def test_files_id_refuses_what_is_not_a_regular_file(tmp_path, no_hang):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(common.UserError, match="pipe is a named pipe .FIFO., not a file"):
        common.files_id([str(tmp_path / "pipe")])
    with pytest.raises(common.UserError, match="dir.png is a folder, not a file"):
        common.files_id([str(tmp_path / "dir.png")])


def test_a_fifo_as_a_cifar_file_is_refused_not_opened(tmp_path, capsys, monkeypatch, no_hang):
    (tmp_path / "cifar-100-python").mkdir()
    os.mkfifo(tmp_path / "cifar-100-python" / "meta")
    refused(capsys, monkeypatch, str(tmp_path),
            "cifar-100-python/meta is a named pipe (FIFO), not a file", dataset="cifar-fs")
