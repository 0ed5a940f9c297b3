"""Failure paths (issue 9): every user mistake or interruption ends in one line that says
what to do, and nothing is written half. The stages run in this process on the tiny toy
world (toy-tiny, toy-clip-tiny) with a tiny student; one run is a real subprocess that
gets a real SIGINT. Cases covered elsewhere: dataset root missing / wrong layout / class
folders not in the split lists (test_datasets.py), truncated, wrong-stage and
newer-format checkpoints and weights_only loading (test_common.py), language-model
failures and the API key never being written (test_mine.py)."""
import io
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
from conftest import one_line_error, run_stage, stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = ["--dataset", "toy-tiny", "--clip", "toy-clip-tiny"]
# a student small enough to train an epoch of toy-tiny (1280 images) in about a second
TINY01 = WORLD + ["--widths", "4,4,8,8", "--batch-size", "256", "--val-episodes", "10", "--val-every", "1",
                  "--epochs", "2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: faster on a shared 2-core machine, and the same float results in this
    process and in the subprocess (OMP_NUM_THREADS=1) that the resume test compares."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def copy_run(src, dst, *files):
    """A new run folder with the cached features of `src` (and some of its files)."""
    shutil.copytree(os.path.join(src, "cache"), os.path.join(dst, "cache"))
    for f in files:
        shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    return str(dst)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """An uninterrupted 2-epoch stage-1 run: the reference of the resume test and the
    upstream of the later stages."""
    run = str(tmp_path_factory.mktemp("base"))
    stage("01_distill").main(["--run", run] + TINY01)
    return run


def fake_semantics(run, teacher, classes=None, name=common.SEMANTICS):
    """A stage-2 checkpoint with random class vectors (stage 3 and 4 only need its shapes)."""
    classes = classes or common.class_names("toy-tiny")
    g = torch.Generator().manual_seed(0)
    state = {s: torch.randn(len(classes[s]), 16, generator=g) for s in common.SPLITS}
    common.save_checkpoint(os.path.join(run, name), "mine", {}, "toy-tiny", classes, state, teacher=teacher)


@pytest.fixture(scope="module")
def full_run(base_run, tmp_path_factory):
    """Stages 1 (copied), 2 (fake vectors) and 3 (one epoch): the upstream of stage 4 and 5."""
    run = copy_run(base_run, tmp_path_factory.mktemp("full"), common.STUDENT)
    fake_semantics(run, torch.load(os.path.join(run, common.STUDENT), weights_only=True)["teacher"])
    stage("03_bridge").main(["--run", run] + WORLD + ["--epochs", "1", "--val-episodes", "10", "--hidden", "16"])
    return run


# ----------------------------------------------------------------------------------
# run_main: Ctrl-C anywhere, and a UserError raised inside a DataLoader worker

def test_keyboard_interrupt_anywhere_is_one_line_and_exit_code_130(capsys):
    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    assert e.value.code == 130
    assert capsys.readouterr().err == f"interrupted: {common.INTERRUPTED}\n"

    def main_with_hint():
        common.on_interrupt(lambda: "epoch 3 is kept in x.pt: rerun with --resume")
        raise KeyboardInterrupt
    with pytest.raises(SystemExit):
        common.run_main(main_with_hint)
    assert capsys.readouterr().err == "interrupted: epoch 3 is kept in x.pt: rerun with --resume\n"
    with pytest.raises(SystemExit):
        common.run_main(main)  # a hint does not outlive its run
    assert capsys.readouterr().err == f"interrupted: {common.INTERRUPTED}\n"


def test_interrupted_text_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    common.atomic_write_text("old\n", str(path))

    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)  # Ctrl-C between writing and renaming
    with pytest.raises(KeyboardInterrupt):
        common.atomic_write_text("new\n", str(path))
    assert os.listdir(tmp_path) == ["results.json"] and path.read_text() == "old\n"


# ----------------------------------------------------------------------------------
# Datasets

def image_split(tmp_path):
    """A file-based split of two images, the second not an image at all."""
    good, bad = tmp_path / "a_0.png", tmp_path / "a_1.jpg"
    Image.new("RGB", (12, 10), (200, 30, 30)).save(good)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 90, 200)).save(buf, "JPEG")
    bad.write_bytes(buf.getvalue()[:200])  # a truncated download
    return common.Split("tiered-imagenet", "train", ["a"], torch.tensor([0, 0]), paths=[str(good), str(bad)], size=8)


def test_corrupt_image_met_while_training_is_named(tmp_path, capsys):
    split = image_split(tmp_path)
    assert split.student_batch([0]).shape == (1, 3, 8, 8)
    with pytest.raises(common.UserError, match=f"cannot read image {split.paths[1]} .OSError.: replace or delete"):
        split.student_batch([1])

    def main():  # the same file met by a DataLoader worker process (01_distill.py --workers N)
        for _ in torch.utils.data.DataLoader(common.StudentImages(split), batch_size=2, num_workers=1):
            pass
    with pytest.raises(SystemExit):
        common.run_main(main)
    one_line_error(2, capsys.readouterr().err, f"cannot read image {split.paths[1]} (OSError)")


