"""The decode-once image store and the cache folder it lives in (issue 22): a store is used
only when it is the one its record describes (else it is built again), a full disk is one
line and leaves no temporary file, a killed writer's temporary file is removed by the next
run (and only a dead writer's), and a cache folder that cannot be written is one line saying
what to set. The stores here are small arrays or the toy-tiny splits, in a temporary cache."""
import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (40, 3, 8, 8)
DEAD = 4194305  # above Linux's largest pid (2**22): no process has it


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SYNTRANS_CACHE", str(folder))
    return folder


def filler(seed, shape=SHAPE):
    """fill(out) for image_store: random pixels of its own per seed (and a count of its calls)."""
    def fill(out):
        fill.calls += 1
        out[:] = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    fill.calls = 0
    return fill


def pixels(seed, shape=SHAPE):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def replace(path, data):
    """Give `path` new bytes through a new file (the old one may still be memory-mapped here,
    and a mapped file truncated in place is a SIGBUS)."""
    path.with_suffix(".new").write_bytes(data)
    os.replace(path.with_suffix(".new"), path)


@contextlib.contextmanager
def time_limit(seconds):
    """Fail, rather than hang, when what runs inside takes longer than `seconds`."""
    def expired(signum, frame):
        pytest.fail(f"still running after {seconds} s")
    before = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def one_line_error(capsys, fn, *parts):
    """fn() under run_main, as a stage runs: exit code 2 and one line on stderr with `parts`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.run_main(fn)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(p in err for p in parts), err
    return err


# ------------------------------------------------------------------------------
# 1. A store is checked when it is opened

def test_a_good_store_is_opened_not_built_again(cache):
    fill = filler(1)
    first = common.image_store("a", SHAPE, fill)
    again = common.image_store("a", SHAPE, fill)
    assert fill.calls == 1 and torch.equal(first, pixels(1)) and torch.equal(again, pixels(1))
    assert [n for n in os.listdir(cache / "images") if not n.startswith("a.")] == []


def damage(images, how):
    a, b, c = (images / f"{k}.npy" for k in "abc")
    if how == "swapped":  # another store of the same shape under a's name
        replace(a, b.read_bytes())
    elif how == "swapped with its record":  # (before issue 22 a store had no record)
        replace(a, b.read_bytes())
        if (images / "b.json").exists():
            replace(images / "a.json", (images / "b.json").read_bytes())
    elif how == "wrong shape":
        replace(a, c.read_bytes())
    elif how == "truncated":
        replace(a, a.read_bytes()[:len(a.read_bytes()) // 2])
    elif how == "random bytes":
        replace(a, os.urandom(len(a.read_bytes())))
    elif how == "empty":
        replace(a, b"")
    elif how == "a row changed":
        data = bytearray(a.read_bytes())
        data[-1] ^= 0xFF  # the last row is one of those the record hashes
        replace(a, bytes(data))
    elif how == "no record" and (images / "a.json").exists():  # an older version's, or lost
        os.remove(images / "a.json")
    elif how == "a FIFO":  # (np.load would wait for a writer forever)
        os.remove(a)
        os.mkfifo(a)


@pytest.mark.parametrize("how", ["swapped", "swapped with its record", "wrong shape", "truncated",
                                 "random bytes", "empty", "a row changed", "no record",
                                 "a FIFO"])
def test_a_store_that_is_not_the_one_its_record_describes_is_built_again(cache, capsys, how):
    held = common.image_store("a", SHAPE, filler(1))  # still mapped while the file is replaced
    common.image_store("b", SHAPE, filler(2))
    common.image_store("c", (20, 3, 8, 8), filler(3, (20, 3, 8, 8)))
    damage(cache / "images", how)
    capsys.readouterr()
    fill = filler(1)
    with time_limit(60):  # a FIFO opened as a file waits for a writer forever
        images = common.image_store("a", SHAPE, fill)
    assert fill.calls == 1 and torch.equal(images, pixels(1)) and torch.equal(held, pixels(1))
    out = capsys.readouterr().out
    assert f"the image store {cache / 'images' / 'a.npy'} " in out and "building it again" in out
    assert [n for n in os.listdir(cache / "images") if n[0] not in "abc"] == []  # no temporary file
    assert common.image_store("a", SHAPE, filler(1)) is not None and fill.calls == 1  # good again


def test_the_val_store_replaced_by_the_test_store_is_not_used(cache, capsys):
    """The case found: val features computed from the test split's store (zero-shot 56% -> 25%)."""
    import toyworld
    val, test = common.load_split("toy-tiny", "val"), common.load_split("toy-tiny", "test")
    images = cache / "images"
    name = lambda split: next(n for n in os.listdir(images) if n.startswith(f"toy-tiny-{split}-")
                              and n.endswith(".npy"))
    replace(images / name("val"), (images / name("test")).read_bytes())
    capsys.readouterr()
    again = common.load_split("toy-tiny", "val")
    assert torch.equal(again.images, toyworld.build_split("toy-tiny", "val")[0])
    assert "building it again" in capsys.readouterr().out
    del val, test


