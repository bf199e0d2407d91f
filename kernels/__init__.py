"""Functional attention ops of the zoo (installed as ``zoo.kernels``). No nn.Module here.

``na2d`` and ``routed_attention`` are dispatching fronts (kernels/dispatch.py): the fused Triton
kernels (kernels/triton_na.py, kernels/triton_routed.py) on CUDA where they apply, the
plain-PyTorch references (kernels/neighborhood.py, kernels/routed.py, which define the
semantics) elsewhere.
"""

from .dispatch import BACKENDS, backend, na2d, routed_attention, selected_backend
from .neighborhood import AxisWindow, axis_window
from .neighborhood import na2d as na2d_reference
from .routed import routed_attention as routed_attention_reference

__all__ = ["na2d", "na2d_reference", "routed_attention", "routed_attention_reference", "backend",
           "selected_backend", "BACKENDS", "axis_window", "AxisWindow"]
