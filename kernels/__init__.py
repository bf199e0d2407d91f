"""Functional attention ops of the zoo (installed as ``zoo.kernels``). No nn.Module here.

``na2d`` is the dispatching front (kernels/dispatch.py): the fused Triton kernel
(kernels/triton_na.py) on CUDA where it applies, the plain-PyTorch reference
(kernels/neighborhood.py, which defines the semantics) elsewhere.
"""

from .dispatch import BACKENDS, backend, na2d, selected_backend
from .neighborhood import AxisWindow, axis_window
from .neighborhood import na2d as na2d_reference
from .routed import routed_attention

__all__ = ["na2d", "na2d_reference", "routed_attention", "backend", "selected_backend", "BACKENDS",
           "axis_window", "AxisWindow"]
