"""Issue 22, the checkpoint writer and loader and run_main: what testing as an adversary
found. The writer removes only its own temporary files and writes two files all or nothing;
the loader hashes the bytes it loaded, refuses a FIFO, a hand-edited record and NaN values in
one line; --resume refuses other data; printing that fails (python -OO, stdout on /dev/full,
an ascii stdout) is one line after the files are written; a teacher file with other content
is named as such in stage 5 too. Every test here failed on the code before issue 22."""
import io
import os
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

import common
from conftest import TINY, TINY_STUDENT, copy_run, one_line_error, run_stage, stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("single_thread")


def subprocess_env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1",
                SYNTRANS_CACHE=os.path.join(REPO, ".cache", "tests"), PYTHONPATH=REPO, **extra)


# ----------------------------------------------------------------------------------
# 1. Temporary files: the writer names its own (a prefix of the project's), and only those
#    of a process that is gone are removed

def test_a_stage_removes_only_its_writers_temporary_files(tmp_path, capsys, monkeypatch):
    (tmp_path / "cache").mkdir()
    dead = 4194305  # above Linux's largest pid: no such process
    users = [tmp_path / "notes.tmp31337", tmp_path / "cache" / "backup.tmp4242",
             tmp_path / f"results.json.tmp{dead}", tmp_path / f".syntrans-tmp{dead}"]
    ours = tmp_path / "cache" / f".syntrans-tmp{dead}.student-train-ab.pt"  # common.TEMP
    for f in users + [ours]:
        f.write_bytes(b"mine")
    common.start(common.parser(None), ["--run", str(tmp_path)])  # as every stage starts
    assert all(f.read_bytes() == b"mine" for f in users) and not ours.exists()
    assert "removed 1 temporary file(s)" in capsys.readouterr().out

    # and what the writer names its temporary files by
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(src), real(src, dst)))
    common.write_files({str(tmp_path / "results.json"): b"{}", str(tmp_path / "results.md"): b""})
    assert [os.path.basename(p) for p in renamed] == [f"{common.TEMP}{os.getpid()}.results.json",
                                                      f"{common.TEMP}{os.getpid()}.results.md"]


# ----------------------------------------------------------------------------------
# 2. Two files written together: when the second cannot be written, neither is

def write_pair(kind, a, b, text):
    if kind == "write_files":  # results.json + results.md (05_eval.py)
        common.write_files({a: text.encode(), b: text.encode()})
    else:                      # 02_semantics.pt + 02_descriptions.json (02_mine.py)
        common.atomic_save({"x": text}, a, together={b: text})


@pytest.mark.parametrize("kind,first,second", [
    ("write_files", "results.json", "results.md"),
    ("atomic_save", "02_semantics.pt", "02_descriptions.json"),
])
def test_a_second_file_that_cannot_be_written_leaves_the_first_as_it_was(tmp_path, kind, first,
                                                                          second):
    a, b = str(tmp_path / first), str(tmp_path / second)
    write_pair(kind, a, b, "old")
    before = open(a, "rb").read()
    os.remove(b)
    os.mkdir(b)  # a folder of that name: the second rename would fail
    with pytest.raises(common.UserError) as e:
        write_pair(kind, a, b, "new")
    msg = str(e.value)
    assert "\n" not in msg and f"cannot write {b}: a folder has that name" in msg, msg
    assert msg.endswith("nothing was changed there"), msg
    assert open(a, "rb").read() == before and os.listdir(b) == []
    assert sorted(os.listdir(tmp_path)) == sorted([first, second])  # no temporary file left


# ----------------------------------------------------------------------------------
# 3. A checkpoint replaced while it is loaded: the id is that of the bytes that were loaded

def test_the_id_of_a_loaded_checkpoint_is_that_of_the_content_loaded(tmp_path, monkeypatch):
    path, other = str(tmp_path / "01_student.pt"), str(tmp_path / "other.pt")
    for p, value in ((path, 1.0), (other, 2.0)):
        common.save_checkpoint(p, "distill", {}, "toy", {}, {"w": torch.full((3,), value)})
    loaded_id = common.file_id(path)
    real = torch.load

    def load_then_replace(*a, **k):  # another run renames its new checkpoint into place meanwhile
        ck = real(*a, **k)
        if os.path.exists(other):
            os.replace(other, path)
        return ck
    monkeypatch.setattr(torch, "load", load_then_replace)
    ck = common.load_checkpoint(path, "distill", "rerun")
    assert torch.equal(ck["state"]["w"], torch.ones(3)) and ck["id"] == loaded_id
    assert common.file_id(path) != loaded_id  # the file did change


