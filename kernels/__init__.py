"""Functional attention ops of the zoo (installed as ``zoo.kernels``). No nn.Module here."""

from .neighborhood import AxisWindow, axis_window, na2d
from .routed import routed_attention  # noqa: F401  (BiFormer)

__all__ = ["na2d", "axis_window", "AxisWindow"]
