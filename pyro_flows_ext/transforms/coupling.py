"""Coupling layers (RealNVP, Dinh et al. 2017; NSF-C, Durkan et al. 2019) with any element map."""

import torch

from ..core import FlowLayer, broadcast_context
from ..nn import MLP
from .element_maps import Affine, RationalQuadratic, soft_clamp

__all__ = ["Coupling", "AffineCoupling", "SplineCoupling", "soft_clamp"]


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
    r"""Coupling layer: the masked part passes through and parameterises an element map of
    the rest, :math:`x_a = z_a,\ x_b = \tau(z_b;\ \theta(z_a, c))`,
    :math:`\log|\det J| = \sum_i \log|\tau'(z_{b,i})|`. One conditioner pass in either
    direction; the conditioner's last layer starts at zero, so the layer starts as the
    identity (with any element map whose zero parameters are the identity).

    Args:
        dim: event size ``D >= 2``.
        element_map: an :class:`~pyro_flows_ext.transforms.ElementMap` (default
            ``Affine()``).
        hidden_dims: hidden sizes of the conditioner MLP.
        mask: boolean ``(D,)``, True where ``z`` passes through; default the first ``D // 2``.
        context_dim: size of a context vector fed to the conditioner (0: unconditional);
            use ``layer.condition(c)``.
        invert: ``False``: the map's forward runs base to data (sampling uses ``forward``,
            scoring ``inverse``); ``True``: the map's forward runs data to base (use it when
            the forward is the cheaper direction and scoring is the hot path).
        readout_scale: multiplies the conditioner's last layer (``1 / H`` for guides, see
            :class:`~pyro_flows_ext.nn.MLP`).
        zero_init: start the conditioner's last layer at zero (the layer starts as the
            identity; ``False``: ``nn.Linear``'s random init).
    Shapes: ``z``, ``x``: ``(*batch, D)``; context ``(*batch', C)`` broadcast against the
    batch; ``ladj``: the broadcast batch shape.
    """

    def __init__(self, dim, element_map=None, hidden_dims=(64, 64), mask=None, context_dim=0,
                 invert=False, readout_scale=1.0, zero_init=True):
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
        self.dim, self.context_dim, self.invert = dim, context_dim, bool(invert)
        self.element_map = Affine() if element_map is None else element_map
        self.stl_stable = self.element_map.stl_stable
        self.num_passive = int(mask.sum())
        self.register_buffer("mask", mask)
        self.register_buffer("idx_a", mask.nonzero().flatten())
        self.register_buffer("idx_b", (~mask).nonzero().flatten())
        self.register_buffer("unorder", torch.argsort(torch.cat([self.idx_a, self.idx_b])))
        self._blocks = _block_split(mask)
        n_out = (dim - self.num_passive) * self.element_map.num_params
        if self.element_map.num_params > 2:
            # CPU matmuls with an odd output width (e.g. 23) run ~1.7x slower: round up to a
            # multiple of 8; the spare outputs start (and stay) at zero
            n_out = -(-n_out // 8) * 8
        self.net = MLP(self.num_passive + context_dim, n_out, tuple(hidden_dims),
                       zero_init=zero_init, readout_scale=readout_scale)

    def _split(self, y, context):
        """``(y_a, y_b, conditioner input)`` for an event tensor ``y``."""
        self._require_context(context)
        if self.context_dim:
            context, y = broadcast_context(context, y)
        if self._blocks is None:
            y_a, y_b = y[..., self.idx_a], y[..., self.idx_b]
        else:
            a_first, n = self._blocks
            first, second = y.split([n, self.dim - n], dim=-1)
            y_a, y_b = (first, second) if a_first else (second, first)
        if not self.context_dim:
            return y_a, y_b, y_a
        return y_a, y_b, torch.cat([y_a, context], dim=-1)

    def _join(self, y_a, out_b):
        if self._blocks is None:
            return torch.cat([y_a, out_b], dim=-1)[..., self.unorder]
        return torch.cat([y_a, out_b] if self._blocks[0] else [out_b, y_a], dim=-1)

    def _transform(self, y, context, generative):
        y_a, y_b, features = self._split(y, context)
        emap = self.element_map
        theta = emap.unflatten(self.net(features), self.dim - self.num_passive)
        out_b, lad = (emap.forward if generative != self.invert else emap.inverse)(y_b, theta)
        return self._join(y_a, out_b), lad.sum(-1)

    def call_and_ladj(self, z, context=None):
        return self._transform(z, context, True)

    def inverse_and_ladj(self, x, context=None):
        return self._transform(x, context, False)


class AffineCoupling(Coupling):
    r"""Affine coupling (RealNVP): :math:`x_b = z_b\, e^{s(z_a)} + t(z_a)`,
    :math:`\log|\det J| = \sum_i s_i(z_a)`, ``s`` squashed into ``(-clamp, clamp)`` (``squash``:
    ``"tanh"`` or ``"rational"``, see :class:`~pyro_flows_ext.transforms.Affine`).
    ``Coupling(dim, Affine(clamp, squash), ...)``; other arguments as in :class:`Coupling`. With
    ``invert=True`` the affine map runs data to base, :math:`z_b = x_b e^{s(x_a)} + t(x_a)`
    (zuko's form: the shift is in base units).

    Example:
        >>> layer = AffineCoupling(4)
        >>> x, ladj = layer.call_and_ladj(torch.randn(10, 4))
        >>> tuple(x.shape), tuple(ladj.shape)
        ((10, 4), (10,))
    """

    def __init__(self, dim, hidden_dims=(64, 64), mask=None, clamp=5.0, context_dim=0,
                 readout_scale=1.0, invert=False, zero_init=True, squash="tanh"):
        super().__init__(dim, Affine(clamp, squash), hidden_dims, mask, context_dim, invert,
                         readout_scale, zero_init)

    @property
    def clamp(self):
        return self.element_map.clamp


class SplineCoupling(Coupling):
    r"""Rational-quadratic spline coupling (NSF-C): ``Coupling(dim, RationalQuadratic(count_bins,
    bound), ..., invert=not inverse)``.

    ``inverse=False`` (default, for density estimation): the spline runs data to base,
    :math:`z_b = \mathrm{RQS}(x_b;\ \theta(x_a, c))`, so ``log_prob`` uses the closed-form
    spline and sampling solves its quadratic (as zuko's and nflows' NSF). ``inverse=True``:
    :math:`x_b = \mathrm{RQS}(z_b;\ \theta(z_a, c))`, cheaper sampling (as Pyro's
    ``spline_coupling``). Other arguments as in :class:`Coupling`.

    References: Durkan et al., Neural Spline Flows, NeurIPS 2019.
    """

    def __init__(self, dim, hidden_dims=(64, 64), count_bins=8, bound=3.0, mask=None,
                 context_dim=0, inverse=False, readout_scale=1.0):
        super().__init__(dim, RationalQuadratic(count_bins, bound), hidden_dims, mask,
                         context_dim, invert=not inverse, readout_scale=readout_scale)
        self.count_bins, self.bound, self.inverse = count_bins, float(bound), bool(inverse)
