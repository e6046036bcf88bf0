"""Element-wise rational-quadratic spline layer (Neural Spline Flows); the coupling version is
:class:`~pyro_flows_ext.transforms.SplineCoupling`."""

import torch
from torch import nn

from ..core import FlowLayer
from .coupling import SplineCoupling
from .element_maps import RationalQuadratic

__all__ = ["RationalQuadraticSpline", "SplineCoupling"]


class RationalQuadraticSpline(FlowLayer):
    r"""Element-wise monotonic rational-quadratic spline with learnable knots.

    :math:`x_i = \mathrm{RQS}_i(z_i)` on ``[-bound, bound]``, the identity outside;
    :math:`\log|\det J| = \sum_i \log \mathrm{RQS}_i'(z_i)`. Starts as the identity; both
    directions are analytic and cost about the same.

    Args:
        dim: event size ``D``.
        count_bins: number of bins ``K``.
        bound: half-width of the spline interval.
    Shapes: ``z``, ``x``: ``(*batch, D)``; ``ladj``: ``batch``.

    References: Durkan et al., Neural Spline Flows, NeurIPS 2019.
    """

    stl_stable = False

    def __init__(self, dim, count_bins=8, bound=3.0):
        super().__init__()
        self.dim, self.count_bins = dim, count_bins
        self.element_map = RationalQuadratic(count_bins, bound)
        self.raw = nn.Parameter(torch.zeros(dim, self.element_map.num_params))

    @property
    def bound(self):
        return self.element_map.bound

    def call_and_ladj(self, z):
        x, lad = self.element_map.forward(z, self.raw)
        return x, lad.sum(-1)

    def inverse_and_ladj(self, x):
        z, lad = self.element_map.inverse(x, self.raw)
        return z, lad.sum(-1)
