"""Tests of common.py: the student, episodes, ProtoNet, the interval, checkpoints,
the feature cache, datasets and the teacher."""
import importlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import toyworld

encode_texts = importlib.import_module("02_mine").encode_texts  # the teacher's text side: only stage 2 uses it

NARROW = (8, 16, 24, 32)


# ----------------------------------------------------------------------------------
# ResNet-12

@pytest.mark.parametrize("size", [84, 32])
@pytest.mark.parametrize("widths,dim", [(None, 640), (NARROW, 32)])
def test_resnet12_gives_one_feature_vector_per_image(size, widths, dim):
    model = (common.ResNet12() if widths is None else common.ResNet12(widths)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, dim) and model.out_dim == dim


def test_resnet12_is_four_blocks_of_three_3x3_convs_at_the_standard_widths():
    convs = [m for m in common.ResNet12().modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 12
    assert [c.out_channels for c in convs[::3]] == [64, 160, 320, 640]


def test_dropblock_acts_in_train_mode_only():
    torch.manual_seed(0)
    drop = common.DropBlock(0.3, 3)
    x = torch.ones(4, 8, 10, 10)
    y = drop.train()(x)
    assert (y == 0).any() and (y > 1).any()  # blocks dropped, the rest scaled up
    assert torch.equal(drop.eval()(x), x)


def test_resnet12_dropblock_is_random_in_train_mode_and_off_in_eval_mode():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model = common.ResNet12(NARROW, drop_rate=0.5).train()
        assert not torch.allclose(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
        plain = common.ResNet12(NARROW, drop_rate=0.0).train()  # train-mode BN alone is deterministic
        assert torch.equal(plain(x), plain(x))


@pytest.mark.parametrize("h", [5, 2, 10])  # ResNet-12's last block at 84 px and 32 px; a larger map
def test_dropblock_drops_about_drop_rate_of_the_activations(h):
    """Ghiasi et al.'s gamma assumes block centres are drawn only where a whole block
    fits; drawn over the whole map, the nominal rate 0.1 at 84 px drops ~76%."""
    torch.manual_seed(0)
    y = common.DropBlock(0.1, 5).train()(torch.ones(256, 16, h, h))
    dropped = (y == 0).float().mean().item()
    assert 0.05 <= dropped <= 0.15, f"drop_rate 0.1 dropped {dropped:.3f} of a {h}x{h} map"


# ----------------------------------------------------------------------------------
# Episodes

def shuffled_labels(counts, seed=0):
    labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)], dtype=torch.long)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_episodes_have_the_asked_sizes_and_disjoint_support_and_query():
    labels = shuffled_labels([20] * 10)
    classes, index = common.sample_episodes(labels, n_way=5, k_shot=2, n_query=3, n_episodes=50, seed=0)
    assert classes.shape == (50, 5) and index.shape == (50, 5, 5)
    for e in range(50):
        assert len(set(classes[e].tolist())) == 5
        support, query = set(index[e, :, :2].flatten().tolist()), set(index[e, :, 2:].flatten().tolist())
        assert len(support) == 10 and len(query) == 15 and not support & query
    assert (labels[index] == classes[..., None]).all()  # every image belongs to its episode class


def test_episodes_draw_classes_from_the_split_given(tiny_val):
    classes, index = common.sample_episodes(tiny_val.labels, 5, 1, 15, 200, seed=0)
    assert set(classes.flatten().tolist()) == set(range(len(tiny_val.classes)))  # all of them, and only them
    assert index.min() >= 0 and index.max() < len(tiny_val)
    assert (tiny_val.labels[index] == classes[..., None]).all()


def test_episodes_use_every_image_of_a_class_that_has_exactly_k_plus_q():
    labels = shuffled_labels([4] * 5)
    classes, index = common.sample_episodes(labels, 5, 1, 3, 3, seed=0)
    assert (labels[index] == classes[..., None]).all()
    assert sorted(index[0].flatten().tolist()) == list(range(20))


