"""Your model from the CLI: torchvision and timm models by name, module:function from the current folder, --init
from .pt and .safetensors with the classifier re-initialised, options the data set does not read refused."""
import json
import sys
import warnings

import pytest
import torch

from polarprune_cuda import cli
from polarprune_cuda.models import build_model, is_builtin
from polarprune_cuda.train import weights

TINY = ["--dataset", "digits", "--max-train", "64", "--max-test", "32", "--batch-size", "32", "--epochs", "1",
        "--min-channels", "2", "--quiet", "--overwrite"]


def _run(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr()


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "timm:resnet10t"])
def test_models_by_name_on_one_channel_images(name):
    pytest.importorskip("timm" if name.startswith("timm:") else "torchvision")
    model = build_model(name, 7, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert is_builtin(name)


def test_unknown_names_are_named_with_the_close_ones():
    with pytest.raises(ValueError, match="close: .*resnet32"):
        build_model("resnet3", 10)
    with pytest.raises(ValueError, match="timm has no model 'resnet99x'"):
        pytest.importorskip("timm")
        build_model("timm:resnet99x", 10)
    assert not is_builtin("mymodule:net") and not is_builtin("timm:x:y")


def test_module_function_is_found_from_the_current_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets.py").write_text(
        "from polarprune_cuda.models import resnet20\n"
        "def net(num_classes, in_chans=3):\n    return resnet20(num_classes, in_chans)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    rc, cap = _run(["prune", *TINY, "--model", "mynets:net", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, cap.err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert abs(report["achieved_sparsity"] - 0.5) <= 0.005
    assert str(tmp_path) not in sys.path                              # the path is put back


def test_data_dir_with_digits_is_refused(tmp_path, capsys):
    rc, cap = _run(["prune", *TINY, "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert rc != 0 and "data-dir" in cap.err and "digits" in cap.err
    assert not (tmp_path / "o" / "report.json").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_init_with_another_class_count_resets_the_classifier(tmp_path, capsys, suffix):
    """Pretrained on 1000 classes, fine-tuned on digits' 10: the classifier is re-initialised and the report says
    so; every other weight is the checkpoint's."""
    torch.manual_seed(0)
    pretrained = build_model("resnet20", 1000, 1)
    state = {k: v.contiguous() for k, v in pretrained.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors = pytest.importorskip("safetensors.torch")
        safetensors.save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)   # a DDP checkpoint
    model = build_model("resnet20", 10, 1)
    note = weights.load_init(model, path, 10)
    assert note["classifier_reset"] == ["fc.weight", "fc.bias"] and "1000" in note["reason"]
    assert torch.equal(model.conv1.weight, pretrained.conv1.weight)
    assert model.fc.weight.shape == (10, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, cap = _run(["prune", *TINY, "--init", str(path), "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, cap.err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["init"]["classifier_reset"] == ["fc.weight", "fc.bias"]
    # --init's default: the gates freeze at once on the pretrained ranking, the switch at the first step, and
    # no warning that they barely trained (that is what was asked for)
    assert report["training"]["run"]["switch_step"] == 0
    assert not [w for w in caught if "barely trained" in str(w.message) or "never train" in str(w.message)]
    assert "re-initialised" in (tmp_path / "o" / "report.md").read_text()


def test_init_that_does_not_fit_names_every_key(tmp_path):
    state = build_model("resnet20", 10, 1).state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["layer1.0.conv1.weight"]
    state["conv1.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    model = build_model("resnet20", 10, 1)
    with pytest.raises(ValueError, match=r"misshapen conv1\.weight \(16, 3, 3, 3\)"):
        weights.load_init(model, tmp_path / "w.pt", 10)
    state["conv1.weight"] = torch.zeros(16, 1, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"missing 1: layer1\.0\.conv1\.weight; unexpected 1: extra\.weight"):
        weights.load_init(model, tmp_path / "w.pt", 10)
    del state["extra.weight"]
    state["layer1.0.conv1.weight"] = torch.zeros(16, 16, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    note = weights.load_init(model, tmp_path / "w.pt", 10, reset_classifier=True)
    assert note["reason"] == "--reset-classifier" and torch.equal(model.conv1.weight, state["conv1.weight"])
