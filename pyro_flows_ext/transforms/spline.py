"""Rational-quadratic spline layers: element-wise and coupling (Neural Spline Flows)."""

import torch
from torch import nn

from ..core import FlowLayer, check_event_size
from ..nn import MLP
from ._rqs import num_params, spline_forward, spline_inverse, spline_table
from .coupling import Coupling


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

    def __init__(self, dim, count_bins=8, bound=3.0):
        super().__init__()
        self.dim, self.count_bins, self.bound = dim, count_bins, float(bound)
        self.raw = nn.Parameter(torch.zeros(dim, num_params(count_bins)))

    def call_and_ladj(self, z, context=None):
        check_event_size(z, self.dim, "RationalQuadraticSpline")
        x, lad = spline_forward(z, spline_table(self.raw, self.bound), self.bound)
        return x, lad.sum(-1)

    def inverse_and_ladj(self, x, context=None):
        check_event_size(x, self.dim, "RationalQuadraticSpline")
        z, lad = spline_inverse(x, spline_table(self.raw, self.bound), self.bound)
        return z, lad.sum(-1)


class SplineCoupling(Coupling):
    r"""Rational-quadratic spline coupling (NSF-C): the masked part conditions a spline on
    the rest.

    ``inverse=False`` (default, for density estimation): the spline runs data to base,
    :math:`z_b = \mathrm{RQS}(x_b;\ \theta(x_a, c))`, so ``log_prob`` (``inverse_and_ladj``)
    uses the closed-form spline and sampling solves its quadratic (as zuko's and nflows'
    NSF). ``inverse=True``: :math:`x_b = \mathrm{RQS}(z_b;\ \theta(z_a, c))`, cheaper
    sampling (as Pyro's ``spline_coupling``). Either way :math:`x_a = z_a`, both directions
    are analytic, one network pass each, and :math:`\log|\det J|` is the sum of the spline
    log-derivatives over ``b``. The conditioner's last layer starts at zero, so the layer
    starts as the identity.

    Args:
        dim: event size ``D >= 2``.
        hidden_dims: hidden sizes of the conditioner MLP.
        count_bins: bins per spline.
        bound: half-width of the spline interval (identity tails outside).
        mask: boolean ``(D,)``, True where ``z`` passes through; default the first ``D // 2``.
        context_dim: size of a context vector concatenated to the conditioner input
            (``0``: unconditional); use ``layer.condition(c)`` or ``context=``.
        inverse: which direction applies the spline itself (see above).
    Shapes: ``z``, ``x``: ``(*batch, D)``; context ``(*batch, C)``; ``ladj``: ``batch``.

    References: Durkan et al., Neural Spline Flows, NeurIPS 2019.
    """

    def __init__(self, dim, hidden_dims=(64, 64), count_bins=8, bound=3.0, mask=None,
                 context_dim=0, inverse=False):
        super().__init__(dim, mask, context_dim)
        self.count_bins, self.bound, self.inverse = count_bins, float(bound), bool(inverse)
        self._nb = dim - self.num_passive
        self._np = num_params(count_bins)
        # round the conditioner's output up to a multiple of 8: CPU matmuls with an odd
        # output width (e.g. 23) run ~1.7x slower; the spare outputs start (and stay) at zero
        n_out = self._nb * self._np
        self.net = MLP(self.num_passive + context_dim, -(-n_out // 8) * 8, tuple(hidden_dims))

    def _transform(self, y, context, spline):
        y_a, y_b, features = self._split(y, context)
        raw = self.net(features)[..., :self._nb * self._np].unflatten(-1, (self._nb, self._np))
        out_b, lad = spline(y_b, spline_table(raw, self.bound), self.bound)
        return self._join(y_a, out_b), lad.sum(-1)

    def call_and_ladj(self, z, context=None):
        return self._transform(z, context, spline_inverse if not self.inverse else spline_forward)

    def inverse_and_ladj(self, x, context=None):
        return self._transform(x, context, spline_forward if not self.inverse else spline_inverse)
