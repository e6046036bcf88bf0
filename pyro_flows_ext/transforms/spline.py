"""Rational-quadratic spline layers: element-wise and coupling (Neural Spline Flows)."""

import torch
from torch import nn

from ..core import FlowLayer, broadcast_context, check_event_size
from ..nn import MLP
from ._rqs import knots, num_params, rqs_forward, rqs_inverse


class RationalQuadraticSpline(FlowLayer):
    r"""Element-wise monotonic rational-quadratic spline with learnable knots.

    :math:`x_i = \mathrm{RQS}_i(z_i)` on ``[-bound, bound]``, the identity outside;
    :math:`\log|\det J| = \sum_i \log \mathrm{RQS}_i'(z_i)`. Starts as the identity; both
    directions are analytic and cost the same.

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

    def _knots(self):
        return knots(self.raw, self.bound)

    def call_and_ladj(self, z, context=None):
        check_event_size(z, self.dim, "RationalQuadraticSpline")
        x, lad = rqs_forward(z, *self._knots(), self.bound)
        return x, lad.sum(-1)

    def inverse_and_ladj(self, x, context=None):
        check_event_size(x, self.dim, "RationalQuadraticSpline")
        z, lad = rqs_inverse(x, *self._knots(), self.bound)
        return z, lad.sum(-1)


class SplineCoupling(FlowLayer):
    r"""Rational-quadratic spline coupling (NSF-C): the masked part conditions a spline on
    the rest.

    :math:`x_a = z_a,\ x_b = \mathrm{RQS}(z_b;\ \theta(z_a, c))`,
    :math:`\log|\det J| = \sum_{i \in b} \log \mathrm{RQS}'(z_i)`. The conditioner's last
    layer starts at zero, so the layer starts as the identity. One network pass in either
    direction.

    Args:
        dim: event size ``D >= 2``.
        hidden_dims: hidden sizes of the conditioner MLP.
        count_bins: bins per spline.
        bound: half-width of the spline interval (identity tails outside).
        mask: boolean ``(D,)``, True where ``z`` passes through; default the first ``D // 2``.
        context_dim: size of a context vector concatenated to the conditioner input
            (``0``: unconditional); use ``layer.condition(c)`` or ``context=``.
    Shapes: ``z``, ``x``: ``(*batch, D)``; context ``(*batch, C)``; ``ladj``: ``batch``.

    References: Durkan et al., Neural Spline Flows, NeurIPS 2019.
    """

    def __init__(self, dim, hidden_dims=(64, 64), count_bins=8, bound=3.0, mask=None,
                 context_dim=0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"SplineCoupling needs dim >= 2 to split the event, got {dim}")
        if mask is None:
            mask = torch.arange(dim) < dim // 2
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (dim,) or mask.all() or not mask.any():
            raise ValueError(f"mask must be a boolean tensor of shape ({dim},) with both "
                             f"True and False entries, got {mask.tolist()}")
        self.dim, self.count_bins, self.bound = dim, count_bins, float(bound)
        self.context_dim = context_dim
        self.register_buffer("mask", mask)
        self.register_buffer("idx_a", mask.nonzero().flatten())
        self.register_buffer("idx_b", (~mask).nonzero().flatten())
        order = torch.cat([self.idx_a, self.idx_b])
        self._permuted = not torch.equal(order, torch.arange(dim))
        self.register_buffer("unorder", torch.argsort(order))
        self._nb = dim - int(mask.sum())
        self.net = MLP(int(mask.sum()) + context_dim, self._nb * num_params(count_bins),
                       tuple(hidden_dims))

    def _transform(self, y, context, inverse):
        check_event_size(y, self.dim, "SplineCoupling")
        self._require_context(context)
        y_a, y_b = y[..., self.idx_a], y[..., self.idx_b]
        h = y_a
        if self.context_dim:
            h = torch.cat([y_a, broadcast_context(context, y_a)], dim=-1)
        raw = self.net(h).unflatten(-1, (self._nb, num_params(self.count_bins)))
        spline = rqs_inverse if inverse else rqs_forward
        out_b, lad = spline(y_b, *knots(raw, self.bound), self.bound)
        out = torch.cat([y_a, out_b], dim=-1)
        if self._permuted:
            out = out[..., self.unorder]
        return out, lad.sum(-1)

    def call_and_ladj(self, z, context=None):
        return self._transform(z, context, inverse=False)

    def inverse_and_ladj(self, x, context=None):
        return self._transform(x, context, inverse=True)