def test_episodes_are_fixed_by_the_seed():
    labels = shuffled_labels([20] * 10)
    a = common.sample_episodes(labels, 5, 1, 15, 20, seed=3)
    b = common.sample_episodes(labels, 5, 1, 15, 20, seed=3)
    c = common.sample_episodes(labels, 5, 1, 15, 20, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_episodes_refuse_a_class_with_too_few_images():
    labels = shuffled_labels([20] * 7 + [3] + [20] * 2)  # class 7 has 3 < 1 + 3
    with pytest.raises(ValueError, match=r"\b7\b"):
        common.sample_episodes(labels, 5, 1, 3, 10, seed=0)


@pytest.mark.parametrize("counts", [[20] * 4, []])
def test_episodes_refuse_fewer_classes_than_ways(counts):
    with pytest.raises(ValueError):
        common.sample_episodes(shuffled_labels(counts), 5, 1, 3, 10, seed=0)


# ----------------------------------------------------------------------------------
# ProtoNet and the interval

def test_ci95_matches_a_hand_computation():
    # mean 0.675; squared deviations .030625 + .000625 + .050625 + .005625 = .0875;
    # std (ddof 1) = sqrt(.0875 / 3) = .1707825; 1.96 * .1707825 / sqrt(4) = .1673669
    mean, half = common.ci95([0.5, 0.7, 0.9, 0.6])
    assert mean == pytest.approx(0.675, abs=1e-12)
    assert half == pytest.approx(0.16736686, abs=1e-7)
    assert common.ci95(torch.tensor([0.5, 0.7, 0.9, 0.6])) == pytest.approx((0.675, 0.16736686), abs=1e-6)
    assert common.ci95([0.8]) == (pytest.approx(0.8), 0.0)


def test_protonet_is_perfect_on_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:6] * 10
    labels = shuffled_labels([30] * 6)
    feats = centres[labels] + 0.1 * torch.randn(len(labels), 8, generator=g)
    _, index = common.sample_episodes(labels, 5, 1, 15, 40, seed=0)
    acc = common.protonet_accuracy(feats, index, k_shot=1)
    assert acc.shape == (40,) and (acc == 1).all()


def test_protonet_accuracy_on_a_hand_made_episode():
    feats = torch.tensor([
        [1.0, 0.0],   # 0: support of class A
        [0.0, 1.0],   # 1: support of class B
        [1.0, 0.1],   # 2: query A, nearer A: right
        [0.2, 1.0],   # 3: query A, nearer B: wrong
        [0.1, 1.0],   # 4: query B: right
        [0.0, 2.0],   # 5: query B: right
    ])
    index = torch.tensor([[[0, 2, 3], [1, 4, 5]],    # A first
                          [[1, 4, 5], [0, 2, 3]],    # the same episode with the classes swapped
                          [[0, 2, 2], [1, 5, 4]]])   # all right
    expected = torch.tensor([0.75, 0.75, 1.0])
    assert torch.equal(common.protonet_accuracy(feats, index, k_shot=1), expected)
    assert torch.equal(common.protonet_accuracy(feats, index, k_shot=1, batch=1), expected)


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_protonet_accuracy_works_on_the_features_device(device):
    """A stage that scores episodes on the GPU needs the targets on the logits' device
    ("meta" stands in for a second device on a CPU-only machine)."""
    labels = shuffled_labels([10] * 5)
    feats = torch.eye(8)[labels] + 0.01 * torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    _, index = common.sample_episodes(labels, 5, 1, 3, 7, seed=0)
    acc = common.protonet_accuracy(feats.to(device), index, k_shot=1)
    assert acc.shape == (7,) and acc.device.type == device
    if device != "meta":
        assert torch.equal(acc.cpu(), common.protonet_accuracy(feats, index, k_shot=1))


# ----------------------------------------------------------------------------------
# Checkpoints

HINT = "run 01_distill.py --run runs/toy first"


def write_checkpoint(path, stage="distill"):
    state = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    config = {"lr": 0.05, "widths": [8, 16], "name": "x", "flag": None}
    classes = {"train": ["a", "b"], "val": ["c"], "test": ["d"]}
    common.save_checkpoint(str(path), stage, config, "toy", classes, state, upstream={"00.pt": "abc"},
                           teacher={"name": "toy-clip"}, history=[{"epoch": 1, "acc": 50.0}])
    return state, config, classes


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "run" / "01_student.pt"  # the run folder does not exist yet
    state, config, classes = write_checkpoint(path)
    assert os.listdir(path.parent) == ["01_student.pt"]  # no temp file left behind
    assert torch.load(path, weights_only=True)["stage"] == "distill"  # a plain, safe-to-load dict
    ck = common.load_checkpoint(str(path), "distill", HINT)
    assert ck["format"] == common.FORMAT_VERSION and ck["stage"] == "distill" and ck["dataset"] == "toy"
    assert ck["config"] == config and ck["classes"] == classes and ck["upstream"] == {"00.pt": "abc"}
    assert ck["teacher"] == {"name": "toy-clip"} and ck["history"] == [{"epoch": 1, "acc": 50.0}]
    assert ck["state"].keys() == state.keys() and all(torch.equal(ck["state"][k], v) for k, v in state.items())
    assert ck["id"] == common.file_id(path) and len(ck["id"]) == 16


