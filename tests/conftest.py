"""Shared test setup.

* Offline: HF_HUB_OFFLINE=1 before anything imports huggingface_hub.
* A cache of the tests' own: SYNTRANS_CACHE points at <repo>/.cache/tests whatever the
  user's setting, so the suite neither reads nor writes ~/.cache/syntrans. The tiny
  stand-in teacher (~10 s to train) is trained once and kept there between runs;
  its file name records its recipe, so a changed toy world retrains it.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CACHE = os.path.join(REPO, ".cache", "tests")
os.environ["SYNTRANS_CACHE"] = TEST_CACHE
# the decode-once image stores of the tests' fake datasets (keyed by their temporary paths) do
# not outlive a session; the toy ones are rendered again in seconds
import shutil  # noqa: E402
shutil.rmtree(os.path.join(TEST_CACHE, "images"), ignore_errors=True)


@pytest.fixture(scope="session")
def toy_teacher():
    """(model, preprocess, tokenizer, identity) of the tiny stand-in CLIP, trained once."""
    import common
    return common.load_teacher("toy-clip-tiny")


@pytest.fixture(scope="session")
def tiny_val():
    """The val split of the test-sized toy world (16 classes x 24 images)."""
    import common
    return common.load_split("toy-tiny", "val")


# ----------------------------------------------------------------------------------
# Shared by the stage tests (test_distill, test_bridge, test_classifier, test_eval):
# tiny runs of the stage scripts, in process, in temporary run folders.
#
# Threads: on a 2-core machine that other processes also use, torch's default of two
# intra-op threads makes small ops hundreds of times slower (the threads spin-wait on
# each other), so these fixtures and the stage tests run torch with one thread.

import contextlib  # noqa: E402
import importlib  # noqa: E402
import shutil  # noqa: E402

# every stage: the test-sized toy world and teacher, on the CPU
TINY = ["--dataset", "toy-tiny", "--clip", "toy-clip-tiny", "--device", "cpu"]
# stage-1 flags of a tiny student: one epoch of a narrow ResNet-12 (a few seconds)
TINY_STUDENT = ["--widths", "8,16,16,32", "--epochs", "1", "--batch-size", "64", "--val-episodes", "10"]
TINY_BRIDGE = ["--epochs", "3", "--hidden", "32", "--val-episodes", "10"]
TINY_CLASSIFIER = ["--steps", "6", "--val-every", "3", "--val-episodes", "10", "--hidden", "32",
                   "--episodes-per-step", "2", "--n-query", "5"]


@contextlib.contextmanager
def torch_threads(n=1):
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread():
    """Use with pytestmark = pytest.mark.usefixtures("single_thread")."""
    with torch_threads(1):
        yield


def stage(name):
    """A stage script as a module: stage("01_distill").main([...])."""
    return importlib.import_module(name)


def write_semantics(run, teacher, dataset="toy-tiny", out=None, template="a photo of a {name}."):
    """A stand-in for stage 2 (02_mine.py): one semantic vector per class, the teacher's
    text embedding of a prompt template, saved as the 'mine' checkpoint that stages 3-5
    read. Returns its path."""
    import common
    encode_texts = stage("02_mine").encode_texts
    model, _, tokenizer, ident = teacher
    classes = common.class_names(dataset)
    state = {s: encode_texts(model, tokenizer, [template.format(name=n) for n in classes[s]], "cpu")
             for s in common.SPLITS}
    path = os.path.join(str(run), out or common.SEMANTICS)
    common.save_checkpoint(path, "mine", {"sources": "tests: one prompt template", "template": template},
                           dataset, classes, state=state, teacher=ident)
    return path


@pytest.fixture(scope="session")
def make_semantics(toy_teacher):
    """make_semantics(run, out=None, template=...) -> path of a stage-2 stand-in checkpoint."""
    def make(run, **kw):
        return write_semantics(run, toy_teacher, **kw)
    return make


def copy_run(src, dst):
    """A private copy of a run folder (checkpoints and feature cache), so that a test can
    add or delete files without touching the shared one."""
    shutil.copytree(str(src), str(dst))
    return str(dst)


@pytest.fixture(scope="session")
def tiny_stage1_run(tmp_path_factory, toy_teacher):
    """A run folder (do not modify: copy it with copy_run) holding a tiny distilled
    student (01_student.pt) and the semantics stand-in (02_semantics.pt)."""
    run = tmp_path_factory.mktemp("tiny-stage1") / "run"
    with torch_threads(1):
        stage("01_distill").main(["--run", str(run), *TINY, *TINY_STUDENT])
        write_semantics(run, toy_teacher)
    return str(run)


@pytest.fixture(scope="session")
def tiny_stage3_run(tmp_path_factory, tiny_stage1_run):
    """tiny_stage1_run plus a tiny bridge (03_bridge.pt); do not modify: copy it."""
    run = copy_run(tiny_stage1_run, tmp_path_factory.mktemp("tiny-stage3") / "run")
    with torch_threads(1):
        stage("03_bridge").main(["--run", run, *TINY, *TINY_BRIDGE])
    return run


# The one-line-error checks of tests/test_failures.py and tests/test_hardening.py

def run_stage(capsys, name, *argv):
    """A stage's main() under run_main, as its command line runs it: (exit code, stdout, stderr)."""
    import common
    capsys.readouterr()
    try:
        common.run_main(lambda: stage(name).main(list(argv)))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *parts):
    """The stage stopped with exit code 2 and a one-line message, the last thing on stderr
    (before it there may be progress bars, which go to stderr too)."""
    assert code == 2 and "Traceback" not in err and err.count("error: ") == 1, err
    assert err.endswith("\n"), err
    err = err.replace("\r", "\n").rstrip("\n").split("\n")[-1]
    assert err.startswith("error: "), err
    assert all(p in err for p in parts), err
    return err
