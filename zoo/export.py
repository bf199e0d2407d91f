"""Export a zoo model with ``torch.export`` or to ONNX at a fixed image size, for any batch size
(or a fixed one), and check the ONNX file against PyTorch with onnxruntime.

Attention exports through the plain-PyTorch reference path of ``zoo.kernels`` (the only path on
CPU): neighborhood/window tables become constant index tensors at the fixed size, BiFormer's
routing a ``TopK``, LITv2's deformable merging ONNX's ``DeformConv`` (opset 19, which
onnxruntime's CPU provider runs). The image size is fixed because the padding and window sizes
are decided per input size in Python; the batch dimension stays free unless ``batch_size`` is
given.

Needs ``pip install zoo[export]`` (onnx, onnxscript, onnxruntime) for the ONNX part.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from zoo.config import value_problem

__all__ = ["export_program", "export_onnx", "check_onnx", "OPSET"]

OPSET = 19  # the first opset with DeformConv (LITv2)


def _example(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> torch.Tensor:
    size = tuple(input_size)
    if len(size) == 2:
        size = (getattr(model, "in_chans", 3),) + size
    weight = next(model.parameters())
    return torch.randn(batch_size, *size, device=weight.device, dtype=weight.dtype)


def export_program(model: nn.Module, input_size: Sequence[int] = (224, 224),
                   batch_size: Optional[int] = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the model in eval mode at (C, H, W) or (H, W). With
    ``batch_size=None`` the program takes any batch size; an int fixes it."""
    if batch_size is not None and value_problem(batch_size, int, lambda v: v >= 1):
        raise ValueError(f"batch_size must be a positive int or None (any batch), got {batch_size!r}")
    model = model.eval()
    free = batch_size is None  # then traced at 2: torch.export specialises a dimension it sees as 1
    return torch.export.export(model, (_example(model, input_size, 2 if free else batch_size),),
                               dynamic_shapes=({0: torch.export.Dim("batch")},) if free else None)


def export_onnx(model: Union[nn.Module, torch.export.ExportedProgram], path: Union[str, Path],
                input_size: Sequence[int] = (224, 224), batch_size: Optional[int] = None,
                opset: int = OPSET) -> Path:
    """Write ``model`` (eval mode) as ONNX with the input ``images`` and the output ``output``
    (``output0``, ``output1``, ... for a model that returns several, such as ``features_only``);
    the batch dimension is the free axis ``batch`` with ``batch_size=None``, fixed by an int.
    ``model`` may also be the result of ``export_program`` (its shapes are then the ones it was
    exported with, and it is not traced again)."""
    path = Path(path)
    if not isinstance(model, torch.export.ExportedProgram):
        model = export_program(model, input_size, batch_size)
    program = torch.onnx.export(model, None, input_names=["images"], opset_version=opset,
                                dynamo=True, verbose=False)
    _name_outputs_and_batch(program.model.graph)
    program.save(str(path))
    return path


def _name_outputs_and_batch(graph) -> None:
    """Readable names in the ONNX graph: outputs ``output``/``output<i>``, and the symbol of a free
    batch dimension (``s77`` or the like, from torch.export) ``batch`` on every value."""
    import onnx_ir as ir
    outputs = list(graph.outputs)
    for i, value in enumerate(outputs):
        value.name = "output" if len(outputs) == 1 else f"output{i}"
    batch = graph.inputs[0].shape[0]
    if not isinstance(batch, ir.SymbolicDim):
        return
    values = list(graph.inputs) + outputs + [v for node in graph.all_nodes() for v in node.outputs]
    for value in values:
        if value.shape is not None and batch in value.shape.dims:
            value.shape = ir.Shape([ir.SymbolicDim("batch") if d == batch else d
                                    for d in value.shape.dims])


def check_onnx(model: nn.Module, path: Union[str, Path], x: Optional[torch.Tensor] = None
               ) -> Tuple[float, Union[torch.Tensor, Sequence[torch.Tensor]]]:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on the same batch ``x`` (default: a
    random batch of 2, or of the file's fixed batch size, at the file's image size, in the model's
    dtype: float32 or float16); return the largest absolute difference over all outputs, and the
    PyTorch output."""
    import onnxruntime as ort
    model = model.eval()
    if next(model.parameters()).dtype == torch.bfloat16:
        raise ValueError("check_onnx runs onnxruntime's CPU provider, which has no bfloat16 kernels (Conv, "
                         "MatMul): check the export of the model in float32 or float16")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if x is None:
        batch, *size = session.get_inputs()[0].shape
        x = _example(model, size, batch if isinstance(batch, int) else 2)
    got = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    with torch.no_grad():
        want = model(x)
    wants = [want] if isinstance(want, torch.Tensor) else list(want.values() if isinstance(want, dict) else want)
    if len(wants) != len(got):
        raise ValueError(f"{path} has {len(got)} outputs, the model returns {len(wants)}")
    return max((torch.from_numpy(g) - w.cpu()).abs().max().item() for g, w in zip(got, wants)), want