def short_class_split(split):
    """`split` with class 3 cut to 10 images."""
    keep = torch.ones(len(split), dtype=torch.bool)
    keep[torch.nonzero(split.labels == 3).flatten()[10:]] = False
    return common.Split(split.dataset, split.split, split.classes, split.labels[keep], images=split.images[keep],
                        size=split.size, ids=split.ids)


def test_class_with_fewer_images_than_an_episode_needs_is_named(tiny_val):
    short = short_class_split(tiny_val)
    with pytest.raises(common.UserError) as e:
        common.check_episodes(short, 5, "1,5", 15, "--shots")
    assert str(e.value) == (f"toy-tiny val class '{tiny_val.classes[3]}' has 10 images; 5-shot episodes with 15 "
                            f"queries need 20: lower --shots")
    with pytest.raises(common.UserError, match="17-way episodes need 17 classes; toy-tiny val has 16: lower --n-way"):
        common.check_episodes(tiny_val, 17, 1, 15, "--n-way")
    with pytest.raises(common.UserError, match="'1,x' is not a comma-separated list"):
        common.check_episodes(tiny_val, 5, "1,x", 15, "--shots")
    assert common.check_episodes(tiny_val, 5, "1,5", 15, "--shots") == [1, 5]


def test_stage1_refuses_a_val_split_too_small_for_its_episodes_before_training(tmp_path, capsys, monkeypatch):
    load = common.load_split
    monkeypatch.setattr(common, "load_split", lambda d, s, r=None, size=None: short_class_split(load(d, s, r)) if s == "val"
                        else load(d, s, r))
    code, out, err = run_stage(capsys, "01_distill", "--run", str(tmp_path), *TINY01)
    one_line_error(code, err, f"toy-tiny val class '{common.class_names('toy-tiny')['val'][3]}' has 10 images",
                   "need 16: the dataset is incomplete")
    assert os.listdir(tmp_path) == []  # not even the teacher's features: refused before anything


# ----------------------------------------------------------------------------------
# Arguments: each refused in one line before anything is trained or written

@pytest.mark.parametrize("argv,parts", [
    (["--dataset", "no-such"], ["unknown dataset 'no-such'", "toy-tiny", "mini-imagenet"]),
    (["--dataset", "mini-imagenet", "--data-root", "/no/such/folder", "--clip", "RN50", "--clip-pretrained", "random"],
     ["/no/such/folder is not a folder"]),
    (["--clip", "no-such-clip"], ["unknown teacher 'no-such-clip'", "toy-clip-tiny", "ViT-B-32"]),
    (["--batch-size", "5000"], ["--batch-size 1 to 1280"]),
    (["--epochs", "0"], ["--epochs 0 is out of range", "[1, inf)"]),
])
def test_stage1_bad_arguments(tmp_path, capsys, argv, parts):
    code, out, err = run_stage(capsys, "01_distill", "--run", str(tmp_path), *TINY01, *argv)
    one_line_error(code, err, *parts)
    assert not os.path.exists(tmp_path / common.STUDENT) and not os.path.exists(tmp_path / "01_student.last.pt")


def test_stage4_refuses_ways_and_shots_the_split_cannot_supply(full_run, capsys):
    classes = common.class_names("toy-tiny")
    code, _, err = run_stage(capsys, "04_classifier", "--run", full_run, *WORLD, "--n-way", "65")
    # stage 4's episodes are the held-out base images (24 per class in toy-tiny)
    one_line_error(code, err, "65-way episodes need 65 classes; toy-tiny heldout has 64: lower --n-way")
    code, _, err = run_stage(capsys, "04_classifier", "--run", full_run, *WORLD, "--shots", "1,10")
    one_line_error(code, err, f"toy-tiny heldout class '{classes['train'][0]}' has 24 images; 10-shot episodes with "
                              f"15 queries need 25: lower --n-way, --shots or --n-query")
    code, _, err = run_stage(capsys, "04_classifier", "--run", full_run, *WORLD, "--steps", "0")
    one_line_error(code, err, "--steps 0 is out of range", "[1, inf)")
    assert not os.path.exists(os.path.join(full_run, common.CLASSIFIER))


def test_stage5_refuses_ways_shots_and_queries_the_split_cannot_supply(full_run, capsys):
    for argv, part in [(["--shots", "1,10"], "10-shot episodes with 15 queries need 25"),
                       (["--n-query", "30"], "5-shot episodes with 30 queries need 35"),
                       (["--n-way", "21"], "21-way episodes need 21 classes; toy-tiny test has 20")]:
        code, _, err = run_stage(capsys, "05_eval", "--run", full_run, *WORLD, *argv)
        one_line_error(code, err, part, "lower --n-way, --shots or --n-query")
    assert not os.path.exists(os.path.join(full_run, common.RESULTS))


