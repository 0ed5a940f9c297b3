"""The real-scale path (issue 16): OpenAI weights get QuickGELU, a forgotten teacher flag is
refused, feature caches key on the data, run.sh lets the user's flags win, your own dataset
(--dataset folder) and the decode-once image store."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402


def one_line_error(capsys, fn, *parts):
    with pytest.raises(SystemExit) as e:
        common.run_main(fn)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for p in parts:
        assert p in err, err
    return err


# ------------------------------------------------------------------------------
# QuickGELU for OpenAI's weights, however they are named

def activations(model):
    """The activation class of every transformer MLP of an open_clip model."""
    return {type(m.gelu).__name__ for m in model.modules() if hasattr(m, "gelu") and hasattr(m, "c_fc")}


def test_openai_tag_builds_quickgelu(monkeypatch, tmp_path, capsys):
    """The tag's download is simulated by a local file (loading its weights is skipped)."""
    import open_clip
    import open_clip.factory as factory
    fake = tmp_path / "open_clip_model.safetensors"
    fake.write_bytes(b"")
    loaded = []
    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, **kw: str(fake))
    monkeypatch.setattr(factory, "load_checkpoint", lambda model, path, **kw: loaded.append(path) or {})
    with torch.random.fork_rng():
        model, _, _, ident = common.load_teacher("ViT-B-32", "openai")
    assert loaded == [str(fake)]
    assert activations(model) == {"QuickGELU"}
    assert ident == {"name": "ViT-B-32", "pretrained": "openai", "file_id": "", "quick_gelu": True}
    assert "QuickGELU" in capsys.readouterr().out
    assert open_clip.get_pretrained_cfg("ViT-B-32", "openai")["quick_gelu"]


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A real open_clip architecture (VisionTransformer + text transformer, GELU by its config)
    at tiny widths, registered as 'tiny-vit-test'; its random weights as OpenAI ships weights
    (a TorchScript archive) and as a plain state dict."""
    import json
    import open_clip
    folder = tmp_path_factory.mktemp("tiny-vit")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "tiny-vit-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(folder / "tiny-vit-test.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit-test").eval()
    assert activations(model) == {"GELU"}
    traced = torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)), strict=False, check_trace=False)
    traced.save(str(folder / "ViT-tiny.pt"))
    torch.save(model.state_dict(), folder / "plain.pt")
    (folder / "openai").mkdir()
    torch.save(model.state_dict(), folder / "openai" / "weights.pt")
    return folder, model


def test_openai_torchscript_file_loads_with_quickgelu(tiny_vit):
    folder, original = tiny_vit
    assert common.is_torchscript(str(folder / "ViT-tiny.pt")) and not common.is_torchscript(str(folder / "plain.pt"))
    model, preprocess, tokenizer, ident = common.load_teacher("tiny-vit-test", str(folder / "ViT-tiny.pt"))
    assert activations(model) == {"QuickGELU"} and ident["quick_gelu"]
    for k, v in original.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_local_state_dict_file_quickgelu_when_its_path_says_openai(tiny_vit, capsys):
    folder, _ = tiny_vit
    model, *_, ident = common.load_teacher("tiny-vit-test", str(folder / "openai" / "weights.pt"))
    assert activations(model) == {"QuickGELU"} and ident["quick_gelu"]
    model, *_, ident = common.load_teacher("tiny-vit-test", str(folder / "plain.pt"))
    assert activations(model) == {"GELU"} and "quick_gelu" not in ident
    assert "if these are OpenAI's weights, name the model tiny-vit-test-quickgelu" in capsys.readouterr().out


def test_quickgelu_and_gelu_teachers_are_not_the_same():
    a = {"name": "ViT-B-32", "pretrained": "openai", "file_id": ""}
    assert not common.same_teacher(a, dict(a, quick_gelu=True))
    assert common.same_teacher(dict(a, quick_gelu=True), dict(a, quick_gelu=True))


# ------------------------------------------------------------------------------
# A forgotten --clip or --clip-pretrained is refused before any work

@pytest.mark.parametrize("script,flags,words", [
    ("01_distill", ["--dataset", "cifar-fs"], ["cifar-fs needs a real CLIP teacher", "--clip ViT-B-32"]),
    ("02_mine", ["--dataset", "mini-imagenet", "--clip", "toy-clip-tiny"], ["mini-imagenet needs a real CLIP"]),
    ("01_distill", ["--dataset", "cifar-fs", "--clip", "ViT-B-32"],
     ["--clip ViT-B-32 without --clip-pretrained is a CLIP with random weights", "--clip-pretrained openai"]),
    ("02_mine", ["--dataset", "toy-tiny", "--clip", "RN50"], ["random weights", "--clip-pretrained random"]),
])
def test_forgotten_teacher_flags_are_refused_first(tmp_path, capsys, monkeypatch, script, flags, words):
    import importlib
    stage = importlib.import_module(script)
    read = []
    monkeypatch.setattr(common, "read_split", lambda *a, **kw: read.append(a))  # no data is read before
    one_line_error(capsys, lambda: stage.main(["--run", str(tmp_path), "--data-root", str(tmp_path), *flags]), *words)
    assert read == [] and os.listdir(tmp_path) == []


def test_random_weights_only_when_asked_for():
    ident = common.teacher_identity("RN50", common.RANDOM)
    assert ident == {"name": "RN50", "pretrained": "random", "file_id": ""}


# ------------------------------------------------------------------------------
# Fake mini-ImageNet / your own dataset on disk

def write_images(folder, n, size=(90, 84), seed=0, ext=".jpg"):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"im{i}{ext}")


def write_mini_folders(root, per_class=2, seed=0):
    """mini-ImageNet in the folder layout, every class with `per_class` random images."""
    for s in common.SPLITS:
        for k, (wnid, _) in enumerate(common.split_classes("mini-imagenet", s)):
            write_images(root / s / wnid, per_class, seed=seed * 1000 + k)
    return str(root)


def test_feature_cache_keys_on_the_data(tmp_path, toy_teacher):
    """Two copies of a dataset with the same counts (other pixels) in one run folder."""
    model, preprocess, _, ident = toy_teacher
    run = str(tmp_path / "run")
    feats = []
    for copy in (0, 1):
        split = common.load_split("mini-imagenet", "val", write_mini_folders(tmp_path / f"copy{copy}", seed=copy))
        feats.append(common.teacher_image_features(run, model, preprocess, ident, split, "cpu"))
    assert feats[0].shape == feats[1].shape and not torch.allclose(feats[0], feats[1])
    assert len(os.listdir(os.path.join(run, "cache"))) == 2


def write_own(root):
    """Your own dataset: 3 classes per split, one named in classes.tsv, mixed extensions."""
    for s, names in [("train", ["red_fox", "grey-wolf", "n001"]), ("val", ["a_b", "c", "d"]),
                     ("test", ["e", "f", "g"])]:
        for k, name in enumerate(names):
            write_images(root / s / name, 2 + k, size=(40, 30), ext=[".jpg", ".PNG", ".jpeg"][k])
    (root / "train" / ".hidden").mkdir()
    (root / "train" / "README.txt").write_text("not a class")
    (root / "classes.tsv").write_text("n001\tarctic fox\nunused\tnothing\n")
    return str(root)


def test_own_dataset_loads_with_readable_names_and_image_size(tmp_path):
    root = write_own(tmp_path / "mine")
    train = common.load_split("folder", "train", root, 48)
    assert train.classes == ["grey wolf", "arctic fox", "red fox"]  # sorted by folder: grey-wolf, n001, red_fox
    assert train.ids == ["grey-wolf", "n001", "red_fox"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]  # 3 .PNG, 4 .jpeg, 2 .jpg files
    assert train.student_batch([0, 5]).shape == (2, 3, 48, 48)
    assert common.load_split("folder", "val", root).size == 84
    assert common.class_names("folder", root)["val"] == ["a b", "c", "d"]
    with pytest.raises(common.UserError, match="not found: --data-root should be a folder with train/, val/, test/"):
        common.load_split("folder", "train", str(tmp_path))


def test_own_dataset_check_command(tmp_path):
    root = write_own(tmp_path / "mine")
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def check():
        return subprocess.run([sys.executable, os.path.join(REPO, "common.py"), "check", "--dataset", "folder",
                               "--data-root", root], capture_output=True, text=True, env=env, timeout=120)
    r = check()  # 3 val classes: stage 1's 5-way val episodes cannot be drawn
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.startswith("error: 5-way episodes need 5 classes; folder val has 3: the dataset is incomplete")
    for s in common.SPLITS:  # 20 images more in each class, and two more classes of 20
        for d in os.listdir(os.path.join(root, s)):
            if os.path.isdir(os.path.join(root, s, d)) and not d.startswith("."):
                write_images(tmp_path / "mine" / s / d, 20, size=(40, 30), ext=".bmp")
        for k in (1, 2):
            write_images(tmp_path / "mine" / s / f"z{k}_{s}", 20, size=(40, 30))
    r = check()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "train: 5 classes, 109 images (grey wolf, arctic fox, red fox, ...)"
    assert lines[1] == "val: 5 classes, 109 images (a b, c, d, ...)"


# ------------------------------------------------------------------------------
# The decode-once image store

def test_store_returns_the_pixels_of_decoding_and_is_read_not_decoded_later(tmp_path, monkeypatch):
    root = write_mini_folders(tmp_path / "mini", per_class=3)
    files = common.read_split("mini-imagenet", "val", root)
    decoded = files.student_batch(list(range(len(files))))
    stored = common.load_split("mini-imagenet", "val", root)
    assert torch.equal(stored.images, decoded)
    assert torch.equal(stored.student_batch([4, 1]), decoded[[4, 1]])
    assert stored.pil(2).size == (90, 84)  # the teacher still reads the file, at its native size
    monkeypatch.setattr(common.Split, "pil", lambda self, i: pytest.fail("decoded again"))
    again = common.load_split("mini-imagenet", "val", root)
    assert torch.equal(again.images, decoded)


def test_store_built_by_dataloader_workers_equals_decoding(tmp_path):
    root = write_mini_folders(tmp_path / "mini", per_class=2)
    files = common.read_split("mini-imagenet", "test", root)
    stored = common.decode_once(common.read_split("mini-imagenet", "test", root), workers=2)
    assert torch.equal(stored.images, files.student_batch(list(range(len(files)))))


def test_toy_split_from_the_store_is_the_rendered_one(tiny_val):
    import toyworld
    images, labels, names = toyworld.build_split("toy-tiny", "val")
    assert torch.equal(tiny_val.images, images) and torch.equal(tiny_val.labels, labels) and tiny_val.classes == names


def test_a_changed_file_gets_another_store(tmp_path):
    root = write_mini_folders(tmp_path / "mini", per_class=2)
    a = common.load_split("mini-imagenet", "val", root)
    first = a.paths[0]
    Image.new("RGB", (84, 84), (0, 255, 0)).save(first, "JPEG")
    os.utime(first, ns=(1, 1))
    b = common.load_split("mini-imagenet", "val", root)
    assert a.data_id != b.data_id and not torch.equal(a.images[0], b.images[0])


# ------------------------------------------------------------------------------
# run.sh: the user's flags win, paths are theirs, the data and teacher come first

def test_run_sh_dry_run_order_and_paths(tmp_path):
    env = dict(os.environ, DRY_RUN="1", DATA_ROOT="data/mini", PRETRAINED="openai", RUN="myrun",
               EXTRA="--device cpu", EXTRA1="--epochs 1 --workers 0", EXTRA4="--steps 20")
    (tmp_path / "w.pt").write_bytes(b"")
    r = subprocess.run(["bash", os.path.join(REPO, "run.sh"), "mini-imagenet"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    cmds = [line.split() for line in r.stdout.splitlines() if not line.startswith("==")]
    assert cmds[0][1:3] == ["common.py", "check"]  # before any stage
    root = str(tmp_path / "data" / "mini")
    stage1 = [c for c in cmds if c[1] == "01_distill.py"]
    assert len(stage1) == 2
    for c in stage1:
        assert c[c.index("--data-root") + 1] == root and c[c.index("--run") + 1] == str(tmp_path / "myrun")
        assert c[-6:] == ["--device", "cpu", "--epochs", "1", "--workers", "0"]  # after the preset's --epochs 90
        assert c.index("--epochs") < c.index("--workers") < len(c) - 6
    stage4 = [c for c in cmds if c[1] == "04_classifier.py"]
    assert all(c[-2:] == ["--steps", "20"] and "--epochs" not in c for c in stage4)
    assert all("--steps" not in c for c in stage1)
    env["PRETRAINED"] = "w.pt"
    r = subprocess.run(["bash", os.path.join(REPO, "run.sh"), "mini-imagenet"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=60)
    assert f"--clip-pretrained {tmp_path / 'w.pt'} " in r.stdout


def test_extraction_and_decoding_leave_the_global_rng_alone(tmp_path, toy_teacher, tiny_val):
    """A DataLoader draws a seed from the global RNG unless given a generator: the toy
    pipeline's numbers (and a real run's, store built or not) must not depend on them."""
    model, preprocess, _, ident = toy_teacher
    root = write_mini_folders(tmp_path / "mini", per_class=1)
    torch.manual_seed(0)
    common.teacher_image_features(str(tmp_path / "run"), model, preprocess, ident, tiny_val, "cpu")
    common.load_split("mini-imagenet", "val", root)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
