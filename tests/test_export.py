"""Export of extracted models: torch.export (.pt2) and ONNX through the dynamo exporter."""
import json

import pytest
import torch
import torchvision

import polarprune_cuda as pp
from polarprune_cuda import cli
from polarprune_cuda.surgery.blocks import ClosedBlock
from polarprune_cuda.export import export_onnx, export_program, onnx_available
from helpers import pick_closed, set_gates
from helpers import randomize_bn

MODELS = {
    "cifar_resnet20_blocks": (lambda: pp.resnet20(), (4, 3, 32, 32)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
}


def extracted(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    x = torch.randn(*shape)
    pp.attach_gates(model, x, min_channels=1, blocks=True)
    blocks = [b.name for b in model.polarprune_bank.surgery.blocks]
    set_gates(model, seed=2, closed_blocks=pick_closed(blocks, seed=4))
    small = pp.extract(model, x).eval()
    assert any(isinstance(m, ClosedBlock) for m in small.modules())
    return small, x


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_matches_eager(name, tmp_path):
    small, x = extracted(name)
    program = export_program(small, x, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    with torch.no_grad():
        ref = small(x)
        torch.testing.assert_close(program.module()(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5)
        # the batch dimension stays dynamic
        torch.testing.assert_close(loaded(x[:1]), small(x[:1]), rtol=1e-5, atol=1e-5)


def test_onnx_export_matches_eager(tmp_path):
    assert onnx_available() is None, onnx_available()     # onnx and onnxscript are test dependencies
    import onnxruntime as ort

    small, x = extracted("cifar_resnet20_blocks")
    path = export_onnx(small, x, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, *x.shape[1:])
    (got,) = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), small(x3), rtol=1e-4, atol=1e-4)


def test_onnx_export_writes_through_a_fresh_file(tmp_path, monkeypatch):
    """A link planted at the old temporary name (model.onnx.tmp) is never written through; a failed export
    leaves no temporary file."""
    small, x = extracted("cifar_resnet20_blocks")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "m.onnx.tmp").symlink_to(outside)
    export_onnx(small, x, run / "m.onnx", check=False)
    assert outside.read_bytes() == b"keep" and not (run / "m.onnx").is_symlink()
    assert sorted(p.name for p in run.iterdir()) == ["m.onnx", "m.onnx.tmp"]
    import onnx

    def broken(*a, **k):
        raise RuntimeError("checker failed")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(RuntimeError, match="checker failed"):
        export_onnx(small, x, run / "n.onnx", check=False)
    assert sorted(p.name for p in run.iterdir()) == ["m.onnx", "m.onnx.tmp"]


def test_export_refuses_a_single_sample_for_a_dynamic_batch():
    with pytest.raises(ValueError, match="batch of at least 2"):
        export_program(pp.resnet20().eval(), torch.randn(1, 3, 32, 32))


def test_cli_exports_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["prune", "--dataset", "digits", "--model", "resnet20", "--max-train", "96", "--max-test", "30",
                   "--batch-size", "32", "--epochs", "1", "--latency-batch", "4", "--quiet", "--blocks",
                   "--out", str(out)])
    assert rc == 0
    for fmt in ("pt2", "onnx"):
        rc = cli.main(["export", str(out), "--format", fmt])
        assert rc == 0, capsys.readouterr().err
        assert (out / f"model.{fmt}").stat().st_size > 1000
    model, sample_shape = cli.load_run(out)
    x = torch.randn(5, *sample_shape)
    program = torch.export.load(out / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)
    rc = cli.main(["export", str(tmp_path / "nothing")])
    assert rc == 2 and "report.json not found" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 1
