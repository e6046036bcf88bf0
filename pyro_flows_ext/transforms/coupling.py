"""Affine coupling (RealNVP, Dinh et al. 2017)."""

import torch

from ..core import FlowLayer, broadcast_context, check_event_size
from ..nn import MLP


def soft_clamp(raw, bound):
    r""":math:`b \tanh(r / b)`: the identity near 0, smooth, and bounded by ``b`` in absolute
    value, so ``exp(scale)`` never overflows however large the network output gets."""
    return bound * torch.tanh(raw / bound)


def coupling_mask(dim, mask, name):
    """A checked boolean ``(dim,)`` mask, True where the event passes through; default the
    first ``dim // 2`` coordinates."""
    if dim < 2:
        raise ValueError(f"{name} needs dim >= 2 to split the event, got {dim}")
    if mask is None:
        mask = torch.arange(dim) < dim // 2
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if mask.shape != (dim,) or mask.all() or not mask.any():
        raise ValueError(f"mask must be a boolean tensor of shape ({dim},) with both "
                         f"True and False entries, got {mask.tolist()}")
    return mask


class AffineCoupling(FlowLayer):
    r"""Affine coupling: the masked part passes through and conditions the rest.

    :math:`x_a = z_a,\ x_b = z_b\, e^{s(z_a)} + t(z_a)`,
    :math:`\log|\det J| = \sum_i s_i(z_a)`, with :math:`s` soft-clamped to
    ``[-clamp, clamp]``. The conditioner's last layer starts at zero: the layer starts as
    the identity. One network pass in either direction.

    Args:
        dim: event size ``D``.
        hidden_dims: hidden sizes of the conditioner MLP.
        mask: boolean ``(D,)``, True where ``z`` passes through; default the first ``D // 2``.
        clamp: bound on the log-scale.
        context_dim: size of a context vector fed to the conditioner (0: unconditional);
            use ``layer.condition(c)``.
    Shapes: ``z``, ``x``: ``(*batch, D)``; ``ladj``: ``batch``.
    """

    def __init__(self, dim, hidden_dims=(64, 64), mask=None, clamp=5.0, context_dim=0):
        super().__init__()
        mask = coupling_mask(dim, mask, "AffineCoupling")
        self.dim, self.clamp, self.context_dim = dim, float(clamp), context_dim
        self.register_buffer("mask", mask)
        # Permutation putting the passed-through coordinates first; skipped when it is the
        # identity (the default mask), so the common case is two slices and a cat.
        order = torch.cat([mask.nonzero().flatten(), (~mask).nonzero().flatten()])
        self._split = int(mask.sum())
        self._permuted = not torch.equal(order, torch.arange(dim))
        self.register_buffer("order", order)
        self.register_buffer("unorder", torch.argsort(order))
        self.net = MLP(self._split + context_dim, 2 * (dim - self._split), hidden_dims)

    def _transform(self, y, sign, context):
        check_event_size(y, self.dim, "AffineCoupling")
        self._require_context(context)
        if self._permuted:
            y = y[..., self.order]
        y_a, y_b = y[..., : self._split], y[..., self._split :]
        features = y_a
        if self.context_dim:
            features = torch.cat([y_a, broadcast_context(context, y_a)], -1)
        shift, raw = self.net(features).chunk(2, dim=-1)
        log_scale = soft_clamp(raw, self.clamp)
        if sign > 0:
            out_b = y_b * log_scale.exp() + shift
        else:
            out_b = (y_b - shift) * torch.exp(-log_scale)
        out = torch.cat([y_a, out_b], dim=-1)
        if self._permuted:
            out = out[..., self.unorder]
        return out, sign * log_scale.sum(-1)

    def call_and_ladj(self, z, context=None):
        return self._transform(z, 1, context)

    def inverse_and_ladj(self, x, context=None):
        return self._transform(x, -1, context)
