"""The absolute-value surjection (SurVAE Flows, Nielsen et al., 2020)."""

import math

import torch
from torch.distributions import constraints

from ..core import Surjection, broadcast_context
from ._densities import AutoregressiveCategorical

__all__ = ["Abs"]


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
    direction must be positive (an :class:`~pyro_flows_ext.transforms.Exp` layer, or a
    half-normal base), else ``log_prob`` does not integrate to 1.

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
