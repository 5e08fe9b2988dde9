"""The main job end to end through the command line: tiny runs on real data."""
import gzip
import hashlib
import json
import pickle
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from polarprune_cuda import cli
from polarprune_cuda.train import data

from helpers import without_clock

TINY = ["--dataset", "digits", "--model", "resnet20", "--max-train", "160", "--max-test", "80",
        "--batch-size", "32", "--latency-batch", "4", "--quiet", "--min-channels", "2"]


def run(argv, capsys=None):
    rc = cli.main(argv)
    captured = capsys.readouterr() if capsys is not None else None
    return rc, captured


def test_tiny_run_writes_report_model_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    rc, cap = run(["prune", *TINY, "--epochs", "2", "--out", str(out), "--baseline"], capsys)
    assert rc == 0, cap.err
    report = json.loads((out / "report.json").read_text())
    _check_schema(report)
    assert report["config"]["epochs"] == 2 and report["accuracy"]["baseline"] is not None
    assert "drop_points" in report["accuracy"]
    assert report["pruned"]["macs"] < report["dense"]["macs"]
    for name in ("gates.png", "density.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model" / "spec.json").is_file() and (out / "model" / "weights.pt").is_file()
    # the digest file checks as the docs say: `cd RUN/model && sha256sum -c weights.pt.sha256`
    digest, name = (out / "model" / "weights.pt.sha256").read_text().split()
    assert name == "weights.pt" and digest == hashlib.sha256((out / "model" / "weights.pt").read_bytes()).hexdigest()
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "-c", "weights.pt.sha256"], cwd=out / "model", check=True, capture_output=True)
    md = (out / "report.md").read_text()
    assert "achieved" in md and "polarprune prune" in md
    assert "achieved macs sparsity" in cap.out and "dense" in cap.out


def _check_schema(report):
    expected = {
        "format": int, "command": str, "versions": dict, "config": dict, "data": dict,
        "target_sparsity": float, "cost": str, "achieved_sparsity": float, "sparsity": dict,
        "dense": dict, "pruned": dict, "channels": dict, "accuracy": dict, "latency": dict,
        "energy": dict, "history": dict, "seconds": float, "files": list,
    }
    for key, typ in expected.items():
        assert isinstance(report[key], typ), key
    assert set(report["sparsity"]) == {"channels", "params", "macs"}
    for counts in (report["dense"], report["pruned"]):
        assert set(counts) == {"params", "macs"} and all(isinstance(v, int) for v in counts.values())
    assert 0 <= report["accuracy"]["pruned"] <= 1 and 0 <= report["accuracy"]["gated"] <= 1
    for name in ("dense", "pruned"):
        assert report["latency"][name]["median_ms"] > 0
    assert report["latency"]["speedup"] > 0
    assert isinstance(report["energy"]["available"], bool)
    if not report["energy"]["available"]:
        assert report["energy"]["reason"]
    hist = report["history"]
    assert len(hist["epoch"]) == len(hist["test_accuracy"]) == len(hist["density"]) == len(hist["histogram"])
    assert all(len(h) == 20 for h in hist["histogram"])
    assert report["versions"]["torch"] == torch.__version__