# ----------------------------------------------------------------------------------
# 4. What the loader refuses in one line: not a regular file (a FIFO hangs an open), a record
#    edited by hand, weights that do not fit, NaN values

@pytest.fixture
def unblock():
    """unblock(fifo): from 10 s on, open the FIFO for writing again and again until the test
    ends, so that code that opened it for reading (and would wait for a writer forever) reads
    an end of file and goes on: the test fails instead of hanging. It fails too if that was
    ever needed."""
    stop, fired, threads = threading.Event(), [], []

    def start(fifo):
        def writer():
            stop.wait(10)
            while not stop.wait(0.2):
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    fired.append(fifo)
                except OSError:  # ENXIO: nobody is reading it
                    pass
        threads.append(threading.Thread(target=writer, daemon=True))
        threads[-1].start()
    yield start
    stop.set()
    for t in threads:
        t.join()
    assert not fired, f"the code under test opened {fired[0]} and waited for a writer"


def test_a_fifo_as_a_checkpoint_is_refused_without_opening_it(tmp_path, unblock):
    fifo = str(tmp_path / "01_student.pt")
    os.mkfifo(fifo)
    unblock(fifo)
    with pytest.raises(common.UserError) as e:
        common.load_checkpoint(fifo, "distill", "run 01_distill.py first")
    assert str(e.value) == f"{fifo} is a FIFO (named pipe), not a file: run 01_distill.py first"
    with pytest.raises(common.UserError, match="is a FIFO"):
        common.file_id(fifo)  # (a --clip-pretrained file, a --descriptions file)
    with pytest.raises(common.UserError, match="exists and is not a checkpoint"):
        common.check_output(fifo, "distill")  # a FIFO as --out


def test_a_fifo_as_the_teacher_file_is_one_line(tmp_path, capsys, unblock):
    fifo = str(tmp_path / "teacher.pt")
    os.mkfifo(fifo)
    unblock(fifo)
    code, _, err = run_stage(capsys, "01_distill", "--run", str(tmp_path / "run"), *TINY,
                             *TINY_STUDENT, "--clip-pretrained", fifo)
    one_line_error(code, err, f"{fifo} is a FIFO (named pipe), not a file")
    assert sorted(os.listdir(tmp_path)) == ["teacher.pt"]


def edit(path, change):
    ck = torch.load(path, weights_only=True)
    change(ck)
    torch.save(ck, path)


def set_nan(t):
    t[0] = float("nan")


