"""--dataset folder: a folder of PNG images written here (3 classes, tens of images each), trained through the CLI
with the exact target, resumed bit for bit at an epoch boundary, exported with its preprocessing; the same batches
with any number of workers; a corrupt image named."""
import json

import numpy as np
import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda import cli
from polarprune_cuda.models import build_model
from polarprune_cuda.errors import ImageReadError
from polarprune_cuda.train.distributed import DistInfo
from polarprune_cuda.train.folder import FolderData

from helpers import without_clock

Image = pytest.importorskip("PIL.Image")


def _folder(root, train=16, val=6, size=12):
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(("bars", "blocks", "stripes")):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((size, size)) * 60).astype(np.uint8)
                if c == 0:
                    a[:, 4:8] += 150
                elif c == 1:
                    a[3:9, 3:9] += 150
                else:
                    a[4:8, :] += 150
                Image.fromarray(a, "L").save(d / f"{i}.png")
    return root


ARGS = ["prune", "--dataset", "folder", "--batch-size", "16", "--min-channels", "2", "--quiet",
        "--latency-batch", "2", "--warmup-epochs", "0", "--ramp-epochs", "1"]


def _run(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr()


def test_a_folder_run_meets_the_target_resumes_exactly_and_exports_its_preprocessing(tmp_path, capsys):
    data = _folder(tmp_path / "shapes")
    args = [*ARGS, "--data-dir", str(data), "--epochs", "3"]
    rc, cap = _run([*args, "--out", str(tmp_path / "a")], capsys)
    assert rc == 0, cap.err
    rc, cap = _run([*args, "--out", str(tmp_path / "b"), "--interrupt-after-epoch", "1"], capsys)
    assert rc == 130
    rc, cap = _run([*args, "--out", str(tmp_path / "b"), "--resume", "--workers", "2"], capsys)   # workers: free
    assert rc == 0, cap.err
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert abs(a["achieved_sparsity"] - 0.5) <= 0.005
    assert a["data"]["train"] == 48 and a["data"]["test"] == 18 and a["data"]["num_classes"] == 3
    assert without_clock(a["history"]) == without_clock(b["history"]) and a["accuracy"] == b["accuracy"]
    wa = torch.load(tmp_path / "a" / "model" / "weights.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "model" / "weights.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    prep = json.loads((tmp_path / "a" / "model" / "spec.json").read_text())["preprocessing"]
    assert prep == a["data"]["preprocessing"]
    assert pp.load_pruned(tmp_path / "a" / "model", lambda: build_model("resnet20", 3, 1)).polarprune_spec[
        "preprocessing"] == prep
    assert prep["classes"] == ["bars", "blocks", "stripes"] and prep["channels"] == 1 and prep["image_size"] == 12
    assert 0 < prep["mean"][0] < 1 and 0 < prep["std"][0] < 1
    rc, cap = _run(["export", str(tmp_path / "a"), "--format", "pt2"], capsys)
    assert rc == 0, cap.err
    assert json.loads((tmp_path / "a" / "model.pt2.preprocessing.json").read_text()) == prep


def test_the_batches_are_the_same_with_any_number_of_workers(tmp_path):
    root = _folder(tmp_path / "shapes", train=8, val=2)
    got = {}
    for workers in (0, 2):
        data = FolderData(root, workers=workers, image_size=10)
        got[workers] = [(x.clone(), y.clone()) for x, y, _ in data.train_batches(7, seed=3, epoch=1)]
    assert len(got[0]) == 4 and got[0][0][0].shape == (7, 1, 10, 10)
    for (x0, y0), (x2, y2) in zip(got[0], got[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    other = [x for x, _, _ in FolderData(root, image_size=10).train_batches(7, seed=3, epoch=2)]
    assert not torch.equal(other[0], got[0][0][0])                   # another epoch, another order and crops


def test_a_corrupt_image_is_named_and_the_last_checkpoint_stays(tmp_path, capsys):
    data = _folder(tmp_path / "shapes", train=8, val=2)
    args = [*ARGS, "--data-dir", str(data), "--epochs", "2", "--out", str(tmp_path / "o")]
    rc, cap = _run([*args, "--interrupt-after-epoch", "1"], capsys)
    assert rc == 130
    bad = data / "train" / "blocks" / "3.png"
    bad.write_bytes(b"not a png")
    rc, cap = _run([*args, "--resume"], capsys)
    assert rc != 0 and str(bad) in cap.err and "Traceback" not in cap.err
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(ImageReadError, match="3.png"):
        FolderData(data).example_input(40)


def test_folder_options_are_checked(tmp_path, capsys):
    rc, cap = _run(["prune", "--dataset", "digits", "--workers", "2", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "workers is read by --dataset folder only" in cap.err
    rc, cap = _run(["prune", "--dataset", "folder", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--data-dir" in cap.err
    rc, cap = _run(["prune", "--dataset", "folder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")],
                   capsys)
    assert rc != 0 and "train/<class>/<image>" in cap.err
    root = _folder(tmp_path / "shapes", train=2, val=1)
    with pytest.raises(ValueError, match="normalize needs 1 means and 1 positive stds"):
        FolderData(root, normalize="0.5,0.5,0.5")
    assert FolderData(root, normalize="0.5,0.25").preprocessing["std"] == [0.25]


def test_a_spec_with_bad_preprocessing_is_refused(tmp_path):
    x = torch.randn(1, 1, 8, 8)
    model = build_model("resnet20", 3, 1)
    pp.attach_gates(model, x, min_channels=2)
    small = pp.extract(model, x)
    good = {"mean": [0.5], "std": [0.25], "image_size": 8, "channels": 1, "classes": ["a", "b", "c"]}
    pp.save_pruned(small, tmp_path / "m", preprocessing=good)
    assert pp.load_pruned(tmp_path / "m", lambda: build_model("resnet20", 3, 1)).polarprune_spec[
        "preprocessing"] == good
    with pytest.raises(ValueError, match=r"preprocessing\.std\[0\]' must be a finite number > 0"):
        pp.save_pruned(small, tmp_path / "n", preprocessing={**good, "std": [0.0]})
    with pytest.raises(ValueError, match=r"preprocessing\.mean' must be a list of 1 to 1 entries"):
        pp.save_pruned(small, tmp_path / "n", preprocessing={**good, "mean": [0.5, 0.5]})


def test_each_rank_decodes_its_slice_of_the_same_global_batches(tmp_path):
    """Two ranks' slices, put together, are the one process's batches (the same images, crops and flips); a
    global batch smaller than the ranks is skipped on both."""
    data = FolderData(_folder(tmp_path / "shapes", train=3, val=1), image_size=10)   # 9 images: batches 4, 4, 1
    one = list(data.train_batches(4, seed=5, epoch=0))
    ranks = [list(data.train_batches(4, seed=5, epoch=0, info=DistInfo(rank=r, world_size=2))) for r in (0, 1)]
    assert [n for _, _, n in one] == [4, 4, 1]
    for i, (x, y, n) in enumerate(one[:2]):
        (x0, y0, n0), (x1, y1, n1) = ranks[0][i], ranks[1][i]
        assert n0 == n1 == n and len(y0) == len(y1) == 2
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[0][2] == (None, None, 1) and ranks[1][2] == (None, None, 1)


def test_two_ranks_train_a_folder_alike(tmp_path):
    """Under torchrun (two gloo processes) each rank decodes its slice; the ranks end with the same model and
    history, bit for bit (exact by construction: gradients all-reduced, BatchNorm statistics over the global
    batch, buffers broadcast)."""
    from test_distributed import _assert_ranks_identical, _spawn

    data = _folder(tmp_path / "shapes", train=6, val=2)
    cfg = dict(dataset="folder", data_dir=str(data), model="resnet20", batch_size=8, epochs=2, warmup_epochs=0.0,
               ramp_epochs=1.0, min_channels=2, seed=3, sync_bn=True)
    ranks = _spawn(tmp_path, "ddp", cfg)
    _assert_ranks_identical(ranks)
    assert ranks[0]["history"]["epoch_step"] == [3, 6]
