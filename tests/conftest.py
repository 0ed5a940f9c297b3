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