def expect_user_error(path, *parts, stage="distill"):
    with pytest.raises(common.UserError) as e:
        common.load_checkpoint(str(path), stage, HINT)
    msg = str(e.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_checkpoint_is_refused_in_one_line(tmp_path, keep):
    path = tmp_path / "01_student.pt"
    write_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    expect_user_error(path, str(path), HINT)


def test_missing_checkpoint_says_how_to_make_it(tmp_path):
    expect_user_error(tmp_path / "01_student.pt", str(tmp_path / "01_student.pt"), HINT)


def test_checkpoint_of_another_format_version_is_refused(tmp_path):
    path = tmp_path / "01_student.pt"
    torch.save({"format": common.FORMAT_VERSION + 1, "stage": "distill"}, path)
    expect_user_error(path, str(common.FORMAT_VERSION + 1), str(common.FORMAT_VERSION), HINT)


def test_checkpoint_of_another_stage_is_refused(tmp_path):
    path = tmp_path / "03_bridge.pt"
    write_checkpoint(path, stage="bridge")
    expect_user_error(path, "bridge", "distill", HINT)


class NotWeights:
    pass


def test_checkpoint_is_loaded_weights_only(tmp_path):
    path = tmp_path / "01_student.pt"
    torch.save({"format": common.FORMAT_VERSION, "stage": "distill", "obj": NotWeights()}, path)
    expect_user_error(path, str(path))


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "x.pt"
    common.atomic_save({"a": torch.ones(2)}, str(path))
    common.atomic_save({"a": torch.zeros(2)}, str(path))
    assert os.listdir(tmp_path) == ["x.pt"]
    with pytest.raises(Exception):
        common.atomic_save({"a": lambda: 0}, str(path))  # cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))


def test_check_same_world_refuses_another_dataset_class_list_or_teacher():
    ck = {"dataset": "toy", "classes": {"train": ["a"]}, "teacher": {"name": "toy-clip"}}
    common.check_same_world(ck, "x.pt", "toy", {"train": ["a"]}, {"name": "toy-clip"})
    for args in [("cifar-fs",), ("toy", {"train": ["b"]}), ("toy", None, {"name": "ViT-B-32"})]:
        with pytest.raises(common.UserError):
            common.check_same_world(ck, "x.pt", *args)


def test_run_main_turns_a_user_error_into_one_line_and_exit_code_2(capsys):
    def main():
        raise common.UserError("runs/toy/01_student.pt not found: run 01_distill.py first")
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: runs/toy/01_student.pt not found: run 01_distill.py first\n"


# ----------------------------------------------------------------------------------
# Feature cache

def test_cached_features_compute_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6.0).view(3, 2) * len(calls)
    run = str(tmp_path)
    key = dict(kind="student", student="abc", dataset="toy", split="val", n=3)
    first = common.cached_features(run, key, compute)
    again = common.cached_features(run, dict(reversed(key.items())), compute)  # key order does not matter
    assert len(calls) == 1 and torch.equal(first, again)
    other = common.cached_features(run, key | {"student": "def"}, compute)
    assert len(calls) == 2 and torch.equal(other, 2 * first)
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_cached_features_recompute_a_broken_cache_file(tmp_path):
    key = dict(kind="teacher", dataset="toy", split="test")
    common.cached_features(str(tmp_path), key, lambda: torch.ones(2))
    (cached,) = (tmp_path / "cache").iterdir()
    cached.write_bytes(b"not a checkpoint")
    assert torch.equal(common.cached_features(str(tmp_path), key, lambda: torch.zeros(2)), torch.zeros(2))


# ----------------------------------------------------------------------------------
# Datasets

