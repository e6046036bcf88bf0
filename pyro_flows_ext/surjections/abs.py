"""The absolute-value surjection (SurVAE Flows, Nielsen et al., 2020)."""

import math

import torch
from torch.distributions import constraints

from ..core import FlowLayer, Surjection, broadcast_context
from ._densities import AutoregressiveCategorical

__all__ = ["Abs", "HalfNormalMap"]

_S2, _LOG2 = math.sqrt(2.0), math.log(2.0)


def _fixed_point(a, sign, start, steps=8):
    """Solves ``b^2 = a^2 + sign (2 log 2 + 2 log(erfcx(hi / s2) / erfcx(lo / s2)))`` with
    ``(hi, lo) = (b, a)`` for ``sign = 1`` else ``(a, b)``: the tail equation
    ``1 - Phi(H) = (1 - Phi(z)) / 2`` written with the scaled erfc, which never underflows."""
    b = start
    for _ in range(steps):
        hi, lo = (b, a) if sign > 0 else (a, b)
        corr = 2 * (torch.special.erfcx(hi / _S2).log() - torch.special.erfcx(lo / _S2).log())
        b = (a.square() + sign * (2 * _LOG2 + corr)).clamp_min(1e-12).sqrt()
    return b


def half_normal_map(z):
    r""":math:`H(z) = \Phi^{-1}((1 + \Phi(z)) / 2)`: maps :math:`N(0, 1)` onto the half-normal."""
    zn, zm, zb = z.clamp(max=0.0), z.clamp(0.0, 5.0), z.clamp(min=5.0)
    neg = _S2 * torch.erfinv(0.5 * torch.erfc(-zn / _S2))
    mid = -torch.special.ndtri(0.25 * torch.erfc(zm / _S2))
    big = _fixed_point(zb, 1, (zb.square() + 2 * _LOG2).sqrt())
    return torch.where(z <= 0, neg, torch.where(z <= 5, mid, big))


def half_normal_map_inverse(u):
    r""":math:`H^{-1}(u) = \Phi^{-1}(2\Phi(u) - 1)` for ``u > 0``."""
    us = u.clamp(torch.finfo(u.dtype).tiny, 1.0)
    um, ub = u.clamp(1.0, 5.0), u.clamp(min=5.0)
    small = torch.special.ndtri(torch.erf(us / _S2))
    mid = -torch.special.ndtri(torch.erfc(um / _S2))
    big = _fixed_point(ub, -1, (ub.square() - 2 * _LOG2).sqrt())
    return torch.where(u <= 1, small, torch.where(u <= 5, mid, big))


class HalfNormalMap(FlowLayer):
    r"""Bijection from :math:`\mathbb{R}^D` onto the positive orthant that maps
    :math:`N(0, I)` exactly onto the half-normal: :math:`x = \Phi^{-1}((1 + \Phi(z))/2)`
    element-wise, :math:`\log|\det J| = \sum_i (x_i^2 - z_i^2)/2 - \log 2`. Exact.

    The base-side map :class:`Abs` needs: ``Flow(None, [..., HalfNormalMap(D), Abs(D)])``
    is exactly :math:`N(0, I)` while the layers before it are the identity and the signs
    uniform (so a builder's Gaussian start survives), its tails stay Gaussian (``Exp``
    gives log-normal ones), and the density at :math:`x_i = 0` stays finite and non-zero
    (``Exp`` or a softplus put a hole along every axis).

    Args:
        dim: event size ``D`` (``None`` accepts any).
    Shapes: ``z``, ``x``: ``(*batch, D)``; ``x > 0``.
    """

    codomain = constraints.independent(constraints.positive, 1)

    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def call_and_ladj(self, z):
        x = half_normal_map(z)
        return x, (0.5 * (x.square() - z.square()) - _LOG2).sum(-1)

    def inverse_and_ladj(self, x):
        z = half_normal_map_inverse(x)
        return z, -(0.5 * (x.square() - z.square()) - _LOG2).sum(-1)


class Abs(Surjection):
    r"""Absolute value; inference surjection (``log_prob`` is exact).

    Inference :math:`z = |x|`; generative :math:`x = s \odot z` with signs
    :math:`s \sim p(s \mid z, c)`; :math:`V = \log p(s = \mathrm{sign}(x) \mid |x|, c)`.

    The sign model is autoregressive over the ``D`` signs (a MADE conditioned on
    :math:`|x|`), so it can learn which sign patterns occur where, including correlated ones
    (a checkerboard has signs ``(+,+)`` and ``(-,-)`` in the same folded cell); it starts
    uniform, :math:`V = -D\log 2`. ``learn_signs=False`` keeps the signs uniform (SurVAE's
    ``SimpleAbsSurjection``, no parameters). Scoring costs one sign-net pass, sampling ``D``.

    The base side lives on the positive orthant: whatever feeds ``Abs`` in the generative
    direction must be positive (:class:`HalfNormalMap`, which keeps an identity-initialised
    flow exactly :math:`N(0, I)`; :class:`~pyro_flows_ext.transforms.Exp`; or a half-normal
    base), else ``log_prob`` does not integrate to 1.

    Args:
        dim: event size ``D``.
        learn_signs: learn :math:`p(s \mid |x|)` (else uniform signs).
        hidden_dims: hidden sizes of the sign network.
        context_dim: size of a context the signs also depend on (``layer.condition(c)``).
    Shapes: ``z`` (positive), ``x``: ``(*batch, D)``; ``ladj``: ``batch``.
    References: SurVAE Flows (Nielsen et al., 2020), https://arxiv.org/abs/2007.02731
    """

    stochastic_forward, stochastic_inverse = True, False
    domain = constraints.independent(constraints.positive, 1)
    codomain = constraints.independent(constraints.real, 1)

    def __init__(self, dim, learn_signs=True, hidden_dims=(32, 32), context_dim=0):
        super().__init__()
        self.dim, self.context_dim = int(dim), int(context_dim)
        self.learn_signs = bool(learn_signs)
        self.signs = (AutoregressiveCategorical(self.dim, 2, self.dim + self.context_dim,
                                                hidden_dims) if self.learn_signs else None)

    def _features(self, z, context):
        self._require_context(context)
        if not self.context_dim:
            return z, z
        context, z = broadcast_context(context, z)
        return z, torch.cat([z, context], -1)

    def _log_p_signs(self, positive, features):
        if self.signs is None:
            return torch.full(positive.shape[:-1], -self.dim * math.log(2.0),
                              dtype=features.dtype, device=features.device)
        return self.signs.log_prob(positive.long(), features)

    def call_and_ladj(self, z, context=None):
        z, features = self._features(z, context)
        if self.signs is None:
            positive = torch.rand_like(z) < 0.5
            log_p = self._log_p_signs(positive, features)
        else:
            k, log_p = self.signs.sample_and_log_prob(features)
            positive = k.bool()
        return torch.where(positive, z, -z), -log_p

    def inverse_and_ladj(self, x, context=None):
        z, features = self._features(x.abs(), context)
        if self.context_dim:
            x = x.expand(z.shape)
        return z, self._log_p_signs(x >= 0, features)

    def _ladj_of_unseen_pair(self, z, x):
        if self.context_dim:
            return super()._ladj_of_unseen_pair(z, x)
        return -self._log_p_signs(x >= 0, z)

    def extra_repr(self):
        return f"dim={self.dim}, learn_signs={self.learn_signs}, context_dim={self.context_dim}"
