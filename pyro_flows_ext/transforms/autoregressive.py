"""Masked autoregressive (MAF) and inverse autoregressive (IAF) layers with any element map."""

import torch

from ..core import FlowLayer
from ..nn import MADE
from .element_maps import Affine, ElementMap, RationalQuadratic

__all__ = ["MaskedAutoregressive"]


class MaskedAutoregressive(FlowLayer):
    r"""Autoregressive layer with a MADE conditioner and any element map :math:`\tau`.

    ``inverse=False`` (MAF, Papamakarios et al. 2017): :math:`x_i = \tau(z_i;\ \theta_i(x_{<i}))`;
    scoring is **one** MADE pass, sampling **D** passes: for density estimation.
    ``inverse=True`` (IAF, Kingma et al. 2016): :math:`x_i = \tau(z_i;\ \theta_i(z_{<i}))`;
    sampling (with its log-det) is one pass, scoring an arbitrary ``x`` costs D passes (a
    sample just drawn is scored from the cache): for variational guides.

    :math:`\log|\det J| = \sum_i \log|\tau'(z_i)|` (triangular Jacobian in ``order``). The
    output layer starts at zero: the layer starts as the identity.

    Args:
        dim: event size ``D``.
        element_map: an :class:`~pyro_flows_ext.transforms.ElementMap`, or ``'affine'``
            (``Affine(clamp)``) / ``'spline'`` (``RationalQuadratic(count_bins, bound)``).
        inverse: False for MAF, True for IAF.
        hidden_dims: MADE hidden sizes.
        context_dim: context size (0: unconditional); every output may see the context.
        count_bins, bound: spline settings for ``'spline'``.
        order: autoregressive order, a permutation of ``range(D)`` (default ``0..D-1``).
        clamp: bound on the affine log-scale for ``'affine'``.
        readout_scale: multiplies MADE's output layer (``1 / H`` for guides).
        kind: alias of a string ``element_map`` (the earlier name).
    Shapes: ``z``, ``x``: ``(*batch, D)``; context ``(*batch', C)`` broadcast against the
    batch; ``ladj``: the broadcast batch shape.

    References: Papamakarios, Pavlakou, Murray. Masked Autoregressive Flow. NeurIPS 2017;
    Kingma et al. Improved Variational Inference with Inverse Autoregressive Flow. NeurIPS
    2016; Durkan et al. Neural Spline Flows. NeurIPS 2019.
    """

    def __init__(self, dim, element_map="affine", inverse=False, hidden_dims=(64, 64),
                 context_dim=0, count_bins=8, bound=3.0, order=None, clamp=5.0,
                 readout_scale=1.0, kind=None):
        super().__init__()
        element_map = kind if kind is not None else element_map
        if element_map == "affine":
            element_map = Affine(clamp)
        elif element_map == "spline":
            element_map = RationalQuadratic(count_bins, bound)
        elif not isinstance(element_map, ElementMap):
            raise ValueError("element_map must be an ElementMap, 'affine' or 'spline', got "
                             f"{element_map!r}")
        self.dim, self.inverse, self.context_dim = dim, bool(inverse), context_dim
        self.element_map, self.bound = element_map, element_map.bound
        self.fast_inverse = not self.inverse  # IAF inverts by D passes
        self.stl_stable = element_map.stl_stable
        self.made = MADE(dim, element_map.num_params, tuple(hidden_dims),
                         context_dim=context_dim, order=order, readout_scale=readout_scale)

    @property
    def kind(self):
        """``'affine'`` or ``'spline'`` for the built-in maps (the earlier ``kind=``)."""
        return {Affine: "affine", RationalQuadratic: "spline"}.get(type(self.element_map))

    def _tau(self, u, theta, forward):
        """Element map ``u -> tau(u)`` (or its inverse) and its log-derivative, ``(*batch, D)``;
        ``u`` is expanded to ``theta``'s batch (a batch of contexts for one event)."""
        if u.shape != theta.shape[:-1]:
            u = u.expand(theta.shape[:-1])
        return (self.element_map.forward if forward else self.element_map.inverse)(u, theta)

    def _one_pass(self, y, context, forward):
        out, lad = self._tau(y, self.made(y, context), forward)
        return out, lad.sum(-1)

    def _d_passes(self, y, context, forward):
        # y is the input of tau (or tau^-1); the conditioner reads the output side, filled in
        # one more variable (in `order`) per pass.
        out = torch.zeros_like(y)
        for _ in range(self.dim):
            out, lad = self._tau(y, self.made(out, context), forward)
        return out, lad.sum(-1)

    def call_and_ladj(self, z, context=None):
        self._require_context(context)
        if self.inverse:  # IAF: theta from z, one pass
            return self._one_pass(z, context, forward=True)
        return self._d_passes(z, context, forward=True)

    def inverse_and_ladj(self, x, context=None):
        self._require_context(context)
        if self.inverse:
            return self._d_passes(x, context, forward=False)
        return self._one_pass(x, context, forward=False)  # MAF: theta from x, one pass