def test_resume_after_interruption_equals_uninterrupted(tmp_path, capsys):
    args = ["prune", *TINY, "--epochs", "3", "--warmup-epochs", "0", "--ramp-epochs", "1"]
    rc, cap = run([*args, "--out", str(tmp_path / "a")], capsys)
    assert rc == 0, cap.err
    rc, cap = run([*args, "--out", str(tmp_path / "b"), "--interrupt-after-epoch", "1"], capsys)
    assert rc == 130 and "--resume" in cap.err
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    rc, cap = run([*args, "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and "--resume" in cap.err          # refuses to clobber a run
    rc, _ = run([*args, "--out", str(tmp_path / "b"), "--resume"], capsys)
    assert rc == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert without_clock(a["history"]) == without_clock(b["history"])
    assert a["accuracy"] == b["accuracy"] and a["pruned"] == b["pruned"]
    wa = torch.load(tmp_path / "a" / "model" / "weights.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "model" / "weights.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _ = run(["prune", *TINY, "--epochs", "2", "--out", str(out), "--interrupt-after-epoch", "1"], capsys)
    assert rc == 130
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    rc, cap = run(["prune", *TINY, "--epochs", "2", "--out", str(out), "--resume"], capsys)
    assert rc == 2 and f"checkpoint {out / 'checkpoint.pt'} is corrupt" in cap.err
    rc, _ = run(["prune", *TINY, "--epochs", "2", "--out", str(out), "--overwrite",
                 "--interrupt-after-epoch", "1"], capsys)
    assert rc == 130
    rc, cap = run(["prune", *TINY, "--epochs", "2", "--out", str(out), "--resume", "--target-sparsity", "0.3"],
                  capsys)
    assert rc == 2 and "target_sparsity=0.5" in cap.err and "target_sparsity=0.3" in cap.err


def test_missing_dataset_says_where_it_looked(tmp_path, capsys, monkeypatch):
    rc, cap = run(["prune", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")],
                  capsys)
    assert rc == 2
    assert "CIFAR10 not found" in cap.err and str(tmp_path) in cap.err and "--data-dir" in cap.err
    # one line that also says what the failed run left behind, and the same command then starts over there
    assert len(cap.err.strip().splitlines()) == 1 and "holds only this run's manifest and lock" in cap.err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".polarprune.lock", "manifest.json"]
    rc, cap = run(["prune", *TINY, "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, cap.err
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
    monkeypatch.delenv("POLARPRUNE_DATA", raising=False)
    with pytest.raises(data.DatasetNotFoundError, match=f"Looked for .* in: {tmp_path}.*apt-get install "
                                                        "dataset-fashion-mnist.*--data-dir"):
        data.load_fashion_mnist(tmp_path)
    with pytest.raises(data.DatasetNotFoundError, match="CIFAR100 not found. Looked in: " + str(tmp_path)):
        data.load_cifar("cifar100", tmp_path)


def test_bad_options_are_named(tmp_path, capsys):
    rc, cap = run(["prune", "--target-sparsity", "1.5", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "target-sparsity must be in [0, 1)" in cap.err
    rc, cap = run(["prune", *TINY, "--model", "nosuchnet", "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "is not a model name" in cap.err


def _write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_loader(tmp_path, gz):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (30, 28, 28))
    test = rng.integers(0, 256, (10, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte", train, gz)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 30), gz)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test, gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 10), gz)
    d = data.load_dataset("fashion-mnist", tmp_path)
    assert d.train_x.shape == (30, 1, 28, 28) and d.test_x.shape == (10, 1, 28, 28)
    assert d.source == str(tmp_path)
    raw = torch.from_numpy(train[:, None].astype(np.float32) / 255)
    torch.testing.assert_close(d.train_x * raw.std((0, 2, 3), keepdim=True) + raw.mean((0, 2, 3), keepdim=True),
                               raw, atol=1e-4, rtol=1e-4)
    (tmp_path / ("t10k-labels-idx1-ubyte" + (".gz" if gz else ""))).write_bytes(b"\x01\x02garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.load_dataset("fashion-mnist", tmp_path)


@pytest.mark.parametrize("case,match", [
    ("labels 2-D", "expected 1 dimensions"),
    ("label 200", "label 200 is not a Fashion-MNIST class"),
    ("10 labels for 30 images", "10 labels for the 30 images"),
    ("zero images", r"images are \(n >= 1, 28, 28\)"),
    ("short header", "the header is cut short"),
    ("declares 4 GiB", "more than an IDX data set here may hold"),
])
def test_fashion_mnist_idx_contents_are_checked(tmp_path, case, match):
    """Each file named with what is wrong; a small gzip file that declares 4 GiB is refused before it is read."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 30),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 10)}
    if case == "labels 2-D":
        arrays["train-labels-idx1-ubyte"] = rng.integers(0, 10, (30, 1))
    elif case == "label 200":
        arrays["train-labels-idx1-ubyte"][3] = 200
    elif case == "10 labels for 30 images":
        arrays["train-labels-idx1-ubyte"] = rng.integers(0, 10, 10)
    elif case == "zero images":
        arrays["t10k-images-idx3-ubyte"] = np.zeros((0, 28, 28))
        arrays["t10k-labels-idx1-ubyte"] = np.zeros((0,))
    for name, array in arrays.items():
        _write_idx(tmp_path / name, array, gz=True)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    if case == "short header":
        bad.write_bytes(gzip.compress(struct.pack(">BBBB", 0, 0, 0x08, 3) + b"\x00\x00"))
    elif case == "declares 4 GiB":
        bad.write_bytes(gzip.compress(struct.pack(">BBBBIII", 0, 0, 0x08, 3, 1 << 22, 32, 32)))
    with pytest.raises(ValueError, match=match):
        data.load_dataset("fashion-mnist", tmp_path)


def test_cifar_loader_reads_torchvision_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, 4))}, f)
    d = data.load_dataset("cifar10", tmp_path)
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32) and d.num_classes == 10


def test_batches_are_seeded_per_epoch_and_augment_keeps_shape():
    x, y = torch.randn(50, 1, 8, 8), torch.arange(50)
    a = [yb.tolist() for _, yb in data.batches(x, y, 16, seed=3, epoch=2, pad=1, flip=True)]
    b = [yb.tolist() for _, yb in data.batches(x, y, 16, seed=3, epoch=2, pad=1, flip=True)]
    c = [yb.tolist() for _, yb in data.batches(x, y, 16, seed=3, epoch=3, pad=1, flip=True)]
    assert a == b and a != c and sorted(sum(a, [])) == list(range(50))
    xb, _ = next(data.batches(x, y, 16, seed=0, pad=1, flip=True))
    assert xb.shape == (16, 1, 8, 8)


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "polarprune_cuda", "info", "--json"], capture_output=True, text=True,
                         check=True)
    info = json.loads(out.stdout)
    assert info["backends"]["backends"]["torch"]["available"]


def test_info_is_a_readable_table_that_says_what_an_installed_extension_without_a_gpu_means(capsys, monkeypatch):
    found = {"versions": {"polarprune_cuda": "0.1.0", "torch": "2.x"},
             "backends": {"forced": None, "torch": "2.x", "torch_cuda": "13.0", "cuda_device_available": False,
                          "selected": {"cpu": "torch", "cuda": "cuda"},
                          "backends": {"cuda": {"available": True, "reason": "compiled extension", "version": "13.0",
                                                "ops": []},
                                       "triton": {"available": False, "reason": "no CUDA device", "version": "3",
                                                  "ops": []},
                                       "torch": {"available": True, "reason": "reference", "version": "2.x",
                                                 "ops": []}}}}
    text = cli.info_text(found)
    assert "{" not in text and "backend  runs here" in text
    cuda = next(line for line in text.splitlines() if line.startswith("cuda "))
    assert "no GPU" in cuda and "no CUDA device to run it" in cuda        # not "available": true
    assert "cpu tensors -> torch" in text and "cuda tensors" not in text
    found["backends"]["cuda_device_available"] = True
    gpu = cli.info_text(found)
    assert next(line for line in gpu.splitlines() if line.startswith("cuda ")).split()[1] == "yes"
    assert "cuda tensors -> cuda" in gpu
    rc = cli.main(["info"])
    assert rc == 0 and "backend  runs here" in capsys.readouterr().out


def test_help_shows_every_default_and_argparse_errors_are_one_line(capsys):
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name in ("prune", "export"):
        p = sub.choices[name]
        for action in p._actions:
            if not action.option_strings or action.default in (None, False, "==SUPPRESS==") \
                    or action.help == "==SUPPRESS==":
                continue
            flag = action.option_strings[-1]
            after = " ".join(p._get_formatter()._format_action(action).split())   # this option's help, joined
            assert f"(default: {action.default})" in after, (name, flag)
    for argv, needle in ((["prune", "--dataset", "mnist"], "invalid choice: 'mnist'"),
                         (["prune", "--epoch", "1"], "unrecognized arguments: --epoch 1"),   # no abbreviations
                         (["export"], "required: run")):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("polarprune: error: ") and needle in err and "--help" in err


# ----------------------------------------------------------------------------- --method fggp / gmp / annealed

@pytest.mark.parametrize("method", ["fggp", "gmp", "annealed"])
def test_unstructured_method_run_writes_the_report(tmp_path, capsys, method):
    from polarprune_cuda.sparse import fggp
    from polarprune_cuda import models

    out = tmp_path / method
    rc, cap = run(["prune", *TINY, "--method", method, "--target-sparsity", "0.9", "--epochs", "4",
                   "--update-every", "2", "--out", str(out), "--baseline"], capsys)
    assert rc == 0, cap.err
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["target_sparsity"] == 0.9
    # 4 epochs x 5 steps: updates at 2, 4, ..., 16 = int(0.8 * 20): the target exactly
    n = report["sparsity"]["total"]
    assert report["pruner"]["updates"] == 8 and report["pruner"]["end_step"] == 16
    assert report["sparsity"]["nonzeros"] == n - int(n * 0.9) or abs(report["achieved_sparsity"] - 0.9) < 2 / n
    assert report["sizes"]["sparse_bytes"] < 0.5 * report["sizes"]["dense_bytes"]
    assert report["accuracy"]["baseline"] is not None and "drop_points" in report["accuracy"]
    assert len(report["history"]["density"]) == 4 and report["history"]["density"][-1] == pytest.approx(0.1, abs=2 / n)
    assert len(report["mask_updates"]) == 8
    for name in ("density.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dense_state = torch.load(out / "model" / "weights.pt", weights_only=True)
    sparse = fggp.load_sparse(out / "model" / "sparse.pt")
    assert all(torch.equal(dense_state[k], sparse[k]) for k in dense_state)
    model = models.build_model("resnet20", 10, 1)
    model.load_state_dict(dense_state)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros >= int(0.9 * n) - 1
    if method != "gmp":      # the first conv stays dense (GMP prunes it, as the authors' main.py does)
        assert int((weights[0] == 0).sum()) == 0
    md = (out / "report.md").read_text()
    assert "dense kernels run the pruned model at the dense model's speed" in md and method in md
    assert f"{method}: weight sparsity" in cap.out


def test_unstructured_resume_after_interruption_equals_uninterrupted(tmp_path, capsys):
    args = ["prune", *TINY, "--method", "fggp", "--target-sparsity", "0.8", "--epochs", "3", "--update-every", "2"]
    rc, cap = run([*args, "--out", str(tmp_path / "a")], capsys)
    assert rc == 0, cap.err
    rc, cap = run([*args, "--out", str(tmp_path / "b"), "--interrupt-after-epoch", "1"], capsys)
    assert rc == 130
    rc, cap = run([*args, "--out", str(tmp_path / "b"), "--resume"], capsys)
    assert rc == 0, cap.err
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert without_clock(a["history"]) == without_clock(b["history"])
    assert a["mask_updates"] == b["mask_updates"]
    assert a["sparsity"] == b["sparsity"] and a["accuracy"] == b["accuracy"]
    wa = torch.load(tmp_path / "a" / "model" / "weights.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "model" / "weights.pt", weights_only=True)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_unstructured_bad_options_are_named(tmp_path, capsys):
    base = ["prune", *TINY, "--method", "fggp", "--epochs", "1"]
    rc, cap = run([*base, "--target-sparsity", "0", "--out", str(tmp_path / "o1")], capsys)
    assert rc == 2 and "target-sparsity must be in (0, 1) for method fggp" in cap.err
    rc, cap = run([*base, "--update-every", "0", "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "update-every must be a positive int" in cap.err
    rc, cap = run([*base, "--update-every", "50", "--out", str(tmp_path / "o3")], capsys)
    assert rc == 2 and "before the first update" in cap.err
    rc, cap = run([*base, "--finetune-epochs", "1", "--out", str(tmp_path / "o4")], capsys)
    assert rc == 2 and "finetune-epochs applies to method polar only" in cap.err


@pytest.mark.parametrize("flag", ["--blocks", "--blocks-only"])
def test_block_gating_run_lists_removed_blocks(tmp_path, capsys, flag):
    from polarprune_cuda import load_pruned, models
    from polarprune_cuda.surgery.blocks import ClosedBlock

    out = tmp_path / "run"
    rc, cap = run(["prune", *TINY, "--epochs", "3", "--warmup-epochs", "0", "--ramp-epochs", "1", "--target-sparsity",
                   "0.6", "--out", str(out), flag], capsys)
    assert rc == 0, cap.err
    report = json.loads((out / "report.json").read_text())
    _check_schema(report)
    blocks = report["blocks"]
    assert blocks["gated"] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    if flag == "--blocks-only":   # with channel gates beside them, a tiny run may close channels only
        assert blocks["removed"], "a 60% MACs target on ResNet-20 with block gates only removes blocks"
    assert blocks["depth"]["pruned"] == blocks["depth"]["predicted"] == 20 - sum(
        1 if name.endswith(".0") and not name.startswith("layer1") else 2 for name in blocks["removed"])
    assert report["config"]["blocks"] and report["config"]["channel_gates"] == (flag == "--blocks")
    assert f"removed blocks ({len(blocks['removed'])} of 9)" in cap.out
    assert "Removed residual blocks" in (out / "report.md").read_text()
    spec = json.loads((out / "model" / "spec.json").read_text())
    assert spec["removed_blocks"] == blocks["removed"]
    model = load_pruned(out / "model", lambda: models.resnet20(num_classes=10, in_channels=1))
    assert sorted(n for n, m in model.named_modules() if isinstance(m, ClosedBlock)) == sorted(blocks["removed"])
    if flag == "--blocks-only":
        assert all(len(g["kept"]) == g["channels"] for g in spec["groups"])   # no channel removed


def test_block_options_are_checked(tmp_path, capsys):
    rc, cap = run(["prune", *TINY, "--method", "fggp", "--blocks", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "blocks applies to method polar only" in cap.err


def test_plots_mark_the_freeze_label_the_extracted_network_and_keep_a_log_scale():
    """gates.png: a logarithmic colour scale (the first epoch's spike does not blacken the rest) and the epoch
    from which the gates no longer change; accuracy.png: epochs after the switch are the extracted network's."""
    from matplotlib.colors import LogNorm

    from polarprune_cuda.train import plots

    hist = {"epoch": [1, 2, 3, 4], "test_accuracy": [0.5, 0.6, 0.7, 0.8], "epoch_step": [10, 20, 30, 40],
            "switch_step": [12], "histogram": [[10] + [0] * 19, [5] + [0] * 18 + [5], [4] + [0] * 18 + [6],
                                              [4] + [0] * 18 + [6]]}
    report = {"history": hist, "config": {"epochs": 4, "freeze_gates_at": 0.3}}
    assert plots._frozen_from(report) == 2                    # epoch 2 ends (step 20) after the switch (step 12)
    segments = plots.accuracy_segments(hist, "gated model", 2)
    assert [name for name, _, _ in segments] == ["gated model", "extracted network (training)"]
    assert segments[0][1] == [1] and segments[1][1] == [1, 2, 3, 4]     # joined at epoch 1
    kept = dict(hist, switch_step=[])                          # --keep-gated: the freeze from the recipe
    assert plots._frozen_from({"history": kept, "config": {"epochs": 4, "freeze_gates_at": 0.3}}) == 2
    assert plots.accuracy_segments(kept, "gated model", 2)[1][0] == "gated model, gates frozen"
    assert plots.accuracy_segments(hist, "gated model", None) == [("gated model", [1, 2, 3, 4], [50, 60, 70, 80])]
    image, norm = plots.gate_image(hist)
    assert isinstance(norm, LogNorm) and image.shape == (20, 4)
    assert torch.isnan(image[1:19]).all() and image[0, 0] == 1.0 and image[19, 1] == 0.5


def test_latency_speedup_is_the_rounds_median_with_its_spread_and_says_when_it_is_unreliable():
    """The report's latency speedup: per-round ratios (dense / pruned, interleaved), measured until their
    spread is within 10% of the median or the time is up; a spread that covers 1.0x is flagged, not reported
    as a speedup."""
    from polarprune_cuda.train import report as report_mod

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    def timed(clock, durations):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.calls = 0

            def forward(self, x):
                clock.now += durations(self.calls)
                self.calls += 1
                return x
        return Net()

    x = torch.zeros(1)
    clock = Clock()       # steady: 2.0 against 1.0 every round: stable after the first 30 rounds, 2x, reliable
    lat = report_mod.latency_side_by_side({"dense": timed(clock, lambda i: 2.0), "pruned": timed(clock, lambda i: 1.0)},
                                          x, warmup=0, max_seconds=1e9, clock=clock)
    assert lat["dense"]["rounds"] == 30 and lat["speedup_rounds"] == {"median": 2.0, "q1": 2.0, "q3": 2.0,
                                                                     "reliable": True}
    clock = Clock()       # noisy: the pruned model 0.6 or 1.6 by turns against 1.0: measured to the cap, unreliable
    lat = report_mod.latency_side_by_side({"dense": timed(clock, lambda i: 1.0),
                                           "pruned": timed(clock, lambda i: 0.6 if i % 2 else 1.6)},
                                          x, warmup=0, max_seconds=1e9, max_rounds=80, clock=clock)
    sr = lat["speedup_rounds"]
    assert lat["dense"]["rounds"] == 80 and sr["q1"] < 1.0 < sr["q3"] and not sr["reliable"]
    text = report_mod.speedup_text({"speedup": sr["median"], "speedup_rounds": sr})
    assert "unreliable: the spread covers 1.0x" in text
    clock = Clock()       # the same noise under a time budget: measuring stops when it is spent
    lat = report_mod.latency_side_by_side({"dense": timed(clock, lambda i: 1.0),
                                           "pruned": timed(clock, lambda i: 0.6 if i % 2 else 1.6)},
                                          x, warmup=0, max_seconds=100.0, clock=clock)
    assert 45 <= lat["dense"]["rounds"] <= 50          # a round costs 2.1 on average: 100 buys about 48
    clock = Clock()       # the limits default to the module's, read at the call (the suite sets 1 s): 30 rounds
    lat = report_mod.latency_side_by_side({"dense": timed(clock, lambda i: 1.0),
                                           "pruned": timed(clock, lambda i: 0.6 if i % 2 else 1.6)},
                                          x, warmup=0, clock=clock)
    assert report_mod.MAX_SECONDS == 1.0 and lat["dense"]["rounds"] == 30


def test_cost_latency_run_reports_predicted_beside_measured(tmp_path, capsys, monkeypatch):
    """--cost latency: the tables are measured at --latency-batch (cached where POLARPRUNE_CACHE_DIR says), the
    budget is in milliseconds, the report puts the cost model's prediction beside the measurement, and --quiet
    keeps the tables' progress bar off."""
    monkeypatch.setenv("POLARPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc, cap = run(["prune", *TINY, "--epochs", "1", "--cost", "latency", "--target-sparsity", "0.3",
                   "--out", str(out)], capsys)
    assert rc == 0, cap.err
    report = json.loads((out / "report.json").read_text())
    tables = json.loads((tmp_path / "cache" / "latency.json").read_text())["tables"]
    assert tables and all(json.loads(k)["batch"] == 4 for k in tables)
    pred = report["latency"]["predicted"]
    assert report["cost"] == "latency" and report["budget"]["cost"] == "latency"
    assert report["achieved_sparsity"] == pytest.approx(1 - pred["pruned_ms"] / pred["dense_ms"])
    assert report["achieved_sparsity"] == pytest.approx(report["budget"]["achieved_sparsity"])
    assert pred["error"] == pytest.approx((pred["pruned_ms"] - report["latency"]["pruned"]["median_ms"])
                                          / report["latency"]["pruned"]["median_ms"])
    assert "latency predicted by the cost model" in (out / "report.md").read_text()
    assert "latency tables" not in cap.err   # --quiet: no bar while the tables are measured either


def test_a_latency_run_resumes_where_the_tables_time_otherwise(tmp_path, capsys, monkeypatch):
    """A --cost latency run interrupted after its gates froze, resumed where the tables are measured anew and
    give other times (another machine, the cache gone): the same gates go on, the budget's figures are
    recomputed from the new tables, and a warning says so (a count-based budget that disagrees is refused)."""
    from torch import nn

    from polarprune_cuda.surgery import latency as lat
    from polarprune_cuda.surgery.costs import widths

    def device(factor):   # a synthetic device: deterministic times, ``factor`` slower on the input side
        def layer_ms(m):
            c_in, c_out = widths(m)
            return 0.1 + 0.01 * factor * c_in + 0.02 * c_out + 0.001 * c_in * c_out
        monkeypatch.setattr(lat, "layer_ms", lambda layer, x: layer_ms(layer))
        monkeypatch.setattr(lat, "network_ms", lambda net, inputs: sum(
            layer_ms(m) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))))

    args = ["prune", *TINY, "--epochs", "2", "--cost", "latency", "--target-sparsity", "0.3"]
    out = tmp_path / "run"
    device(1.0)
    monkeypatch.setenv("POLARPRUNE_CACHE_DIR", str(tmp_path / "here"))
    rc, cap = run([*args, "--interrupt-after-epoch", "1", "--out", str(out)], capsys)
    assert rc == 130, cap.err
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["history"]["budget"]
    assert saved and saved["cost"] == "latency"
    device(3.0)
    monkeypatch.setenv("POLARPRUNE_CACHE_DIR", str(tmp_path / "elsewhere"))
    rc, cap = run([*args, "--out", str(out), "--resume"], capsys)
    assert rc == 0, cap.err
    assert "the latency tables measured now give the run's gates other figures" in cap.err
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["total"] > saved["total"]   # the slower tables' figures, for the same gates
    assert report["budget"]["achieved_sparsity"] == pytest.approx(report["achieved_sparsity"])