def test_stage2_refuses_compare_episodes_the_split_cannot_supply(tmp_path, capsys):
    code, _, err = run_stage(capsys, "02_mine", "--run", str(tmp_path), *WORLD, "--llm", "toy", "--compare",
                             "--ways", "21", "--split", "test")
    one_line_error(code, err, "21-way episodes need 21 classes; toy-tiny test has 20: lower --ways or --queries")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------
# Checkpoints: a stage refuses upstream files it cannot use, in one line

def test_upstream_not_run_yet(tmp_path, capsys):
    for name, missing, hint in [("03_bridge", common.STUDENT, "run 01_distill.py"),
                                ("04_classifier", common.STUDENT, "run 01_distill.py"),
                                ("05_eval", common.STUDENT, "run 01_distill.py")]:
        code, _, err = run_stage(capsys, name, "--run", str(tmp_path), *WORLD)
        one_line_error(code, err, f"{tmp_path / missing} not found: {hint} --run {tmp_path} first")


def test_upstream_of_another_dataset_class_list_or_teacher(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path / "run", common.STUDENT)
    teacher = torch.load(os.path.join(run, common.STUDENT), weights_only=True)["teacher"]
    bridge = ["--run", run] + WORLD + ["--epochs", "1", "--val-episodes", "10", "--hidden", "16"]
    fake_semantics(run, teacher)
    code, _, err = run_stage(capsys, "03_bridge", *bridge[:2], "--dataset", "toy", *bridge[4:])
    one_line_error(code, err, "was built on dataset 'toy-tiny', not 'toy'")
    other = common.class_names("toy-tiny")
    other["test"] = other["test"][::-1]
    fake_semantics(run, teacher, other)
    code, _, err = run_stage(capsys, "03_bridge", *bridge)
    one_line_error(code, err, f"{os.path.join(run, common.SEMANTICS)} was built with other class names")
    fake_semantics(run, dict(teacher, name="ViT-B-32", pretrained="openai", file_id=""))
    code, _, err = run_stage(capsys, "03_bridge", *bridge)
    one_line_error(code, err, "with teacher", "ViT-B-32", "rerun the stages with the same --clip/--clip-pretrained")
    assert not os.path.exists(os.path.join(run, common.BRIDGE))