# ------------------------------------------------------------------------------
# 2. A full disk, and the temporary files of a killed writer

def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(cache, capsys, monkeypatch):
    """The store's space is reserved before it is mapped: without that, a full disk is a SIGBUS
    on the first write to a page (no message) and a sparse temporary file is left."""
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    path = cache / "images" / "a.npy"
    one_line_error(capsys, lambda: common.image_store("a", SHAPE, filler(1)),
                   f"cannot write the image store {path}: No space left on device (the disk is "
                   f"full: free some space there, or set SYNTRANS_CACHE to a folder on another "
                   f"disk); no temporary file was left")
    assert os.listdir(cache / "images") == []


@pytest.mark.parametrize("allocate", ["posix_fallocate", "written zeros (macOS)"])
def test_the_space_of_a_store_is_on_disk_before_it_is_filled(cache, monkeypatch, allocate):
    """(A sparse file, as before, has only its first and last blocks on disk.)"""
    if allocate != "posix_fallocate":
        monkeypatch.delattr(os, "posix_fallocate")
    shape, seen = (64, 3, 64, 64), []

    def fill(out):
        (tmp,) = (cache / "images").iterdir()
        seen.append((os.stat(tmp).st_blocks * 512, os.stat(tmp).st_size))
        out[:] = pixels(1, shape).numpy()
    images = common.image_store("a", shape, fill)
    size = os.path.getsize(cache / "images" / "a.npy")
    assert seen[0][0] >= size and seen[0][1] == size and torch.equal(images, pixels(1, shape))


def test_the_temporary_store_of_a_killed_writer_is_removed_by_the_next_run(cache, capsys):
    script = ("import sys, time, common\n"
              "def fill(out):\n"
              "    open(sys.argv[1], 'w').close()\n"
              "    time.sleep(120)\n"
              "common.image_store('killed', (64, 3, 64, 64), fill)\n")
    ready = cache.parent / "filling"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", script, str(ready)], cwd=REPO, env=env)
    try:
        for _ in range(600):
            if ready.exists() or p.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), "the writer did not start filling"
        left = os.listdir(cache / "images")
        common.image_store("b", SHAPE, filler(2))  # while it is alive: its file is kept
        assert set(left) < set(os.listdir(cache / "images"))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert [n for n in left if str(p.pid) in n], left  # kill -9 left its temporary file
    capsys.readouterr()
    common.image_store("c", SHAPE, filler(3))
    assert [n for n in os.listdir(cache / "images") if n[0] not in "bc"] == []
    out = capsys.readouterr().out
    assert f"removed 1 temporary file(s) that a killed run left in {cache / 'images'}" in out


