"""Sorting, for exchangeable data (SurVAE Flows), with the pieces its base side needs: the
order statistics of a standard normal and a bijection onto increasing vectors."""

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from ..core import FlowLayer, Surjection
from .abs import _LOG2, half_normal_map, half_normal_map_inverse

__all__ = ["Sort", "OrderStatistics", "Ordered"]


class Sort(Surjection):
    r"""Sorts the event; inference surjection (``log_prob`` is exact).

    Inference :math:`z = \mathrm{sort}(x)` (ascending); generative :math:`x = z_{\pi}` with
    :math:`\pi` a uniformly random permutation; :math:`V = -\log D!`. No parameters.

    The model is exchangeable (:math:`p(x_\pi) = p(x)`) by construction. It normalises only
    if the base side is a density on *sorted* vectors: put :class:`OrderStatistics` as the
    base, or end the layers before ``Sort`` with :class:`Ordered` (a bijection from
    :math:`\mathbb{R}^D` onto increasing vectors). A base on all of :math:`\mathbb{R}^D`
    leaks all mass but :math:`1/D!` of it.

    Args:
        dim: event size ``D``.
    Shapes: ``z`` (sorted), ``x``: ``(*batch, D)``; ``ladj``: ``batch``.
    References: SurVAE Flows (Nielsen et al., 2020), https://arxiv.org/abs/2007.02731
    """

    stochastic_forward, stochastic_inverse = True, False

    def __init__(self, dim):
        super().__init__()
        self.dim = int(dim)
        self.log_count = math.lgamma(self.dim + 1)  # log D!

    def _const(self, y):
        return torch.full(y.shape[:-1], self.log_count, dtype=y.dtype, device=y.device)

    def call_and_ladj(self, z):
        perm = torch.rand(z.shape, device=z.device).argsort(-1)
        return z.gather(-1, perm), self._const(z)

    def inverse_and_ladj(self, x):
        return x.sort(-1).values, -self._const(x)

    def _ladj_of_unseen_pair(self, z, x):
        return self._const(x)

    def extra_repr(self):
        return f"dim={self.dim}"


class OrderStatistics(TorchDistribution):
    r"""The order statistics of ``D`` iid normals: :math:`p(z) = D!\,\prod_i N(z_i; \mu,
    \sigma^2)` on ascending :math:`z_1 \le \dots \le z_D` (``-inf`` elsewhere); sampled by
    sorting iid draws. The ready base for :class:`Sort`: ``Flow(OrderStatistics(D),
    [Sort(D)])`` is exactly iid :math:`N(\mu, \sigma^2)`.

    Args:
        dim: event size ``D``.
        loc, scale: the normals' location and scale (floats or tensors broadcastable to
            ``(*batch, D)``; their batch shape is the distribution's).
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, dim, loc=0.0, scale=1.0, validate_args=None):
        loc, scale = torch.as_tensor(loc), torch.as_tensor(scale)
        if not loc.is_floating_point():
            loc = loc.to(torch.get_default_dtype())
        shape = torch.broadcast_shapes(loc.shape, scale.shape, (int(dim),))
        self.dim = int(dim)
        self.loc = loc.expand(shape).to(loc.dtype)
        self.scale = scale.to(loc).expand(shape)
        super().__init__(shape[:-1], shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + (self.dim,)
        return OrderStatistics(self.dim, self.loc.expand(shape), self.scale.expand(shape))

    def rsample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.loc.shape
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return (self.loc + self.scale * eps).sort(-1).values

    def log_prob(self, value):
        u = (value - self.loc) / self.scale
        lp = (-0.5 * u.square() - self.scale.log()).sum(-1) - 0.5 * self.dim * math.log(
            2 * math.pi) + math.lgamma(self.dim + 1)
        ordered = (value[..., 1:] >= value[..., :-1]).all(-1)
        return lp.masked_fill(~ordered, -math.inf)


class Ordered(FlowLayer):
    r"""Bijection from :math:`\mathbb{R}^D` onto ascending vectors (the cone :class:`Sort`
    needs on its base side): :math:`x_1 = z_1,\ x_i = x_{i-1} + H(z_i)` with
    :math:`H` the :class:`~pyro_flows_ext.surjections.HalfNormalMap` (so :math:`N(0, 1)`
    increments become half-normal gaps), :math:`\log|\det J| = \sum_{i \ge 2}
    ((x_i - x_{i-1})^2 - z_i^2)/2 - \log 2`. Exact; one pass either way.

    Why not ``softplus`` or ``exp`` gaps: sorted samples have gaps whose density is finite and
    non-zero at 0 (near-ties are common), which those maps send to an exponential tail at
    :math:`z \to -\infty` that a Gaussian base cannot follow; :math:`H` keeps gaps near 0 at
    :math:`z` of order 1 and Gaussian tails for large gaps.

    Args:
        dim: event size ``D``.
    Shapes: ``z``, ``x``: ``(*batch, D)``; ``ladj``: ``batch``.
    """

    def __init__(self, dim):
        super().__init__()
        self.dim = int(dim)

    def call_and_ladj(self, z):
        first, rest = z[..., :1], z[..., 1:]
        gaps = half_normal_map(rest)
        x = torch.cat([first, first + gaps.cumsum(-1)], -1)
        return x, (0.5 * (gaps.square() - rest.square()) - _LOG2).sum(-1)

    def inverse_and_ladj(self, x):
        gaps = x.diff(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)  # ties: finite, not NaN
        rest = half_normal_map_inverse(gaps)
        return (torch.cat([x[..., :1], rest], -1),
                -(0.5 * (gaps.square() - rest.square()) - _LOG2).sum(-1))

    def extra_repr(self):
        return f"dim={self.dim}"
