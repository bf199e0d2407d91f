"""Export a zoo model with ``torch.export`` or to ONNX at a fixed input size, and check the ONNX
file against PyTorch with onnxruntime.

Attention exports through the plain-PyTorch reference path of ``zoo.kernels`` (the only path on
CPU): neighborhood/window tables become constant index tensors at the fixed size, BiFormer's
routing a ``TopK``, LITv2's deformable merging ONNX's ``DeformConv`` (opset 19, which
onnxruntime's CPU provider runs). The shapes are fixed because the padding and window sizes are
decided per input size in Python.

Needs ``pip install zoo[export]`` (onnx, onnxscript, onnxruntime) for the ONNX part.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["export_program", "export_onnx", "check_onnx", "OPSET"]

OPSET = 19  # the first opset with DeformConv (LITv2)


def _example(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> torch.Tensor:
    size = tuple(input_size)
    if len(size) == 2:
        size = (getattr(model, "in_chans", 3),) + size
    device = next(model.parameters()).device
    return torch.randn(batch_size, *size, device=device)


def export_program(model: nn.Module, input_size: Sequence[int] = (224, 224), batch_size: int = 1):
    """``torch.export.export`` of the model in eval mode at (C, H, W) or (H, W)."""
    model = model.eval()
    return torch.export.export(model, (_example(model, input_size, batch_size),))


def export_onnx(model: Union[nn.Module, torch.export.ExportedProgram], path: Union[str, Path],
                input_size: Sequence[int] = (224, 224), batch_size: int = 1, opset: int = OPSET) -> Path:
    """Write ``model`` (eval mode) as ONNX with one input ``images`` and one output ``output``.
    ``model`` may also be the result of ``export_program`` (its size is then the one it was
    exported at, and it is not traced again)."""
    path = Path(path)
    if isinstance(model, torch.export.ExportedProgram):
        args = None
    else:
        model = model.eval()
        args = (_example(model, input_size, batch_size),)
    program = torch.onnx.export(model, args, input_names=["images"], output_names=["output"],
                                opset_version=opset, dynamo=True, verbose=False)
    program.save(str(path))
    return path


def check_onnx(model: nn.Module, path: Union[str, Path], x: torch.Tensor = None,
               input_size: Sequence[int] = (224, 224)) -> Tuple[float, torch.Tensor]:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on the same batch; return the largest
    absolute difference of the outputs and the PyTorch output."""
    import onnxruntime as ort
    model = model.eval()
    if x is None:
        x = _example(model, input_size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})[0]
    with torch.no_grad():
        want = model(x)
    return (torch.from_numpy(got) - want.cpu()).abs().max().item(), want