@pytest.mark.parametrize("damage", ["older-format", "no-format", "truncated"])
def test_upstream_checkpoint_of_an_older_format_or_truncated(base_run, tmp_path, capsys, damage):
    path = tmp_path / common.STUDENT
    shutil.copy(os.path.join(base_run, common.STUDENT), path)
    ck = torch.load(path, weights_only=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    else:
        if damage == "older-format":
            ck["format"] = common.FORMAT_VERSION - 1
        else:
            del ck["format"]
        torch.save(ck, path)
    code, _, err = run_stage(capsys, "03_bridge", "--run", str(tmp_path), *WORLD)
    found = {"older-format": f"format {common.FORMAT_VERSION - 1}", "no-format": "format None",
             "truncated": "is not a readable checkpoint"}[damage]
    one_line_error(code, err, str(path), found, "run 01_distill.py")


def test_stage5_refuses_a_bridge_built_on_an_earlier_student(full_run, tmp_path, capsys):
    run = copy_run(full_run, tmp_path / "run", common.SEMANTICS, common.BRIDGE)
    ck = torch.load(os.path.join(full_run, common.STUDENT), weights_only=True)
    ck["seconds"] += 1  # stage 1 rerun since stage 3: another file
    torch.save(ck, os.path.join(run, common.STUDENT))
    code, _, err = run_stage(capsys, "05_eval", "--run", run, *WORLD)
    one_line_error(code, err, f"was built on another {common.STUDENT} than the one there now")
    assert not os.path.exists(os.path.join(run, common.RESULTS))


def test_stage5_refuses_a_classifier_an_older_version_wrote(full_run, tmp_path, capsys):
    run = copy_run(full_run, tmp_path / "run", common.STUDENT, common.SEMANTICS, common.BRIDGE)
    stage("04_classifier").main(["--run", run] + WORLD + ["--steps", "2", "--val-every", "1", "--val-episodes", "10"])
    path = os.path.join(run, common.CLASSIFIER)
    ck = torch.load(path, weights_only=True)
    ck["state"]["model"]["gate.0.weight"] = torch.zeros(256, 385)  # the first version's gate saw the weights
    torch.save(ck, path)
    code, _, err = run_stage(capsys, "05_eval", "--run", run, *WORLD)
    one_line_error(code, err, path, "does not fit this code's classifier", "rerun 04_classifier.py")
    assert not os.path.exists(os.path.join(run, common.RESULTS))


# ----------------------------------------------------------------------------------
# Training: a NaN or infinite loss stops the stage; nothing garbage is written

def test_stage1_nan_reports_step_and_last_finite_loss_and_keeps_the_last_good_epoch(base_run, tmp_path, capsys,
                                                                                   monkeypatch):
    distill = stage("01_distill")
    real, calls, kept = distill.info_nce, [], {}
    last = tmp_path / "01_student.last.pt"

    def info_nce(*a):  # 5 steps an epoch: the 7th step is epoch 2 step 2
        calls.append(1)
        if len(calls) == 7:
            kept["id"] = common.file_id(last)
            return torch.tensor(float("inf"))
        return real(*a)
    monkeypatch.setattr(distill, "info_nce", info_nce)
    code, out, err = run_stage(capsys, "01_distill", "--run", copy_run(base_run, tmp_path), *TINY01)
    one_line_error(code, err, "loss became inf at epoch 2 step 2 (last finite loss ",
                   f"): lower --lr; the last good epoch is kept in {last}")
    assert float(err.split("last finite loss ")[1].split(")")[0]) > 0
    assert common.file_id(last) == kept["id"]  # untouched since epoch 1
    assert common.load_checkpoint(str(last), "distill-last", "")["epoch"] == 1
    assert not os.path.exists(tmp_path / common.STUDENT)


def test_stage1_nan_on_the_first_step_says_nothing_was_written(base_run, tmp_path, capsys, monkeypatch):
    distill = stage("01_distill")
    monkeypatch.setattr(distill, "info_nce", lambda *a: torch.tensor(float("nan")))
    code, _, err = run_stage(capsys, "01_distill", "--run", copy_run(base_run, tmp_path), *TINY01)
    one_line_error(code, err, "loss became nan at epoch 1 step 1 (last finite loss none yet): lower --lr; "
                              "no checkpoint was written")
    assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_stage3_nan_writes_no_bridge(base_run, tmp_path, capsys, monkeypatch):
    run = copy_run(base_run, tmp_path, common.STUDENT)
    fake_semantics(run, torch.load(os.path.join(run, common.STUDENT), weights_only=True)["teacher"])
    monkeypatch.setattr(stage("03_bridge"), "cos_loss", lambda a, b: torch.tensor(float("nan")))
    code, _, err = run_stage(capsys, "03_bridge", "--run", run, *WORLD, "--epochs", "2", "--val-episodes", "10")
    one_line_error(code, err, "loss became nan", "lower --lr")
    assert not os.path.exists(os.path.join(run, common.BRIDGE))


def test_stage4_nan_writes_no_classifier(full_run, capsys, monkeypatch):
    clf = stage("04_classifier").FewShotClassifier
    real = clf.logits
    monkeypatch.setattr(clf, "logits", lambda self, q, w: real(self, q, w) * float("nan"))
    code, _, err = run_stage(capsys, "04_classifier", "--run", full_run, *WORLD, "--steps", "3", "--val-every", "1",
                             "--val-episodes", "10", "--hidden", "16")
    one_line_error(code, err, "loss became nan", "lower --lr")
    assert not os.path.exists(os.path.join(full_run, common.CLASSIFIER))


def test_stage1_ctrl_c_in_the_first_epoch_says_there_is_nothing_to_resume(base_run, tmp_path, capsys, monkeypatch):
    def info_nce(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(stage("01_distill"), "info_nce", info_nce)
    code, _, err = run_stage(capsys, "01_distill", "--run", copy_run(base_run, tmp_path), *TINY01)
    assert code == 130 and "Traceback" not in err, err
    assert err.replace("\r", "\n").rstrip().split("\n")[-1] == "interrupted: no epoch had finished, nothing to resume: rerun"
    assert sorted(os.listdir(tmp_path)) == ["cache"]


# ----------------------------------------------------------------------------------
# Ctrl-C mid-epoch, then --resume: the same student as an uninterrupted run

# The child runs stage 1 and sends itself the signal at a fixed point (epoch 2, step 2: 5
# steps an epoch), so nothing depends on timing; it starts with SIGINT ignored, as under
# `cmd &` in a script or nohup, so the stage must restore Ctrl-C itself.
CHILD = """
import os, signal, sys
import common
distill = __import__("01_distill")
real, calls = distill.info_nce, []
def info_nce(*a):
    calls.append(1)
    if len(calls) == 7:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real(*a)
distill.info_nce = info_nce
common.run_main(lambda: distill.main(sys.argv[2:]))
"""


def interrupt_stage1(run, signame):
    """Run stage 1 in a child that gets `signame` mid-epoch 2: (exit code, stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", SYNTRANS_CACHE=os.path.join(REPO, ".cache", "tests"),
               OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", CHILD, signame, "--run", run, *TINY01], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    return proc.returncode, proc.stderr


def test_sigterm_mid_epoch_is_one_line_and_leaves_no_temporary_file(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    code, err = interrupt_stage1(run, "SIGTERM")
    last = os.path.join(run, "01_student.last.pt")
    assert code == 143 and err == f"interrupted: the last completed epoch is kept in {last}: rerun the same " \
                                  f"command with --resume to continue\n", err
    assert sorted(os.listdir(run)) == ["01_student.last.pt", "01_student_log.jsonl", "cache"]  # + its log


def test_sigint_mid_epoch_then_resume_gives_the_uninterrupted_result(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path / "run")
    last = os.path.join(run, "01_student.last.pt")
    code, err = interrupt_stage1(run, "SIGINT")
    assert code == 130, err
    assert err == f"interrupted: the last completed epoch is kept in {last}: rerun the same command with --resume " \
                  f"to continue\n"
    assert common.load_checkpoint(last, "distill-last", "")["epoch"] == 1
    assert not os.path.exists(os.path.join(run, common.STUDENT))

    # resuming with other flags is refused (it would be neither run), and changes nothing
    before = common.file_id(last)
    code, _, err = run_stage(capsys, "01_distill", "--run", run, *TINY01, "--resume", "--lr", "0.1")
    one_line_error(code, err, f"{last} was made with --lr 0.05, not 0.1: resume with the same flags")
    assert common.file_id(last) == before

    code, out, err = run_stage(capsys, "01_distill", "--run", run, *TINY01, "--resume")
    assert code == 0, err
    assert f"resumed from {last} at epoch 1" in out
    ref = torch.load(os.path.join(base_run, common.STUDENT), weights_only=True)
    got = torch.load(os.path.join(run, common.STUDENT), weights_only=True)
    assert got["history"] == ref["history"] and got["best_acc"] == ref["best_acc"]
    for part in ("student", "ce_head", "proj"):
        assert ref["state"][part].keys() == got["state"][part].keys()
        for k, v in ref["state"][part].items():
            assert torch.equal(v, got["state"][part][k]), (part, k)


# ----------------------------------------------------------------------------------
# Issue 15: every numeric flag, the run folder and the output name are checked before
# any work; nothing is created, not even the run folder

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA GPU")


@pytest.mark.parametrize("name,argv,parts", [
    ("01_distill", ["--distill-weight", "-1"], ["--distill-weight -1.0 is out of range", "[0, inf)"]),
    ("01_distill", ["--distill-weight", "nan"], ["--distill-weight nan is out of range"]),
    ("01_distill", ["--drop-rate", "2"], ["--drop-rate 2.0 is out of range", "[0, 1)"]),
    ("01_distill", ["--val-episodes", "0"], ["--val-episodes 0 is out of range"]),
    ("01_distill", ["--val-every", "0"], ["--val-every 0 is out of range"]),
    ("01_distill", ["--lr", "-1"], ["--lr -1.0 is out of range", "(0, inf)"]),
    ("01_distill", ["--weight-decay", "-1"], ["--weight-decay -1.0 is out of range"]),
    ("01_distill", ["--temperature", "0"], ["--temperature 0.0 is out of range"]),
    ("01_distill", ["--seed", "-1"], ["--seed -1 is out of range"]),
    ("01_distill", ["--workers", "-1"], ["--workers -1 is out of range"]),
    ("01_distill", ["--widths", "a,b"], ["--widths: 'a,b' is not a comma-separated list of four channel counts"]),
    ("01_distill", ["--widths", "16,32"], ["--widths: '16,32' is not"]),
    ("01_distill", ["--device", "gpu"], ["--device 'gpu' is not a device: use cpu or cuda"]),
    pytest.param("01_distill", ["--device", "cuda"], ["--device cuda, but torch sees 0 usable CUDA GPU(s)"],
                 marks=NO_CUDA),
    ("01_distill", ["--out", "student"], ["--out 'student' is not a checkpoint file name"]),
    ("02_mine", ["--image-weight", "nan"], ["--image-weight nan is out of range"]),
    ("02_mine", ["--toy-wrong-rate", "2"], ["--toy-wrong-rate 2.0 is out of range", "[0, 1]"]),
    ("02_mine", ["--toy-n", "-5"], ["--toy-n -5 is out of range"]),
    ("02_mine", ["--toy-misread-rate", "-1"], ["--toy-misread-rate -1.0 is out of range"]),
    ("02_mine", ["--compare", "--episodes", "0"], ["--episodes 0 is out of range"]),
    ("02_mine", ["--llm-retries", "-1"], ["--llm-retries -1 is out of range"]),
    ("02_mine", ["--llm-timeout", "-1"], ["--llm-timeout -1.0 is out of range"]),
    ("02_mine", ["--out", ""], ["--out '' is not a checkpoint file name"]),
    ("03_bridge", ["--hidden", "0"], ["--hidden 0 is out of range"]),
    ("03_bridge", ["--mix", "nan"], ["--mix nan is out of range"]),
    ("03_bridge", ["--batch-size", "0"], ["--batch-size 0 is out of range"]),
    ("03_bridge", ["--dropout", "1.5"], ["--dropout 1.5 is out of range"]),
    ("03_bridge", ["--lr", "nan"], ["--lr nan is out of range"]),
    ("03_bridge", ["--lr", "-1"], ["--lr -1.0 is out of range"]),
    ("03_bridge", ["--val-episodes", "0"], ["--val-episodes 0 is out of range"]),
    ("03_bridge", ["--out", ""], ["--out '' is not a checkpoint file name"]),
    ("04_classifier", ["--episodes-per-step", "0"], ["--episodes-per-step 0 is out of range"]),
    ("04_classifier", ["--val-episodes", "0"], ["--val-episodes 0 is out of range"]),
    ("04_classifier", ["--lr", "nan"], ["--lr nan is out of range"]),
    ("04_classifier", ["--lr", "-1"], ["--lr -1.0 is out of range"]),
    ("04_classifier", ["--hidden", "-1"], ["--hidden -1 is out of range"]),
    ("04_classifier", ["--gate-lr", "nan"], ["--gate-lr nan is out of range"]),
    ("05_eval", ["--episodes", "0"], ["--episodes 0 is out of range"]),
    ("05_eval", ["--episodes", "-5"], ["--episodes -5 is out of range"]),
    ("05_eval", ["--batch", "0"], ["--batch 0 is out of range"]),
    ("05_eval", ["--mixes", "x"], ["--mixes: 'x' is not a comma-separated list of fusion coefficients"]),
    ("05_eval", ["--mixes", ""], ["--mixes: '' is not a comma-separated list"]),
    ("05_eval", ["--shots", "1,x"], ["--shots: '1,x' is not a comma-separated list of shot counts"]),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, name, argv, parts):
    run = tmp_path / "run"
    code, _, err = run_stage(capsys, name, "--run", str(run), *WORLD, *argv)
    one_line_error(code, err, *parts)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["01_distill", "02_mine", "03_bridge", "04_classifier", "05_eval"])
@pytest.mark.parametrize("where", ["a-file", "under-a-file", "read-only"])
def test_a_run_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, name, where):
    (tmp_path / "f").write_text("x")
    run = {"a-file": tmp_path / "f", "under-a-file": tmp_path / "f" / "run", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":
        run.mkdir()
        run.chmod(0o555)
        if os.access(run, os.W_OK):  # root writes anywhere: simulate the read-only folder
            def refused(*a, **k):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr(common.tempfile, "TemporaryFile", refused)
    code, _, err = run_stage(capsys, name, "--run", str(run), *WORLD)
    one_line_error(code, err, *(["cannot be written (Permission denied): choose a folder you can write to"]
                                if where == "read-only" else [f"{tmp_path / 'f'} is a file, not a folder"]))
    assert sorted(os.listdir(tmp_path)) == (["f", "ro"] if where == "read-only" else ["f"])
    assert (tmp_path / "f").read_text() == "x" and (where != "read-only" or os.listdir(run) == [])
    run.chmod(0o755) if where == "read-only" else None


def disk_full(monkeypatch, after=0):
    """Every file written for writing ('wb') fails as on a full disk (a 2 MB tmpfs as --run
    shows the same; mounting one needs root, so it is simulated here)."""
    real = open

    def fake_open(path, mode="r", *a, **k):
        f = real(path, mode, *a, **k)
        if "w" in mode:
            def write(data):
                raise OSError(28, "No space left on device")
            f.write = write
        return f
    monkeypatch.setattr(common, "open", fake_open, raising=False)


def test_disk_full_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    common.atomic_write_text("old\n", str(tmp_path / "results.json"))
    disk_full(monkeypatch)
    for write in (lambda: common.atomic_save({"x": torch.zeros(3)}, str(tmp_path / "a.pt")),
                  lambda: common.atomic_write_text("new\n", str(tmp_path / "results.json"))):
        with pytest.raises(common.UserError, match="No space left on device .the disk is full: free some space.; "
                                                    "nothing was changed there"):
            write()
    assert os.listdir(tmp_path) == ["results.json"] and (tmp_path / "results.json").read_text() == "old\n"


def test_stage3_on_a_full_disk_says_so_in_one_line(full_run, tmp_path, capsys, monkeypatch):
    run = copy_run(full_run, tmp_path / "run", common.STUDENT, common.SEMANTICS)
    before = sorted(os.listdir(run))
    disk_full(monkeypatch)
    code, _, err = run_stage(capsys, "03_bridge", "--run", run, *WORLD, "--epochs", "1", "--val-episodes", "10",
                             "--hidden", "16")
    one_line_error(code, err, f"cannot write {os.path.join(run, common.BRIDGE)}: No space left on device (the disk "
                              f"is full")
    assert sorted(os.listdir(run)) == before


@pytest.mark.parametrize("name,out,argv", [
    ("02_mine", common.STUDENT, ["--sources", "templates"]),
    ("03_bridge", common.STUDENT, []),
    ("04_classifier", common.BRIDGE, []),
    ("01_distill", common.SEMANTICS, []),
])
def test_a_stage_does_not_replace_another_stages_checkpoint(full_run, tmp_path, capsys, name, out, argv):
    run = copy_run(full_run, tmp_path / "run", common.STUDENT, common.SEMANTICS, common.BRIDGE)
    before = {f: common.file_id(os.path.join(run, f)) for f in (common.STUDENT, common.SEMANTICS, common.BRIDGE)}
    code, _, err = run_stage(capsys, name, "--run", run, *WORLD, "--out", out, *argv)
    one_line_error(code, err, f"{os.path.join(run, out)} exists and is a checkpoint of stage",
                   "choose another --out, or delete the file first")
    assert {f: common.file_id(os.path.join(run, f)) for f in before} == before
    assert sorted(os.listdir(run)) == sorted(["cache", *before])


# ----------------------------------------------------------------------------------
# Issue 15: what the stages read: a CIFAR pickle runs nothing, a damaged teacher file,
# descriptions files that are folders, damaged or hold one enormous word

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_cifar_pickle_runs_nothing(tmp_path, capsys):
    import pickle
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": Payload(marker)}))
    code, _, err = run_stage(capsys, "01_distill", "--run", str(tmp_path / "run"), "--dataset", "cifar-fs",
                             "--data-root", str(tmp_path), "--distill-weight", "0")  # CE-only: no teacher needed
    one_line_error(code, err, f"{folder / 'meta'} is not a CIFAR-100 python-version pickle (UnpicklingError: it asks "
                              f"to run posix.system, which no CIFAR-100 file holds)")
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == ["cifar-100-python"]


@pytest.mark.parametrize("damage", ["empty", "random-bytes", "truncated"])
@pytest.mark.parametrize("where", ["--clip-pretrained", "$SYNTRANS_CACHE"])
def test_a_damaged_teacher_file_is_one_line(tmp_path, capsys, monkeypatch, damage, where):
    good = common.toy_teacher_file("toy-clip-tiny")  # the tests' cached toy teacher
    cache = tmp_path / "cache"
    path = cache / os.path.basename(good) if where == "$SYNTRANS_CACHE" else tmp_path / "teacher.pt"
    cache.mkdir()
    path.write_bytes({"empty": b"", "random-bytes": os.urandom(5000),
                      "truncated": open(good, "rb").read()[:20000]}[damage])
    monkeypatch.setenv("SYNTRANS_CACHE", str(cache))
    argv = ["--clip-pretrained", str(path)] if where == "--clip-pretrained" else []
    code, _, err = run_stage(capsys, "01_distill", "--run", str(tmp_path / "run"), *TINY01, *argv)
    one_line_error(code, err, f"{path} is not a readable weights file of toy-clip (",
                   "it is trained again on the next run" if where == "$SYNTRANS_CACHE" else "pass a good weights file")
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


@pytest.mark.parametrize("content,parts", [
    (None, ["not found (it is a folder)"]),
    ({"splits": {"train": {"a": "not a dict"}}}, ["looks like a 02_descriptions.json but is damaged"]),
    ({"splits": {"train": {"a": {"candidates": [1, 2]}}}}, ["looks like a 02_descriptions.json but is damaged"]),
    ({"splits": {"train": {"a": {"candidates": [{"kept": True}]}}}}, ["looks like a 02_descriptions.json"]),
    ({"splits": {"train": ["a"]}}, ["looks like a 02_descriptions.json but is damaged"]),
])
def test_stage2_refuses_descriptions_that_are_folders_or_damaged(tmp_path, capsys, content, parts):
    import json
    path = tmp_path / "d.json"
    path.mkdir() if content is None else path.write_text(json.dumps(content))
    code, _, err = run_stage(capsys, "02_mine", "--run", str(tmp_path / "run"), *WORLD, "--sources",
                             "templates,files", "--descriptions", str(path))
    one_line_error(code, err, f"--descriptions {path}", *parts)
    assert sorted(os.listdir(tmp_path)) == ["d.json"]


def test_an_enormous_description_is_cut_before_clips_tokenizer(toy_teacher):
    model, _, tokenizer, _ = toy_teacher
    word = "stripe" * 200_000  # 1.2 MB in one word: hours in the tokenizer if not cut first
    mine = stage("02_mine")
    assert torch.equal(mine.encode_texts(model, tokenizer, [word, "a red circle"], "cpu"),
                       mine.encode_texts(model, tokenizer, [word[:mine.TEXT_CHARS], "a red circle"], "cpu"))


# ----------------------------------------------------------------------------------
# Issue 15: messages that said the wrong thing

def test_ctrl_c_beside_an_older_runs_resume_file_does_not_advise_resume(base_run, tmp_path, capsys, monkeypatch):
    run = copy_run(base_run, tmp_path / "run")
    last = os.path.join(run, "01_student.last.pt")
    shutil.copy(os.path.join(base_run, "01_student.last.pt"), last)  # an older run, with --lr 0.05

    def info_nce(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(stage("01_distill"), "info_nce", info_nce)
    before = common.file_id(last)
    code, _, err = run_stage(capsys, "01_distill", "--run", run, *TINY01, "--lr", "0.1")
    assert code == 130, err
    last_line = err.replace("\r", "\n").rstrip().split("\n")[-1]
    assert last_line == "interrupted: no epoch had finished, nothing to resume: rerun"
    assert common.file_id(last) == before


def test_the_resume_file_lies_beside_the_result_whatever_the_run_folder_is_called(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path / "my.pt.run")
    code, _, err = run_stage(capsys, "01_distill", "--run", run, *TINY01, "--epochs", "1")
    assert code == 0, err
    assert sorted(os.listdir(run)) == ["01_student.last.pt", "01_student.pt", "01_student_log.jsonl",
                                       "cache"]
    assert sorted(os.listdir(tmp_path)) == ["my.pt.run"]


def test_stage5_names_the_file_it_refuses(full_run, tmp_path, capsys):
    run = copy_run(full_run, tmp_path / "run", common.STUDENT, common.SEMANTICS, common.BRIDGE)
    ck = torch.load(os.path.join(run, common.BRIDGE), weights_only=True)
    ck["dataset"] = "toy"
    torch.save(ck, os.path.join(run, common.BRIDGE))
    code, _, err = run_stage(capsys, "05_eval", "--run", run, *WORLD)
    one_line_error(code, err, f"{os.path.join(run, common.BRIDGE)} was built on dataset 'toy'")
    (tmp_path / "run" / common.BRIDGE).write_bytes(b"garbage")
    code, _, err = run_stage(capsys, "05_eval", "--run", run, *WORLD)
    err = one_line_error(code, err, f"{os.path.join(run, common.BRIDGE)} is not a readable checkpoint")
    assert err.endswith("delete it and rerun the stage that writes it (or leave it deleted: its rows are then skipped)")
    assert not os.path.exists(os.path.join(run, common.RESULTS))


def test_a_teacher_file_replaced_since_says_to_rerun_not_to_pass_the_same_flags(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path / "run", common.STUDENT)
    teacher = torch.load(os.path.join(run, common.STUDENT), weights_only=True)["teacher"]
    fake_semantics(run, dict(teacher, file_id="0123456789abcdef"))  # the same flags, another file content
    code, _, err = run_stage(capsys, "03_bridge", "--run", run, *WORLD)
    one_line_error(code, err, f"the teacher file {teacher['pretrained']} has other content now: rerun the stages "
                              f"from 01_distill.py")


# ----------------------------------------------------------------------------------
# Issue 15: the two files of one result (02_semantics.pt + 02_descriptions.json,
# results.json + results.md) always describe the same run

def test_ctrl_c_between_the_two_renames_waits_until_both_are_done(tmp_path, monkeypatch):
    a, b = str(tmp_path / "results.json"), str(tmp_path / "results.md")
    common.write_files({a: b"old", b: b"old"})
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the first rename
    monkeypatch.setattr(os, "replace", replace)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest may run with SIGINT ignored
    try:
        with pytest.raises(KeyboardInterrupt):
            common.write_files({a: b"new", b: b"new"})
    finally:
        signal.signal(signal.SIGINT, before)
    assert open(a, "rb").read() == open(b, "rb").read() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]


def test_a_failed_second_file_leaves_both_as_they_were(tmp_path, monkeypatch):
    a, b = str(tmp_path / "02_semantics.pt"), str(tmp_path / "02_descriptions.json")
    common.atomic_save({"x": 1}, a, together={b: "old"})
    real = open

    def fake_open(path, mode="r", *args, **kw):
        if path.endswith("02_descriptions.json"):  # its temporary file
            raise OSError(28, "No space left on device")
        return real(path, mode, *args, **kw)
    monkeypatch.setattr(common, "open", fake_open, raising=False)
    with pytest.raises(common.UserError, match=f"cannot write {b}: No space left on device"):
        common.atomic_save({"x": 2}, a, together={b: "new"})
    assert torch.load(a, weights_only=True) == {"x": 1} and open(b).read() == "old"
    assert sorted(os.listdir(tmp_path)) == ["02_descriptions.json", "02_semantics.pt"]


def test_temporary_files_of_a_killed_run_are_removed_and_said(tmp_path, capsys):
    (tmp_path / "cache").mkdir()
    dead = 4194305  # above Linux's largest pid: no such process
    left = [tmp_path / f".syntrans-tmp{dead}.01_student.pt",
            tmp_path / "cache" / f".syntrans-tmp{dead}.student-ab.pt"]
    live = tmp_path / f".syntrans-tmp{os.getpid()}.02_semantics.pt"  # a live writer's
    for f in left + [live]:
        f.write_bytes(b"half")
    common.start(common.parser(None), ["--run", str(tmp_path)])  # as every stage starts
    assert not any(f.exists() for f in left) and live.exists()
    assert f"removed 2 temporary file(s) that a killed run left in {tmp_path}" in capsys.readouterr().out