# (what is edited, which file, the stage that reads it, what the line says)
SIZE_MISMATCH = "does not fit this code (RuntimeError: Error(s) in loading state_dict for "
EDITS = {
    "wrong-shape": (
        common.STUDENT, "03_bridge", SIZE_MISMATCH + "ResNet12: size mismatch for blocks.0.conv1",
        lambda ck: ck["state"]["student"].update({"blocks.0.conv1.weight": torch.zeros(2, 3, 3, 3)})
    ),
    "missing-weight": (
        common.STUDENT, "03_bridge", "Missing key(s) in state_dict",
        lambda ck: ck["state"]["student"].pop("blocks.0.bn1.weight")),
    "missing-record-key": (
        common.STUDENT, "03_bridge", "does not fit this code (KeyError: 'widths')",
        lambda ck: ck["config"].pop("widths")),
    "config-not-a-dict": (
        common.STUDENT, "03_bridge", "(config is not a dict: edited by hand?)",
        lambda ck: ck.update(config="widths=8,16,16,32")),
    "classes-not-lists": (
        common.SEMANTICS, "03_bridge", "(classes is not a list of names per split",
        lambda ck: ck["classes"].update(train="abc")),
    "no-state": (
        common.SEMANTICS, "03_bridge", "(state is not a dict of weights",
        lambda ck: ck.pop("state")),
    "bridge-wrong-shape": (
        common.BRIDGE, "04_classifier", SIZE_MISMATCH + "Bridge: size mismatch for h.0.weight",
        lambda ck: ck["state"].update({"h.0.weight": torch.zeros(1, 1)})),
    "nan-semantics": (
        common.SEMANTICS, "03_bridge", "holds NaN or infinite values (state.train): the stage that "
                                       "wrote it went wrong; delete it and run 02_mine.py",
        lambda ck: set_nan(ck["state"]["train"])),
    "inf-student": (
        common.STUDENT, "03_bridge", "holds NaN or infinite values (state.ce_head.bias)",
        lambda ck: ck["state"]["ce_head"]["bias"].fill_(float("inf"))),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_a_hand_edited_checkpoint_is_one_line_naming_it(tiny_stage3_run, tmp_path, capsys, case):
    name, reader, says, change = EDITS[case]
    run = copy_run(tiny_stage3_run, tmp_path / "run")
    os.remove(os.path.join(run, common.BRIDGE)) if reader == "03_bridge" else None
    path = os.path.join(run, name)
    edit(path, change)
    before = {f: common.file_id(os.path.join(run, f)) for f in os.listdir(run) if f != "cache"}
    short = ["--steps", "2"] if reader == "04_classifier" else ["--epochs", "1"]
    code, _, err = run_stage(capsys, reader, "--run", run, *TINY, *short)
    one_line_error(code, err, path, says)
    assert {f: common.file_id(os.path.join(run, f)) for f in before} == before
    assert sorted(os.listdir(run)) == sorted(["cache", *before])


def test_a_hand_edited_resume_file_is_one_line(tmp_path, capsys, monkeypatch):
    run, last = interrupted_after_epoch_1(capsys, monkeypatch, tmp_path, [*TINY, *TINY_STUDENT])
    edit(last, lambda ck: ck["state"]["opt"].pop("param_groups"))
    before = common.file_id(last)
    code, _, err = run_stage(capsys, "01_distill", "--run", run, *TINY, *TINY_STUDENT,
                             "--epochs", "2", "--resume")
    one_line_error(code, err, f"{last} does not fit this code (KeyError: 'param_groups'); "
                              f"delete it and rerun without --resume")
    assert common.file_id(last) == before and not os.path.exists(os.path.join(run, common.STUDENT))


# ----------------------------------------------------------------------------------
# 5. --resume with another --data-root: refused unless it holds the same data (the splits'
#    data ids, recorded with the flags), whatever path names it

def image_folder(root, seed):
    """A --dataset folder tree: 3 base classes x 8 images, 5 val and 2 test classes x 16."""
    g = torch.Generator().manual_seed(seed)
    for split, n_classes, n in (("train", 3, 8), ("val", 5, 16), ("test", 2, 16)):
        for c in range(n_classes):
            (root / split / f"class_{split}_{c}").mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / f"class_{split}_{c}" / f"{i}.png")
    return str(root)


FOLDER = ["--dataset", "folder", "--image-size", "16", "--distill-weight", "0",
          "--out", common.STUDENT, "--widths", "4,4,8,8", "--batch-size", "8",
          "--val-episodes", "5", "--val-every", "1", "--device", "cpu"]


