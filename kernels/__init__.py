"""Functional attention ops of the zoo (installed as ``zoo.kernels``). No nn.Module here."""

from .neighborhood import AxisWindow, axis_window, na2d
from .routed import routed_attention

__all__ = ["na2d", "routed_attention", "axis_window", "AxisWindow"]
