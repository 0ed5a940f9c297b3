"""Tests of the offline toy world: its class splits, its deterministic renderer and the key
of its image store. (Render speed is a budget measured by a benchmark, not asserted here.)"""
import os

import numpy as np
import pytest
import torch

import toyworld

ATTRIBUTES = (toyworld.COLOUR_NAMES, toyworld.PATTERN_NAMES, toyworld.SHAPE_NAMES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_splits_are_64_16_20_disjoint_and_novel_only_in_combination(seed):
    splits = toyworld.make_classes(seed)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    combos = [set(splits[s]) for s in ("train", "val", "test")]
    assert sum(map(len, combos)) == 100 and len(set.union(*combos)) == 100
    seen = [{a[k] for a in splits["train"]} for k in range(3)]
    for split in ("val", "test"):
        for attrs in splits[split]:
            assert all(attrs[k] in seen[k] for k in range(3)), f"{split} class {attrs} has an unseen attribute"
    for attrs in splits["train"] + splits["val"] + splits["test"]:
        assert all(attrs[k] in ATTRIBUTES[k] for k in range(3))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_images_are_uint8_at_32px_with_labels_and_disjoint_names(split):
    images, labels, names = toyworld.build_split("toy-tiny", split)
    n = toyworld.SCALES["toy-tiny"]["n_train" if split == "train" else "n_eval"]
    classes = toyworld.make_classes(0)
    assert images.dtype == torch.uint8 and images.shape == (len(names) * n, 3, 32, 32)
    assert names == [toyworld.class_name(a) for a in classes[split]]
    assert torch.equal(torch.bincount(labels), torch.full((len(names),), n))
    others = {toyworld.class_name(a) for s in classes if s != split for a in classes[s]}
    assert not set(names) & others
    first = images[labels == 0].float()
    assert (first - first.mean(0)).abs().mean() > 10  # images of one class differ from each other


def test_rendering_is_deterministic_in_the_seed():
    a = toyworld.build_split("toy-tiny", "val", seed=0)
    b = toyworld.build_split("toy-tiny", "val", seed=0)
    c = toyworld.build_split("toy-tiny", "val", seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0])
    attrs = ("red", "striped", "triangle")
    one = toyworld.render(attrs, np.random.default_rng(5))
    assert one.dtype == np.uint8 and one.shape == (toyworld.RENDER, toyworld.RENDER, 3)
    assert np.array_equal(one, toyworld.render(attrs, np.random.default_rng(5)))
    assert not np.array_equal(one, toyworld.render(attrs, np.random.default_rng(6)))


def test_a_changed_class_partition_is_a_new_image_store(tmp_path, monkeypatch):
    """The store is keyed on the classes it holds, not only on the source text that should
    produce them: a wrapped make_classes has the same source (inspect follows the wrapper)
    but returns another partition, and must not be served the old split's images."""
    import functools
    import common
    monkeypatch.setenv("SYNTRANS_CACHE", str(tmp_path))
    before = common.load_split("toy-tiny", "val")
    real = toyworld.make_classes

    @functools.wraps(real)
    def swapped(seed=0, **kw):  # the first base and the first val class change places
        c = real(seed, **kw)
        return {"train": c["val"][:1] + c["train"][1:], "val": c["train"][:1] + c["val"][1:],
                "test": c["test"]}
    monkeypatch.setattr(toyworld, "make_classes", swapped)
    after = common.load_split("toy-tiny", "val")
    assert after.classes[0] != before.classes[0] and after.classes[1:] == before.classes[1:]
    assert after.data_id != before.data_id  # the feature caches key on it too
    assert len([f for f in os.listdir(tmp_path / "images") if f.endswith(".npy")]) == 2  # two stores
    images, labels, names = toyworld.build_split("toy-tiny", "val")
    assert names == after.classes and torch.equal(after.images, images)
    assert not torch.equal(after.images[labels == 0], before.images[labels == 0])