def test_toy_split_through_common(tiny_val):
    assert tiny_val.dataset == "toy-tiny" and tiny_val.split == "val" and tiny_val.size == toyworld.SIZE
    assert len(tiny_val.classes) == 16 and len(tiny_val) == 16 * toyworld.SCALES["toy-tiny"]["n_eval"]
    batch = tiny_val.student_batch([0, 5])
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 32, 32)
    assert torch.equal(batch, tiny_val.images[[0, 5]])
    assert tiny_val.pil(5).size == (32, 32)
    assert torch.equal(torch.from_numpy(np.array(tiny_val.pil(5))).permute(2, 0, 1), tiny_val.images[5])


def test_unknown_dataset_is_a_user_error():
    with pytest.raises(common.UserError, match="toy"):
        common.load_split("no-such-dataset", "train")


# ----------------------------------------------------------------------------------
# The teacher (open_clip only)

def teacher_config():
    with open(toyworld.TEACHER_CONFIG) as f:
        return json.load(f)


def test_toy_teacher_is_a_frozen_open_clip_model_with_its_own_preprocessing(toy_teacher):
    import open_clip
    model, preprocess, tokenizer, ident = toy_teacher
    cfg = teacher_config()
    assert isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    path = common.toy_teacher_file("toy-clip-tiny")
    assert ident["name"] == "toy-clip-tiny" and ident["file_id"] == common.file_id(path)
    res = cfg["vision_cfg"]["image_size"]
    for size in [(32, 32), (84, 84), (50, 40)]:  # whatever size the student uses
        assert preprocess(Image.new("RGB", size)).shape == (3, res, res)
    texts = encode_texts(model, tokenizer, ["a red striped triangle", "a blue dotted star"], "cpu")
    assert texts.shape == (2, cfg["embed_dim"]) and torch.allclose(texts.norm(dim=-1), torch.ones(2))


def test_teacher_file_loads_like_the_in_memory_model(toy_teacher):
    """The local-file path that real CLIP weights take gives exactly the model that
    load_state_dict of the same file gives."""
    import open_clip
    path = common.toy_teacher_file("toy-clip-tiny")  # the file the fixture trained
    open_clip.add_model_config(toyworld.TEACHER_CONFIG)
    memory = open_clip.create_model("toy-clip")
    memory.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    disk, _, _ = open_clip.create_model_and_transforms("toy-clip", pretrained=path)
    tokens = open_clip.get_tokenizer("toy-clip")(["a red striped triangle", "a photo of a navy disk", "thing"])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    models = {"memory": memory, "disk": disk, "common": toy_teacher[0]}
    with torch.no_grad():
        # frozen like load_teacher's model: frozen attention takes another (fused) kernel, equal only to ~1e-6
        out = {name: (m.eval().requires_grad_(False).encode_image(images), m.encode_text(tokens))
               for name, m in models.items()}
        torch.manual_seed(1)
        fresh = open_clip.create_model("toy-clip").eval().encode_image(images)
    for name in ("disk", "common"):
        assert torch.equal(out[name][0], out["memory"][0]) and torch.equal(out[name][1], out["memory"][1])
    assert not torch.allclose(fresh, out["memory"][0])  # the weights did come from the file


def test_toy_teacher_is_trained_into_a_cache_folder_that_does_not_exist_yet(tmp_path, monkeypatch):
    """A fresh machine has no ~/.cache/syntrans (a web set of 256 keeps this fast)."""
    cache = tmp_path / "fresh" / "syntrans"
    monkeypatch.setenv("SYNTRANS_CACHE", str(cache))
    monkeypatch.setitem(toyworld.SCALES, "toy-tiny", dict(toyworld.SCALES["toy-tiny"], n_web=256, teacher_epochs=1))
    common.load_teacher("toy-clip-tiny")
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("toy-clip-tiny-") and files[0].endswith(".pt")


def test_unknown_teacher_is_a_user_error_naming_the_valid_ones():
    with pytest.raises(common.UserError) as e:
        common.load_teacher("no-such-clip")
    msg = str(e.value)
    assert "\n" not in msg and all(name in msg for name in [*common.TOY_TEACHERS, "ViT-B-32"])


def test_unknown_pretrained_tag_is_a_user_error_naming_the_tags():
    with pytest.raises(common.UserError, match="openai"):
        common.load_teacher("RN50", pretrained="no-such-tag")