def interrupted_after_epoch_1(capsys, monkeypatch, tmp_path, argv):
    """Stage 1 for 2 epochs, stopped by a Ctrl-C once epoch 1 is saved: (run, its .last.pt)."""
    run = str(tmp_path / "run")
    real = common.Resume.save

    def save_then_ctrl_c(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(common.Resume, "save", save_then_ctrl_c)
        code, _, err = run_stage(capsys, "01_distill", "--run", run, *argv, "--epochs", "2")
    assert code == 130, err
    return run, os.path.join(run, "01_student.last.pt")


def test_resume_refuses_another_data_root_with_other_data(tmp_path, capsys, monkeypatch):
    data = image_folder(tmp_path / "data", seed=0)
    run, last = interrupted_after_epoch_1(capsys, monkeypatch, tmp_path,
                                          [*FOLDER, "--data-root", data])
    other = image_folder(tmp_path / "other", seed=1)  # the same class folders, other images
    before = {f: common.file_id(os.path.join(run, f)) for f in os.listdir(run)}
    code, _, err = run_stage(capsys, "01_distill", "--run", run, *FOLDER, "--data-root", other,
                             "--epochs", "2", "--resume")
    one_line_error(code, err, f"{last} was made from other data than this run reads (--data-root "
                              f"{other} now, {data} then): resume with the data it was made from, "
                              f"or start over without --resume")
    # nothing changed or added (CE-only: no teacher features cached; the log of epoch 1 stays)
    assert {f: common.file_id(os.path.join(run, f)) for f in os.listdir(run)} == before
    assert sorted(before) == ["01_student.last.pt", "01_student_log.jsonl"]

    monkeypatch.chdir(tmp_path)  # the same folder by another path: resumed
    code, out, err = run_stage(capsys, "01_distill", "--run", run, *FOLDER, "--data-root", "data",
                               "--epochs", "2", "--resume")
    assert code == 0 and f"resumed from {last} at epoch 1" in out, err


# ----------------------------------------------------------------------------------
# 6. python -OO; printing that fails after the work is done

STAGES = ["01_distill.py", "02_mine.py", "03_bridge.py", "04_classifier.py", "05_eval.py"]


# every stage's --help in one `python -OO` process (one import of torch, not five)
HELP_OO = """
import runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        print(f"{script}: exit {e.code}", file=sys.stderr)
    except Exception as e:
        print(f"{script}: {type(e).__name__}", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def help_OO():
    proc = subprocess.run([sys.executable, "-OO", "-c", HELP_OO, *STAGES], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    return proc.stdout, proc.stderr.splitlines()


@pytest.mark.parametrize("script", STAGES)
def test_every_stage_runs_under_python_OO(help_OO, script):
    out, said = help_OO
    assert f"usage: {script} " in out and f"{script}: exit 0" in said, said


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_help_to_a_full_stdout_is_one_line():
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "03_bridge.py", "--help"], cwd=REPO,
                              env=subprocess_env(), stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    assert proc.returncode == 2 and proc.stderr == (
        "error: cannot print to stdout (No space left on device): what it printed is lost, but the "
        "command ran to the end and its files are written\n"), proc.stderr


def test_a_print_that_fails_does_not_stop_the_work(tmp_path, capsys, monkeypatch):
    class Full(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(sys, "stdout", Full())

    def main():
        print("epoch 1: loss 0.5")
        (tmp_path / "written").write_text("the work after the print")
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    assert e.value.code == 2 and (tmp_path / "written").exists()
    err = capsys.readouterr().err
    assert err.startswith("error: cannot print to stdout (No space left on device)"), err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("where", ["ascii", "/dev/full"])
def test_stage5_writes_its_files_when_its_table_cannot_be_printed(tiny_stage3_run, tmp_path, where):
    run = copy_run(tiny_stage3_run, tmp_path / "run")
    argv = [sys.executable, "05_eval.py", "--run", run, *TINY, "--episodes", "20"]
    env = subprocess_env(PYTHONIOENCODING="ascii") if where == "ascii" else subprocess_env()
    with open("/dev/full" if where == "/dev/full" else os.devnull, "w") as out:
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    one_line_error(proc.returncode, proc.stderr,
                   "stdout's encoding ascii cannot show '\\xb1' (it was printed escaped): set "
                   "PYTHONIOENCODING=utf-8" if where == "ascii"
                   else "cannot print to stdout (No space left on device)",
                   "the command ran to the end and its files are written")
    results = {f: open(os.path.join(run, f), encoding="utf-8").read()
               for f in ("results.json", "results.md")}
    assert '"rows"' in results["results.json"] and "±" in results["results.md"]


# ----------------------------------------------------------------------------------
# 7. A teacher file with other content now: named as such, also where stage 5 compares the
#    teacher of its flags with the one stage 2 mined with

def test_check_teacher_flags_names_a_teacher_file_with_other_content():
    made = {"name": "toy-clip-tiny", "pretrained": "t.pt", "file_id": "0123456789abcdef"}
    ck = {"teacher": made, "path": "run/02_semantics.pt"}
    common.check_teacher_flags(ck, dict(made))
    common.check_teacher_flags({"teacher": None, "path": "x.pt"}, made)  # none recorded: fits any
    with pytest.raises(common.UserError) as e:
        common.check_teacher_flags(ck, dict(made, file_id="fedcba9876543210"))
    assert str(e.value).endswith("the teacher file t.pt has other content now: rerun the stages "
                                 "from 01_distill.py")
    with pytest.raises(common.UserError) as e:
        common.check_teacher_flags(ck, {"name": "ViT-B-32", "pretrained": "openai", "file_id": ""})
    assert str(e.value).startswith("run/02_semantics.pt was made with teacher ")
    assert str(e.value).endswith(": pass the same --clip/--clip-pretrained")


def test_stage5_says_a_teacher_file_has_other_content_now(tiny_stage3_run, tmp_path, capsys):
    run = copy_run(tiny_stage3_run, tmp_path / "run")
    good = common.toy_teacher_file("toy-clip-tiny")
    tweaked = tmp_path / os.path.basename(good)  # the stages' file, by name, with one byte more
    tweaked.write_bytes(open(good, "rb").read() + b"\0")
    code, _, err = run_stage(capsys, "05_eval", "--run", run, *TINY, "--episodes", "20",
                             "--clip-pretrained", str(tweaked))
    one_line_error(code, err, f"the teacher file {tweaked.name} has other content now: rerun the "
                              f"stages from 01_distill.py")
    assert not os.path.exists(os.path.join(run, common.RESULTS))
