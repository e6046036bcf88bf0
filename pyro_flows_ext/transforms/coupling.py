"""Affine coupling (RealNVP, Dinh et al. 2017)."""

import torch

from ..core import FlowLayer, broadcast_context, check_event_size
from ..nn import MLP


def soft_clamp(raw, bound):
    r""":math:`b \tanh(r / b)`: the identity near 0, smooth, and bounded by ``b`` in absolute
    value, so ``exp(scale)`` never overflows however large the network output gets."""
    return bound * torch.tanh(raw / bound)


def _block_split(mask):
    """``(a_first, n_first)`` when the passive part ``a`` and the transformed part ``b`` are
    each one contiguous block (so a layer can ``split``/``cat`` instead of indexing), else
    ``None``."""
    m = mask.tolist()
    n = m.index(not m[0])
    if all(v == m[0] for v in m[:n]) and all(v != m[0] for v in m[n:]):
        return m[0], n
    return None


class Coupling(FlowLayer):
    """Base of coupling layers: a checked mask, the split of an event into the passive part
    ``a`` (True in ``mask``) and the transformed part ``b``, the conditioner's input
    ``[a, context]``, and the join back. Contiguous masks (the default and its complement)
    use ``split``/``cat``; other masks index.

    Args:
        dim: event size ``D >= 2``.
        mask: boolean ``(D,)``, True where the event passes through; default the first
            ``D // 2``.
        context_dim: context size appended to the conditioner input (0: unconditional).
    """

    def __init__(self, dim, mask=None, context_dim=0):
        super().__init__()
        name = type(self).__name__
        if dim < 2:
            raise ValueError(f"{name} needs dim >= 2 to split the event, got {dim}")
        if mask is None:
            mask = torch.arange(dim) < dim // 2
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (dim,) or mask.all() or not mask.any():
            raise ValueError(f"mask must be a boolean tensor of shape ({dim},) with both "
                             f"True and False entries, got {mask.tolist()}")
        self.dim, self.context_dim = dim, context_dim
        self.num_passive = int(mask.sum())
        self.register_buffer("mask", mask)
        self.register_buffer("idx_a", mask.nonzero().flatten())
        self.register_buffer("idx_b", (~mask).nonzero().flatten())
        self.register_buffer("unorder", torch.argsort(torch.cat([self.idx_a, self.idx_b])))
        self._blocks = _block_split(mask)

    def _split(self, y, context):
        """``(y_a, y_b, conditioner input)`` for an event tensor ``y``."""
        check_event_size(y, self.dim, type(self).__name__)
        self._require_context(context)
        if self._blocks is None:
            y_a, y_b = y[..., self.idx_a], y[..., self.idx_b]
        else:
            a_first, n = self._blocks
            first, second = y.split([n, self.dim - n], dim=-1)
            y_a, y_b = (first, second) if a_first else (second, first)
        if not self.context_dim:
            return y_a, y_b, y_a
        return y_a, y_b, torch.cat([y_a, broadcast_context(context, y_a)], dim=-1)

    def _join(self, y_a, out_b):
        if self._blocks is None:
            return torch.cat([y_a, out_b], dim=-1)[..., self.unorder]
        return torch.cat([y_a, out_b] if self._blocks[0] else [out_b, y_a], dim=-1)


class AffineCoupling(Coupling):
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
        super().__init__(dim, mask, context_dim)
        self.clamp = float(clamp)
        self.net = MLP(self.num_passive + context_dim, 2 * (dim - self.num_passive), hidden_dims)

    def _transform(self, y, sign, context):
        y_a, y_b, features = self._split(y, context)
        shift, raw = self.net(features).chunk(2, dim=-1)
        log_scale = soft_clamp(raw, self.clamp)
        if sign > 0:
            out_b = y_b * log_scale.exp() + shift
        else:
            out_b = (y_b - shift) * torch.exp(-log_scale)
        return self._join(y_a, out_b), sign * log_scale.sum(-1)

    def call_and_ladj(self, z, context=None):
        return self._transform(z, 1, context)

    def inverse_and_ladj(self, x, context=None):
        return self._transform(x, -1, context)
