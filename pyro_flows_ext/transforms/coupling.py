"""Affine coupling (RealNVP, Dinh et al. 2017)."""

import torch

from ..core import FlowLayer, check_event_size
from ..nn import MLP


def soft_clamp(raw, bound):
    r""":math:`b \tanh(r / b)`: the identity near 0, smooth, and bounded by ``b`` in absolute
    value, so ``exp(scale)`` never overflows however large the network output gets."""
    return bound * torch.tanh(raw / bound)


class AffineCoupling(FlowLayer):
    r"""Affine coupling: the masked part passes through and conditions the rest.

    :math:`x = m \odot z + (1-m) \odot (z\, e^{s(m z)} + t(m z))`,
    :math:`\log|\det J| = \sum_i (1-m_i)\, s_i(m z)`, with :math:`s` soft-clamped to
    ``[-clamp, clamp]``. The conditioner's last layer starts at zero: the layer starts as
    the identity. One network pass in either direction.

    Args:
        dim: event size ``D``.
        hidden_dims: hidden sizes of the conditioner MLP.
        mask: boolean ``(D,)``, True where ``z`` passes through; default the first ``D // 2``.
        clamp: bound on the log-scale.
    Shapes: ``z``, ``x``: ``(*batch, D)``; ``ladj``: ``batch``.
    """

    def __init__(self, dim, hidden_dims=(64, 64), mask=None, clamp=5.0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"AffineCoupling needs dim >= 2 to split the event, got {dim}")
        if mask is None:
            mask = torch.arange(dim) < dim // 2
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (dim,) or mask.all() or not mask.any():
            raise ValueError(f"mask must be a boolean tensor of shape ({dim},) with both "
                             f"True and False entries, got {mask.tolist()}")
        self.dim, self.clamp = dim, clamp
        self.register_buffer("mask", mask.float())
        self.register_buffer("free", (~mask).float())
        self.net = MLP(dim, 2 * dim, hidden_dims)

    def _shift_and_log_scale(self, y):
        shift, raw = self.net(y * self.mask).chunk(2, dim=-1)
        return shift * self.free, soft_clamp(raw, self.clamp) * self.free

    def call_and_ladj(self, z):
        check_event_size(z, self.dim, "AffineCoupling")
        shift, log_scale = self._shift_and_log_scale(z)
        return z * log_scale.exp() + shift, log_scale.sum(-1)

    def inverse_and_ladj(self, x):
        check_event_size(x, self.dim, "AffineCoupling")
        shift, log_scale = self._shift_and_log_scale(x)
        return (x - shift) * torch.exp(-log_scale), -log_scale.sum(-1)
