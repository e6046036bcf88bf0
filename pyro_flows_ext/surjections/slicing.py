"""Slicing surjections (SurVAE Flows): :class:`Slice` drops dimensions (an inference
surjection, exact) and :class:`Augment` adds them (a generative surjection, a bound)."""

import torch

from ..core import Surjection, broadcast_context
from ._densities import as_density

__all__ = ["Slice", "Augment"]


def _features(layer, y, context):
    """``(y, conditioner input)``: ``y`` broadcast against the context and joined to it."""
    layer._require_context(context)
    if not layer.context_dim:
        return y, y
    context, y = broadcast_context(context, y)
    return y, torch.cat([y, context], -1)


def _check_size(layer, shape, size, side):
    if len(shape) < 1 or shape[-1] != size:
        raise ValueError(f"{type(layer).__name__} expects events of size {size} in the last "
                         f"dimension on its {side} side, got a tensor of shape {tuple(shape)}")


class Slice(Surjection):
    r"""Keeps the first ``keep`` dimensions; inference surjection (``log_prob`` is exact when
    the conditional density is).

    Inference :math:`z = x_{:K}`; generative :math:`x = [z, x_{K:}]` with
    :math:`x_{K:} \sim p(x_{K:} \mid z, c)`; :math:`V = \log p(x_{K:} \mid x_{:K}, c)`.

    Args:
        dim: data size ``D``.
        keep: ``K``, dimensions kept as the latent; the base has event size ``K``.
        density: the conditional density of the dropped part: ``None`` (default) a diagonal
            Gaussian whose mean and log-scale an MLP computes from ``[z, c]`` (starts at
            :math:`N(0, I)`), or a conditional :class:`~pyro_flows_ext.Flow` over ``D - K``
            values built with ``context_dim = K + context_dim`` (e.g.
            ``pfe.flows.nsf(D - K, context_dim=K, gaussian_start=False)``), or any module with
            ``log_prob(y, c)`` and ``sample_and_log_prob(c)``.
        hidden_dims: hidden sizes of the default density's MLP.
        context_dim: size of a context the density also sees (``layer.condition(c)``).
    Shapes: ``z``: ``(*batch, K)``; ``x``: ``(*batch, D)``; ``ladj``: ``batch``.
    References: SurVAE Flows (Nielsen et al., 2020), https://arxiv.org/abs/2007.02731
    """

    stochastic_forward, stochastic_inverse = True, False

    def __init__(self, dim, keep=None, density=None, hidden_dims=(64, 64), context_dim=0):
        super().__init__()
        keep = max(int(dim) // 2, 1) if keep is None else int(keep)
        if not 0 < keep < dim:
            raise ValueError(f"Slice needs 0 < keep < dim, got dim={dim}, keep={keep}")
        self.dim, self.keep, self.context_dim = int(dim), keep, int(context_dim)
        self.density = as_density(density, dim - keep, keep + self.context_dim, hidden_dims)
        self.exact = bool(getattr(self.density, "exact", True))

    def forward_shape(self, shape):
        _check_size(self, shape, self.keep, "base")
        return torch.Size(shape[:-1]) + (self.dim,)

    def inverse_shape(self, shape):
        _check_size(self, shape, self.dim, "data")
        return torch.Size(shape[:-1]) + (self.keep,)

    def base_event_shape(self):
        return torch.Size([self.keep])

    def call_and_ladj(self, z, context=None):
        z, features = _features(self, z, context)
        dropped, log_p = self.density.sample_and_log_prob(features)
        return torch.cat([z, dropped], -1), -log_p

    def inverse_and_ladj(self, x, context=None):
        z, dropped = x[..., : self.keep], x[..., self.keep:]
        z, features = _features(self, z, context)
        if self.context_dim:
            dropped = dropped.expand(z.shape[:-1] + dropped.shape[-1:])
        return z, self.density.log_prob(dropped, features)

    def _ladj_of_unseen_pair(self, z, x):
        if self.context_dim:
            return super()._ladj_of_unseen_pair(z, x)
        return -self.density.log_prob(x[..., self.keep:], z)

    def extra_repr(self):
        return f"dim={self.dim}, keep={self.keep}, context_dim={self.context_dim}"


class Augment(Surjection):
    r"""Augments :math:`x` with noise; generative surjection (``log_prob`` is a stochastic
    lower bound whose exp is unbiased for :math:`p(x)`).

    Inference :math:`z = [x, e],\ e \sim q(e \mid x, c)`; generative :math:`x = z_{:D}`;
    :math:`V = -\log q(e \mid x, c)` (Augmented Normalizing Flows, Huang et al., 2020).

    ``E[log_prob(x)] = log p(x) - KL(q(e|x) || p(e|x))``; the importance-weighted bound
    :func:`pyro_flows_ext.infer.iw_log_prob` over ``K`` draws tightens to :math:`\log p(x)`
    as ``K`` grows. Scoring the same tensor twice reuses its draw of ``e``; ``x.clone()``
    (or ``x.expand((K,) + x.shape)``) draws again.

    Args:
        dim: data size ``D``.
        extra_dim: noise size ``A`` (default ``D``); the base has event size ``D + A``.
        density: :math:`q(e \mid x, c)`: ``None`` (default) a diagonal Gaussian whose mean
            and log-scale an MLP computes from ``[x, c]`` (starts at :math:`N(0, I)`), or a
            conditional :class:`~pyro_flows_ext.Flow` over ``A`` values with
            ``context_dim = D + context_dim``, or any module with ``log_prob(y, c)`` and
            ``sample_and_log_prob(c)``.
        hidden_dims: hidden sizes of the default density's MLP.
        context_dim: size of a context ``q`` also sees.
    Shapes: ``x``: ``(*batch, D)``; ``z``: ``(*batch, D + A)``; ``ladj``: ``batch``.
    References: SurVAE Flows (Nielsen et al., 2020), https://arxiv.org/abs/2007.02731;
    Huang, Dinh, Courville, Augmented Normalizing Flows (2020), https://arxiv.org/abs/2002.07101
    """

    stochastic_forward, stochastic_inverse = False, True

    def __init__(self, dim, extra_dim=None, density=None, hidden_dims=(64, 64), context_dim=0):
        super().__init__()
        extra_dim = int(dim) if extra_dim is None else int(extra_dim)
        if dim < 1 or extra_dim < 1:
            raise ValueError(f"Augment needs dim >= 1 and extra_dim >= 1, got {dim}, {extra_dim}")
        self.dim, self.extra_dim, self.context_dim = int(dim), extra_dim, int(context_dim)
        self.density = as_density(density, extra_dim, self.dim + self.context_dim, hidden_dims)

    def forward_shape(self, shape):
        _check_size(self, shape, self.dim + self.extra_dim, "base")
        return torch.Size(shape[:-1]) + (self.dim,)

    def inverse_shape(self, shape):
        _check_size(self, shape, self.dim, "data")
        return torch.Size(shape[:-1]) + (self.dim + self.extra_dim,)

    def base_event_shape(self):
        return torch.Size([self.dim + self.extra_dim])

    def call_and_ladj(self, z, context=None):
        x, e = z[..., : self.dim], z[..., self.dim:]
        x_b, features = _features(self, x, context)
        if self.context_dim:
            e = e.expand(x_b.shape[:-1] + e.shape[-1:])
        return x, self.density.log_prob(e, features)

    def inverse_and_ladj(self, x, context=None):
        x, features = _features(self, x, context)
        e, log_q = self.density.sample_and_log_prob(features)
        return torch.cat([x, e], -1), -log_q

    def _ladj_of_unseen_pair(self, z, x):
        if self.context_dim:
            return super()._ladj_of_unseen_pair(z, x)
        return self.density.log_prob(z[..., self.dim:], x)

    def extra_repr(self):
        return (f"dim={self.dim}, extra_dim={self.extra_dim}, "
                f"context_dim={self.context_dim}")
