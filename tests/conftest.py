"""Shared test setup.

* Offline: HF_HUB_OFFLINE=1 before anything imports huggingface_hub.
* A cache of the tests' own: SYNTRANS_CACHE points at <repo>/.cache/tests whatever the
  user's setting, so the suite neither reads nor writes ~/.cache/syntrans. The tiny
  stand-in teacher (~10 s to train) is trained at most once per run and kept there
  between runs; it is retrained when its recipe (toyworld.py, data/toy-clip.json)
  changes, because the cached file's name does not record the recipe.
"""
import hashlib
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CACHE = os.path.join(REPO, ".cache", "tests")
os.environ["SYNTRANS_CACHE"] = TEST_CACHE


def _recipe_hash():
    h = hashlib.sha256()
    for name in ("toyworld.py", os.path.join("data", "toy-clip.json")):
        with open(os.path.join(REPO, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _prepare_cache():
    stamp = os.path.join(TEST_CACHE, "recipe.sha256")
    recipe = _recipe_hash()
    if os.path.exists(stamp):
        with open(stamp) as f:
            if f.read() == recipe:
                return
    shutil.rmtree(TEST_CACHE, ignore_errors=True)
    os.makedirs(TEST_CACHE)
    with open(stamp, "w") as f:
        f.write(recipe)


_prepare_cache()


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
