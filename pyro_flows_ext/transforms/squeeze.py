"""Squeeze (space-to-depth) for image flows (RealNVP, Dinh et al. 2017; Glow)."""

import torch
import torch.nn.functional as F
from torch.distributions import constraints

from ..core import FlowLayer, batch_shape_of

__all__ = ["Squeeze"]


class Squeeze(FlowLayer):
    r"""Space-to-depth on the way to the base: every ``f x f`` block of pixels becomes ``f^2``
    channels. A permutation of the entries, so :math:`\log|\det J| = 0`.

    Named, like :class:`~pyro_flows_ext.surjections.MaxPool2d`, for what it does from data to
    base: ``layer.inv(x)`` maps ``x`` of shape ``(..., C, H, W)`` to ``z`` of shape
    ``(..., f^2 C, H/f, W/f)`` (``torch.nn.functional.pixel_unshuffle``: channel
    ``c f^2 + f i + j`` of ``z`` holds offset ``(i, j)`` of channel ``c``, so the first half
    of the channels of ``z`` are the first half of the channels of ``x``, squeezed), and the
    generative ``layer(z)`` is depth-to-space (``pixel_shuffle``).

    Args:
        dim: channels ``C`` on the data side.
        factor: block size ``f``.
    Shapes: ``z``: ``(..., f^2 C, H/f, W/f)``; ``x``: ``(..., C, H, W)`` with ``H`` and ``W``
    divisible by ``f``; ``ladj``: the batch shape (zeros).

    Example:
        >>> x = torch.arange(16.).view(1, 4, 4)
        >>> z = Squeeze(1).inv(x)
        >>> tuple(z.shape), z[:, 0, 0].tolist()
        ((4, 2, 2), [0.0, 1.0, 4.0, 5.0])
    """

    event_dim = 3
    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)

    def __init__(self, dim, factor=2):
        super().__init__()
        if int(dim) < 1 or int(factor) < 1:
            raise ValueError(f"Squeeze needs dim >= 1 and factor >= 1, got {dim}, {factor}")
        self.dim, self.factor = int(dim), int(factor)

    def _check(self, shape, channels, side, divisible):
        ok = len(shape) >= 3 and shape[-3] == channels
        if ok and divisible and (shape[-1] % self.factor or shape[-2] % self.factor):
            raise ValueError(f"Squeeze(factor={self.factor}) expects events whose height and "
                             f"width are divisible by {self.factor} on its data side, got a "
                             f"tensor of shape {tuple(shape)}")
        if not ok:
            raise ValueError(f"Squeeze expects events with {channels} channels in dimension -3 "
                             f"((..., {channels}, H, W)) on its {side} side, got a tensor of "
                             f"shape {tuple(shape)}")

    def forward_shape(self, shape):
        f = self.factor
        self._check(shape, self.dim * f * f, "base", False)
        return torch.Size(shape[:-3]) + (self.dim, shape[-2] * f, shape[-1] * f)

    def inverse_shape(self, shape):
        f = self.factor
        self._check(shape, self.dim, "data", True)
        return torch.Size(shape[:-3]) + (self.dim * f * f, shape[-2] // f, shape[-1] // f)

    def call_and_ladj(self, z):
        return F.pixel_shuffle(z, self.factor), z.new_zeros(batch_shape_of(z, 3))

    def inverse_and_ladj(self, x):
        return F.pixel_unshuffle(x, self.factor), x.new_zeros(batch_shape_of(x, 3))

    def extra_repr(self):
        return f"dim={self.dim}, factor={self.factor}"
