"""Issue 24: the one-GPU path, checked on a CPU. bf16 autocast when forced (--amp), the NaN
check that looks every N steps, the training logs and plot.py, DropBlock's rate and warm-up,
stage 1's persistent DataLoader (the same batches as before), the per-class index lists and
the cached file identity."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common
from conftest import TINY, TINY_STUDENT, REPO, stage

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------
# Stage 1 with --amp on a CPU, and its log

def test_stage1_runs_with_bf16_autocast_forced_on_a_cpu_and_logs_as_it_trains(tmp_path):
    run = str(tmp_path / "run")
    stage("01_distill").main(["--run", run, *TINY, *TINY_STUDENT, "--epochs", "2", "--amp",
                              "--drop-rate", "0.1"])
    ck = common.load_checkpoint(os.path.join(run, common.STUDENT), "distill", "")
    assert ck["config"]["amp"] is True and ck["config"]["block_size"] == 2  # 32 px: MetaOptNet's 2
    records = common.read_log(os.path.join(run, "01_student_log.jsonl"))
    steps = [r for r in records if "val_1shot" not in r]
    vals = [r for r in records if "val_1shot" in r]
    assert [r["epoch"] for r in steps] == [1, 2]  # 20 steps an epoch: one look per epoch end
    for r in records:
        assert {"epoch", "step", "loss", "images", "img_s", "seconds"} <= set(r)
        assert r["img_s"] > 0 and r["seconds"] > 0
    assert all(0 < r["lr"] <= 0.05 for r in steps)
    assert [h["val_1shot"] for h in ck["history"]] == [r["val_1shot"] for r in vals]
    assert [h["loss"] for h in ck["history"]] == [r["loss"] for r in vals]


def test_amp_defaults_off_on_a_cpu_and_on_for_cuda():
    p = common.parser("x\ny\n")
    common.amp_flag(p)
    for argv, device, want in [([], "cpu", False), ([], "cuda", True), (["--amp"], "cpu", True),
                               (["--no-amp"], "cuda", False)]:
        args = p.parse_args(argv)
        if device == "cuda":  # only the --amp default; cudnn's setting is left alone here
            args.amp = device == "cuda" if args.amp is None else args.amp
        else:
            common.gpu_settings(args, torch.device(device))
        assert args.amp is want


def test_autocast_off_is_no_context_at_all_and_on_gives_bf16_on_a_cpu():
    x = torch.randn(4, 8)
    lin = torch.nn.Linear(8, 3)
    with common.autocast(torch.device("cpu"), False):
        assert lin(x).dtype == torch.float32
    with common.autocast(torch.device("cpu"), True):
        assert lin(x).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------
# The NaN check: every N steps, naming the step where the loss stopped being a number

@pytest.mark.parametrize("bad_step", [1, 7, 10, 11, 23])
def test_the_nan_check_fires_within_n_steps_and_names_the_step(bad_step):
    watch = common.LossWatch(every=5)
    looked = None
    with pytest.raises(common.UserError) as e:
        for step in range(1, 31):
            looked = step
            watch.step(torch.tensor(float("nan") if step == bad_step else 1.0 / step),
                       f"epoch 1 step {step}")
    assert looked - bad_step < 5  # raised at the first look after it
    last = "none yet" if bad_step == 1 else f"{1.0 / (bad_step - 1):.6g}"
    assert str(e.value) == (f"loss became nan at epoch 1 step {bad_step} (last finite loss "
                            f"{last}): lower --lr; no checkpoint was written")


def test_the_nan_check_looks_at_the_end_of_an_epoch_and_returns_the_last_loss():
    watch = common.LossWatch(every=50)
    for step in range(3):
        watch.step(torch.tensor(float(step)), f"step {step}")
    assert watch.flush() == 2.0 and watch.flush() == 2.0  # nothing new: the same last loss
    watch.step(torch.tensor(float("inf")), "epoch 2 step 1")
    with pytest.raises(common.UserError, match=r"loss became inf at epoch 2 step 1 \(last "
                                               r"finite loss 2\)"):
        watch.flush()


def test_the_nan_check_names_the_kept_checkpoint_when_it_exists(tmp_path):
    kept = tmp_path / "01_student.last.pt"
    watch = common.LossWatch(every=2, kept=lambda: str(kept))
    kept.write_bytes(b"x")
    with pytest.raises(common.UserError, match=f"the last good epoch is kept in {kept}"):
        watch.step(torch.tensor(float("nan")), "epoch 2 step 1")
        watch.step(torch.tensor(1.0), "epoch 2 step 2")


# ----------------------------------------------------------------------------------
# Logs of stages 3-5 and plot.py

def test_every_stage_leaves_its_log_and_plot_draws_them(full_run_logs):
    run = full_run_logs
    b = common.read_log(os.path.join(run, "03_bridge_log.jsonl"))
    assert b and all({"phase", "epoch", "loss", "val_zero_shot", "val_1shot_mix", "lr",
                      "seconds"} <= set(r) for r in b)
    c = common.read_log(os.path.join(run, "04_classifier_log.jsonl"))
    vals = [r for r in c if "val_1shot" in r]
    assert vals and all({"step", "loss", "lr", "seconds", "gate_1shot"} <= set(r) for r in vals)
    e = common.read_log(os.path.join(run, "results_log.jsonl"))
    assert [r["phase"] for r in e] == ["features", "episodes"] and e[1]["rows"]
    pytest.importorskip("matplotlib")
    out = subprocess.run([sys.executable, os.path.join(REPO, "plot.py"), "--run", run],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("curves.png", "results.png"):
        with open(os.path.join(run, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install_it_in_one_line(tmp_path):
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; "  # None: the import fails
            f"sys.argv = ['plot.py', '--run', {str(tmp_path)!r}]; "
            f"runpy.run_path({os.path.join(REPO, 'plot.py')!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr == ("error: plot.py needs matplotlib: pip install matplotlib "
                          "(or pip install -r requirements-dev.txt)\n")


def test_a_log_starts_at_its_first_record_and_appends_when_resumed(tmp_path):
    log = common.Log(str(tmp_path), "01_student.pt")
    assert not os.path.exists(log.path)  # a stage stopped before its first record leaves none
    log.write(step=1, loss=2.0, images=10)
    log.write(step=2, loss=1.0)
    common.Log(str(tmp_path), "01_student.pt", append=True).write(step=3, loss=0.5)
    with open(log.path, "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a killed run
    assert [r["step"] for r in common.read_log(log.path)] == [1, 2, 3]
    common.Log(str(tmp_path), "01_student.pt").write(step=1, loss=3.0)
    assert [json.loads(x)["loss"] for x in open(log.path)] == [3.0]


# ----------------------------------------------------------------------------------
# DropBlock as MetaOptNet uses it

@pytest.mark.parametrize("size,block", [(10, 5), (5, 5), (21, 5), (4, 2), (2, 2)])
def test_dropblock_drops_its_rate_on_average(size, block):
    """84 px: blocks 3 and 4 see 10x10 and 5x5 maps (block 5); 32 px: 4x4 and 2x2 (block 2)."""
    torch.manual_seed(0)
    drop = common.DropBlock(0.1, block).train()
    x = torch.ones(128, 64, size, size)
    dropped = sum((drop(x) == 0).float().mean().item() for _ in range(4)) / 4
    assert abs(dropped - 0.1) < 0.01, dropped
    y = drop(x)
    assert abs(y.mean().item() - 1) < 1e-4  # the kept units are scaled up: the mean stays


def test_resnet12_regularised_as_metaoptnet_and_untouched_at_rate_0():
    net = common.ResNet12((4, 4, 4, 4), drop_rate=0.1, block_size=5)
    kinds = [type(b.drop).__name__ for b in net.blocks]
    assert kinds == ["Dropout", "Dropout", "DropBlock", "DropBlock"]
    assert [b.drop.block_size for b in net.blocks[2:]] == [5, 5]
    plain = common.ResNet12((4, 4, 4, 4))
    assert [type(b.drop).__name__ for b in plain.blocks] == ["Identity"] * 2 + ["DropBlock"] * 2
    assert plain.state_dict().keys() == net.state_dict().keys()  # checkpoints read either way
    common.warm_up_dropblock(net, 0.1, 25, 100)
    assert [b.drop.drop_rate for b in net.blocks[2:]] == [0.025, 0.025]
    assert net.blocks[0].drop.p == 0.1  # dropout is not warmed up
    common.warm_up_dropblock(net, 0.1, 500, 100)
    assert net.blocks[3].drop.drop_rate == 0.1
    common.warm_up_dropblock(net, 0.1, 0, 0)
    assert net.blocks[3].drop.drop_rate == 0.1
    assert common.dropblock_size(84) == 5 and common.dropblock_size(32) == 2


# ----------------------------------------------------------------------------------
# Stage 1's one DataLoader, episode sampling, file identity

@pytest.mark.parametrize("workers", [0, 2])
def test_the_epoch_loader_gives_the_batches_of_a_fresh_shuffled_dataloader(workers):
    data = torch.utils.data.TensorDataset(torch.arange(103))
    loader = common.EpochLoader(data, 16, workers, torch.device("cpu"), lambda e: 7 * 1000 + e)
    for epoch in range(3):
        old = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, drop_last=True,
                                          generator=torch.Generator().manual_seed(7000 + epoch))
        assert [b[0].tolist() for b in loader.epoch(epoch)] == [b[0].tolist() for b in old]
    before = torch.get_rng_state()
    list(loader.epoch(3))
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is untouched


def test_per_class_lists_are_computed_once_per_labels_tensor_and_give_the_same_episodes():
    labels = torch.randint(0, 12, (5000,), generator=torch.Generator().manual_seed(1))
    n, per_class = common.class_index(labels)
    assert n == 12 and all(torch.equal(p, torch.nonzero(labels == c).flatten())
                           for c, p in enumerate(per_class))
    assert common.class_index(labels)[1] is per_class  # kept
    a = common.sample_episodes(labels, 5, 1, 15, 4, seed=3)
    b = common.sample_episodes(labels.tolist(), 5, 1, 15, 4, seed=3)  # a list: no cache
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    labels[0] = (labels[0] + 1) % 12  # changed in place: computed again
    assert common.class_index(labels)[1] is not per_class


def test_files_id_is_kept_per_file_list_until_a_folder_changes(tmp_path, monkeypatch):
    folder = tmp_path / "cls"
    folder.mkdir()
    paths = []
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"x" * i)
        paths.append(str(folder / f"{i}.jpg"))
    os.utime(folder, (1e9, 1e9))  # changed long ago: trusted
    first = common.files_id(paths, "x")
    common._FILES_IDS.clear()  # another process: read from <cache>/files/
    monkeypatch.setattr(common, "_files_id", lambda *a: pytest.fail("computed again"))
    assert common.files_id(paths, "x") == first
    monkeypatch.undo()
    assert common.files_id(paths, "y") != first  # another list key
    os.mkfifo(folder / "3.jpg")  # a file added: the folder's time moves, every file is vetted
    with pytest.raises(common.UserError, match="named pipe"):
        common.files_id(paths + [str(folder / "3.jpg")], "x")
    os.remove(folder / "3.jpg")
    os.utime(folder, (2e9, 2e9))
    assert common.files_id(paths, "x") == first  # the same files: the same id


@pytest.fixture(scope="module")
def full_run_logs(tmp_path_factory, tiny_stage3_run):
    """tiny_stage3_run plus stage 4 and 5, logs and all."""
    from conftest import TINY_CLASSIFIER, copy_run, torch_threads
    run = copy_run(tiny_stage3_run, tmp_path_factory.mktemp("logs") / "run")
    with torch_threads(1):
        stage("04_classifier").main(["--run", run, *TINY, *TINY_CLASSIFIER])
        stage("05_eval").main(["--run", run, *TINY, "--episodes", "20"])
    return run
