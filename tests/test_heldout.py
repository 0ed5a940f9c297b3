"""The held-out base images (issue 23): stage 1 never sees them, stage 4 meta-trains on them.
The two parts of the base classes are disjoint by index, in the toy world (rendered: later
indices of each class) and on real data (the last --heldout fraction of each class)."""
import hashlib

import pytest
import torch

import common
import toyworld
from test_datasets import write_ravi


def digests(images):
    return {hashlib.sha256(x.numpy().tobytes()).hexdigest() for x in images}


def test_toy_heldout_images_are_later_indices_never_the_students():
    train = common.base_split("toy-tiny", "train")
    held = common.base_split("toy-tiny", "heldout")
    n0, n = toyworld.SCALES["toy-tiny"]["n_train"], toyworld.N_HELDOUT["toy-tiny"]
    assert train.classes == held.classes and len(held) == 64 * n
    assert torch.equal(held.labels, torch.arange(64).repeat_interleave(n))
    assert torch.equal(train.images, common.load_split("toy-tiny", "train").images)  # stage 1's, as before
    # by index: held-out image i of a class is that class's image n_train + i of the same stream
    classes = toyworld.make_classes()
    cid = {a: k for k, a in enumerate(sum(classes.values(), []))}
    for c, i in [(0, 0), (5, n - 1), (63, 3)]:
        a = classes["train"][c]
        want = toyworld._render_chunk(([((cid[a], n0 + i), a)], "train", 0))[0]
        assert torch.equal(held.images[c * n + i], torch.from_numpy(want).permute(2, 0, 1))
    # and no held-out image is one of the student's training images
    assert not digests(held.images) & digests(train.images)


def test_heldout_mask_takes_the_last_fraction_of_each_class_by_index():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 2, 3])
    held = common.heldout_mask(labels, 0.2)
    assert held.tolist() == [False] * 8 + [True, True, False, True, False]
    assert common.heldout_mask(labels, 0.5).tolist() == [False] * 6 + [True] * 4 + [False, True, False]


def test_real_data_parts_are_disjoint_and_cover_the_base_images(tmp_path):
    root = write_ravi(tmp_path, per_class=5)
    full = common.load_split("mini-imagenet", "train", root)
    train = common.base_split("mini-imagenet", "train", root, heldout=0.2)
    held = common.base_split("mini-imagenet", "heldout", root, heldout=0.2)
    assert not set(train.paths) & set(held.paths)
    assert sorted(train.paths + held.paths) == sorted(full.paths)
    assert torch.equal(torch.bincount(held.labels), torch.ones(len(full.classes), dtype=torch.long))
    # the held-out image of each class is its last, by index
    last = {c: p for p, c in zip(full.paths, full.labels.tolist())}
    assert {c: p for p, c in zip(held.paths, held.labels.tolist())} == last
    assert train.data_id != held.data_id != full.data_id  # their feature caches stay apart
    # --heldout 0: stage 1 trains on every image, and stage 4 is refused with what to do
    assert common.base_split("mini-imagenet", "train", root, heldout=0).paths == full.paths
    with pytest.raises(common.UserError, match="--heldout"):
        common.base_split("mini-imagenet", "heldout", root, heldout=0)
