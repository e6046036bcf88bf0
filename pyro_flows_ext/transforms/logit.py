r"""Logit preprocessing of bounded data (RealNVP, Dinh et al. 2017, section 4.1)."""

import math

import torch
import torch.nn.functional as F
from torch.distributions import constraints

from ..core import FlowLayer

__all__ = ["Logit"]


class Logit(FlowLayer):
    r"""Maps data :math:`y \in [0, k)` to the real line, the data-side layer of an image flow
    (just before the dequantization): inference (data to base)
    :math:`s = \mathrm{logit}(\alpha + (1 - 2\alpha)\, y / k)`; generative
    :math:`y = k\,(\sigma(s) - \alpha) / (1 - 2\alpha)`.

    :math:`\log|\partial s/\partial y| = \log(1 - 2\alpha) - \log k - \log p - \log(1 - p)`
    per element, with :math:`p = \alpha + (1 - 2\alpha) y / k`. The :math:`-\log k` term is
    the change of units from ``[0, k)`` to ``[0, 1)`` (so a flow modelling ``s`` gives the
    density of ``y`` in pixel units, as bits/dim needs); :math:`\alpha` keeps ``p`` away from
    0 and 1, where the logit is infinite, and contributes :math:`\log(1 - 2\alpha)`. Exact.

    Generative values can leave ``[0, k)`` slightly (``y`` ranges over
    :math:`(-\alpha k/(1-2\alpha),\ k(1-\alpha)/(1-2\alpha))`): that mass is outside the data
    range, so a discrete model built on it is sub-normalised and its likelihoods stay lower
    bounds (:class:`~pyro_flows_ext.surjections.UniformDequantization` clamps samples).

    Args:
        dim: event size (channels for images); ``None`` accepts any.
        alpha: the margin :math:`\alpha \in [0, 1/2)` (RealNVP uses 0.05 on CIFAR-10).
        scale: :math:`k`, the data range ``[0, k)`` (the number of levels for dequantized
            ``k``-level data).
        event_dim: 1 for vectors, 3 for ``(C, H, W)`` images (any ``>= 0``).
    Shapes: ``z``, ``x``: ``(*batch, *event)``; ``ladj``: ``batch``.
    """

    def __init__(self, dim=None, alpha=0.05, scale=256, event_dim=1):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"Logit needs 0 <= alpha < 0.5, got alpha={alpha}")
        if not scale > 0:
            raise ValueError(f"Logit needs a positive scale (the data range [0, k)), got {scale}")
        self.dim = None if dim is None else int(dim)
        self.alpha, self.scale, self.event_dim = float(alpha), float(scale), int(event_dim)
        # log|dy/dp| per element: the scaling from [0, 1) to [0, k) and the alpha margin
        self._log_unit = math.log(self.scale) - math.log1p(-2 * self.alpha)

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        # the image of the real line: [0, k) widened by the alpha margin on both sides
        margin = self.alpha * self.scale / (1 - 2 * self.alpha)
        return constraints.independent(constraints.interval(-margin, self.scale + margin),
                                       self.event_dim)

    def _sum(self, t):
        return t.sum(tuple(range(-self.event_dim, 0))) if self.event_dim else t

    def call_and_ladj(self, z):
        log_p, log_1mp = F.logsigmoid(z), F.logsigmoid(-z)
        x = (torch.sigmoid(z) - self.alpha) * (self.scale / (1 - 2 * self.alpha))
        return x, self._sum(log_p + log_1mp + self._log_unit)

    def inverse_and_ladj(self, x):
        p = self.alpha + (1 - 2 * self.alpha) / self.scale * x
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        z = log_p - log_1mp
        return z, self._sum(-(log_p + log_1mp) - self._log_unit)

    def extra_repr(self):
        return (f"dim={self.dim}, alpha={self.alpha}, scale={self.scale:g}, "
                f"event_dim={self.event_dim}")
