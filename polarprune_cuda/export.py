"""Deploy an extracted model: ``torch.export`` (.pt2) and ONNX (through the dynamo exporter).

An extracted model is a plain module (no gates, no custom ops), so the
standard export paths take it as it is. Both functions check the exported
program against eager on the example input and raise if they differ.

    polarprune export runs/r20-p50                  # runs/r20-p50/model.pt2
    polarprune export runs/r20-p50 --format onnx    # runs/r20-p50/model.onnx (pip install polarprune_cuda[onnx])
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import atomic_write


def _inputs(example_inputs) -> tuple[Tensor, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(t, Tensor)
                                                                             for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor (or a tuple of tensors) shaped like one batch of input")


def _check(ref: Tensor, got: Tensor, what: str, rtol: float) -> None:
    if ref.shape != got.shape:
        raise RuntimeError(f"{what} output shape {tuple(got.shape)} differs from eager's {tuple(ref.shape)}")
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((ref.float() - got.float()).abs().max()) if ref.numel() else 0.0
    if not err <= rtol * scale + 1e-6:
        raise RuntimeError(f"{what} differs from eager: max |diff| {err:.3g} for max |out| {scale:.3g}")


def export_program(model: nn.Module, example_inputs, path=None, dynamic_batch: bool = True,
                   check: bool = True) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``model`` in eval mode; saved to ``path`` (.pt2) when given.

    ``dynamic_batch`` makes dim 0 of every input dynamic (the example's batch
    must then be at least 2). With ``check`` the program's outputs are compared
    with eager's on ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args = _inputs(example_inputs)
    if dynamic_batch and any(t.shape[0] < 2 for t in args):
        raise ValueError("example_inputs must have a batch of at least 2 for a dynamic batch dimension "
                         "(or pass dynamic_batch=False)")
    model = model.eval()
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} for _ in args)
    with torch.no_grad():
        program = torch.export.export(model, args, dynamic_shapes=shapes)
        if check:
            _check(model(*args), program.module()(*args), "torch.export program", 1e-5)
    if path is not None:
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return program


def onnx_available() -> str | None:
    """None when ONNX export can run, else why not."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return (f"ONNX export needs the onnx and onnxscript packages ({exc.name} is missing): "
                "pip install 'polarprune_cuda[onnx]'")
    return None


def export_onnx(model: nn.Module, example_inputs, path, dynamic_batch: bool = True, check: bool = True) -> Path:
    """ONNX through ``torch.onnx.export(..., dynamo=True)``; checks the file with ``onnx.checker`` and,
    when onnxruntime is installed, its outputs against eager's."""
    why = onnx_available()
    if why is not None:
        raise RuntimeError(why)
    import onnx

    args = _inputs(example_inputs)
    model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = None
    if dynamic_batch:
        shapes = tuple({0: torch.export.Dim("batch", min=1)} for _ in args)

    def write(tmp: str) -> None:   # a fresh, uniquely named file beside path (never a planted link), then renamed
        with torch.no_grad():
            torch.onnx.export(model, args, tmp, dynamo=True, dynamic_shapes=shapes, external_data=False)
        onnx.checker.check_model(tmp)
        if check:
            try:
                import onnxruntime as ort
            except ImportError:
                ort = None
            if ort is not None:
                session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
                feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), args)}
                got = torch.from_numpy(session.run(None, feeds)[0])
                with torch.no_grad():
                    _check(model(*args).cpu(), got, "ONNX model", 1e-4)

    atomic_write(path, write)
    return path


__all__ = ["export_onnx", "export_program", "onnx_available"]
