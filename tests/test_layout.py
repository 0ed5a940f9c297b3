"""The shape users read (issue 21): short stage headers, lines of at most 100 characters, one
way for a stage to load another, no import cycle, and no file that points outside the
repository. These read the files as text; nothing is run."""
import ast
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["01_distill.py", "02_mine.py", "03_bridge.py", "04_classifier.py", "05_eval.py"]
CODE = STAGES + ["common.py", "toyworld.py"]


def read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("name", CODE)
def test_at_most_two_percent_of_lines_are_over_100_characters(name):
    lines = read(name).splitlines()
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
    assert len(long) <= 0.02 * len(lines), f"{name}: lines over 100 characters: {long[:10]}"


@pytest.mark.parametrize("name", STAGES)
def test_a_stage_header_is_short_and_points_into_the_repository(name):
    doc = ast.get_docstring(ast.parse(read(name)))
    assert doc and len(doc.splitlines()) <= 40, f"{name}: header of {len(doc.splitlines())} lines"
    assert "docs/DESIGN.md" in doc


@pytest.mark.parametrize("name", STAGES)
def test_stages_load_each_other_one_way(name):
    """common.stage_module is the one way; importlib nowhere else in a stage."""
    assert "importlib" not in read(name)


def test_no_import_cycle_between_common_and_toyworld():
    tree = ast.parse(read("toyworld.py"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "common" not in imported and not any(m and m[:2].isdigit() for m in imported)


def test_no_file_points_outside_the_repository():
    """Tests may read ../shared (and skip when it is absent); nothing a user runs or reads may."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    bad = [f for f in files if not f.startswith("tests/") and os.path.isfile(os.path.join(REPO, f))
           and "../shared" in open(os.path.join(REPO, f), encoding="utf-8", errors="replace").read()]
    assert bad == []