def test_only_the_temporary_files_of_dead_writers_are_removed(cache, capsys):
    images = cache / "images"
    images.mkdir(parents=True)
    names = {f".syntrans-tmp{DEAD}.x.npy": "removed",  # its process is gone
             f".syntrans-tmp{os.getpid()}.y.npy": "removed",  # ours, unlocked: an earlier run's
             f".syntrans-tmp{os.getppid()}.z.npy": "kept",  # a live writer here
             f".syntrans-tmp{DEAD}.w.npy": "kept",  # locked: a live writer on another machine
             "backup.tmp4242": "kept", "notes.tmp31337": "kept", f".syntrans-tmp{DEAD}": "kept",
             f"x.npy.tmp{DEAD}.npy": "kept"}  # the user's, however temporary their names look
    for n in names:
        (images / n).write_bytes(b"x" * 100)
    with open(images / f".syntrans-tmp{DEAD}.w.npy", "rb+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        capsys.readouterr()
        common.image_store("a", SHAPE, filler(1))
    kept = sorted(n for n, what in names.items() if what == "kept")
    assert sorted(n for n in os.listdir(images) if not n.startswith("a.")) == kept
    assert "removed 2 temporary file(s) that a killed run left in" in capsys.readouterr().out


# ------------------------------------------------------------------------------
# 3. A cache folder that cannot be used

def unusable(what, tmp_path, monkeypatch):
    """Make the cache folder unusable in the way `what` names; returns the folder."""
    if what == "HOME=/dev/null":
        monkeypatch.delenv("SYNTRANS_CACHE")
        monkeypatch.setenv("HOME", "/dev/null")
        return "/dev/null/.cache/syntrans", "/dev/null is not a folder"
    folder = tmp_path / "cache"
    monkeypatch.setenv("SYNTRANS_CACHE", str(folder))
    if what == "a file":
        folder.write_text("not a folder")
        return str(folder), f"{folder} is not a folder"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes into a read-only folder anyway: refuse as the kernel would
        real = tempfile.TemporaryFile

        def refused(*args, dir=None, **kw):
            if dir and str(dir).startswith(str(folder)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real(*args, dir=dir, **kw)
        monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    return str(folder), "Permission denied"


@pytest.mark.parametrize("what", ["HOME=/dev/null", "read-only", "a file"])
@pytest.mark.parametrize("where", ["a stage's image store", "the toy teacher"])
def test_an_unusable_cache_folder_is_one_line_saying_what_to_set(tmp_path, monkeypatch, capsys,
                                                                 what, where):
    folder, why = unusable(what, tmp_path, monkeypatch)
    import toyworld
    monkeypatch.setattr(toyworld, "train_teacher", lambda *a: pytest.fail("trained in vain"))
    run = tmp_path / "run"
    if where == "the toy teacher":
        fn = lambda: common.load_teacher("toy-clip-tiny")
    else:
        stage = __import__("01_distill")
        fn = lambda: stage.main(["--run", str(run), "--dataset", "toy-tiny", "--clip",
                                 "toy-clip-tiny", "--device", "cpu", "--epochs", "1"])
    err = one_line_error(capsys, fn, f"cannot write the cache folder {folder} ({why}): "
                                     f"set SYNTRANS_CACHE to a folder you can write to")
    assert err.endswith("(unset, it is ~/.cache/syntrans)\n") == (what == "HOME=/dev/null")
    assert not run.exists()
    if what == "a file":
        assert (tmp_path / "cache").read_text() == "not a folder"
    elif what == "read-only":
        assert os.listdir(tmp_path / "cache") == []


def test_an_empty_SYNTRANS_CACHE_is_taken_as_unset(tmp_path, monkeypatch):
    """(It once put the cache into whatever folder a stage was run from.)"""
    home, here = tmp_path / "home", tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("SYNTRANS_CACHE", "")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    assert common.cache_dir() == str(home / ".cache" / "syntrans")
    common.load_split("toy-tiny", "val")
    assert os.listdir(here) == [] and len(os.listdir(home / ".cache" / "syntrans" / "images")) == 2
