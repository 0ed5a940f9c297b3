"""run.sh with paths that hold spaces (issue 22): RUN, DATA_ROOT and PRETRAINED are one argument
each, whatever they hold; the flag variables (EXTRA, EXTRA1 ... EXTRA5) are split into words on
purpose, and never glob-expanded. Checked twice: the commands DRY_RUN=1 prints, and the
arguments each command really gets (PYTHON is a stand-in that records them and does nothing)."""
import json
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def run_sh(tmp_path, preset, **env):
    (tmp_path / "my weights.pt").write_bytes(b"")
    env = dict(os.environ, DATA_ROOT="my data/mini", PRETRAINED="my weights.pt",
               RUN="/tmp/x --epochs 1 --out 01_student.pt", EXTRA="--device cpu",
               EXTRA1="--epochs 1 *", **env)
    r = subprocess.run(["bash", os.path.join(REPO, "run.sh"), preset], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def check_commands(cmds, tmp_path, real=True):
    """cmds: each command's arguments after the interpreter."""
    assert len(cmds) == 15 + real and (cmds[0][:2] == ["common.py", "check"]) == real
    for c in cmds:
        if c[0] != "common.py":
            assert c[c.index("--run") + 1] == "/tmp/x --epochs 1 --out 01_student.pt"  # one arg
        if real:
            assert c[c.index("--data-root") + 1] == str(tmp_path / "my data" / "mini")
            assert c[c.index("--clip-pretrained") + 1] == str(tmp_path / "my weights.pt")
    stage1 = [c for c in cmds if c[0] == "01_distill.py"]
    # EXTRA and EXTRA1 come last, split into words, the * kept as it is
    assert len(stage1) == 2
    assert all(c[-5:] == ["--device", "cpu", "--epochs", "1", "*"] for c in stage1)
    assert all(c[-2:] == ["--device", "cpu"] for c in cmds
               if c[0] not in ("01_distill.py", "common.py"))


def test_dry_run_prints_each_path_as_one_word(tmp_path):
    for preset, real in (("mini-imagenet", True), ("toy-tiny", False)):
        out = run_sh(tmp_path, preset, DRY_RUN="1")
        cmds = [shlex.split(line)[1:] for line in out.splitlines() if not line.startswith("==")]
        check_commands(cmds, tmp_path, real)


def test_each_path_reaches_the_stages_as_one_argument(tmp_path):
    recorder = tmp_path / "python"
    recorder.write_text(RECORDER.format(python=sys.executable))
    recorder.chmod(0o755)
    for preset, real in (("mini-imagenet", True), ("toy-tiny", False)):
        record = tmp_path / f"{preset}.jsonl"
        run_sh(tmp_path, preset, PYTHON=str(recorder), RECORD=str(record))
        cmds = [json.loads(line) for line in record.read_text().splitlines()]
        check_commands(cmds, tmp_path, real)
