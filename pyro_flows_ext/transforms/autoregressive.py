"""Masked autoregressive flows (MAF) and inverse autoregressive flows (IAF), affine or spline."""

import torch

from ..core import FlowLayer, check_event_size
from ..nn import MADE
from ._rqs import num_params, spline_forward, spline_inverse, spline_table
from .coupling import soft_clamp


class MaskedAutoregressive(FlowLayer):
    r"""Autoregressive layer with a MADE conditioner, element maps affine or spline.

    ``inverse=False`` (MAF, Papamakarios et al. 2017): :math:`x_i = \tau(z_i;\ \theta_i(x_{<i}))`.
    Scoring (``log_prob``, the data-to-base direction ``inverse_and_ladj``) is **one** MADE
    pass; sampling (``call_and_ladj``) costs **D** passes. Use it for density estimation.

    ``inverse=True`` (IAF, Kingma et al. 2016): :math:`x_i = \tau(z_i;\ \theta_i(z_{<i}))`.
    Sampling (``call_and_ladj``, with its log-det) is **one** pass; scoring an arbitrary
    ``x`` costs **D** passes (a sample just drawn is scored from the cache, free). Use it
    for variational guides.

    :math:`\log|\det J| = \sum_i \log|\tau'(z_i)|` (triangular Jacobian in ``order``).
    ``kind='affine'``: :math:`\tau(z) = z e^{s} + t` with ``s`` soft-clamped to
    ``[-clamp, clamp]``; ``kind='spline'``: a rational-quadratic spline on
    ``[-bound, bound]`` with identity tails. The output layer starts at zero: the layer
    starts as the identity.

    Args:
        dim: event size ``D``.
        kind: ``'affine'`` or ``'spline'``.
        inverse: False for MAF, True for IAF.
        hidden_dims: MADE hidden sizes.
        context_dim: context size (0: unconditional); every output may see the context.
        count_bins, bound: spline settings (``kind='spline'``).
        order: autoregressive order, a permutation of ``range(D)`` (default ``0..D-1``).
        clamp: bound on the affine log-scale.
    Shapes: ``z``, ``x``: ``(*batch, D)``; context ``(*batch, C)``; ``ladj``: ``batch``.

    References: Papamakarios, Pavlakou, Murray. Masked Autoregressive Flow. NeurIPS 2017;
    Kingma et al. Improved Variational Inference with Inverse Autoregressive Flow. NeurIPS
    2016; Durkan et al. Neural Spline Flows. NeurIPS 2019.
    """

    def __init__(self, dim, kind="affine", inverse=False, hidden_dims=(64, 64), context_dim=0,
                 count_bins=8, bound=3.0, order=None, clamp=5.0):
        super().__init__()
        if kind not in ("affine", "spline"):
            raise ValueError(f"kind must be 'affine' or 'spline', got {kind!r}")
        self.dim, self.kind, self.inverse = dim, kind, bool(inverse)
        self.fast_inverse = not self.inverse  # IAF inverts by D passes
        self.context_dim, self.count_bins = context_dim, count_bins
        self.bound, self.clamp = float(bound), clamp
        params = 2 if kind == "affine" else num_params(count_bins)
        self.made = MADE(dim, params, tuple(hidden_dims), context_dim=context_dim, order=order)

    def _params(self, y, context):
        return self.made(y, context)  # MADE broadcasts the context to y's batch shape

    def _tau(self, u, theta, forward):
        """Element map ``u -> tau(u)`` (or its inverse) and the log-derivative of the map
        applied, both ``(*batch, D)``."""
        if self.kind == "affine":
            shift, log_scale = theta[..., 0], soft_clamp(theta[..., 1], self.clamp)
            if forward:
                return u * log_scale.exp() + shift, log_scale
            return (u - shift) * torch.exp(-log_scale), -log_scale
        spline = spline_forward if forward else spline_inverse
        return spline(u, spline_table(theta, self.bound), self.bound)

    def _one_pass(self, y, context, forward):
        theta = self._params(y, context)
        out, lad = self._tau(y, theta, forward)
        return out, lad.sum(-1)

    def _d_passes(self, y, context, forward):
        # y is the input of tau (or tau^-1); the conditioner reads the output side, filled in
        # one more variable (in `order`) per pass.
        out = torch.zeros_like(y)
        for _ in range(self.dim):
            out, lad = self._tau(y, self._params(out, context), forward)
        return out, lad.sum(-1)

    def call_and_ladj(self, z, context=None):
        check_event_size(z, self.dim, "MaskedAutoregressive")
        self._require_context(context)
        if self.inverse:  # IAF: theta from z, one pass
            return self._one_pass(z, context, forward=True)
        return self._d_passes(z, context, forward=True)

    def inverse_and_ladj(self, x, context=None):
        check_event_size(x, self.dim, "MaskedAutoregressive")
        self._require_context(context)
        if self.inverse:
            return self._d_passes(x, context, forward=False)
        return self._one_pass(x, context, forward=False)  # MAF: theta from x, one pass
