"""Channel slicing of images (the multi-scale factor-out of RealNVP/Glow as a SurVAE
inference surjection)."""

import math

import torch
from torch.distributions import constraints

from ..core import Surjection, batch_shape_of, broadcast_context
from ..nn.resnet import ConvResNet
from ..transforms.element_maps import soft_clamp

__all__ = ["ChannelSlice"]

_LOG_2PI = math.log(2 * math.pi)


class ChannelSlice(Surjection):
    r"""Keeps the first ``keep`` channels of a ``(C, H, W)`` image; inference surjection
    (``log_prob`` is exact).

    Inference :math:`z = x_{:K}`; generative :math:`x = [z, x_{K:}]` with
    :math:`x_{K:} \sim N(\mu(z, c), \mathrm{diag}\,\sigma(z, c)^2)`, where a
    :class:`~pyro_flows_ext.nn.ConvResNet` computes :math:`(\mu, \log\sigma)` per pixel from the
    kept channels (Glow's learned prior of the factored-out half);
    :math:`V = \log N(x_{K:};\ \mu, \sigma^2)`. Zero-initialised: the dropped part starts at
    :math:`N(0, I)`, independent of ``z``.

    (:class:`~pyro_flows_ext.surjections.Slice` slices the last dimension of vectors with an
    MLP density; an image's channels need the convolutional one.)

    Args:
        dim: channels ``C`` on the data side.
        keep: ``K`` channels kept (default ``C // 2``).
        hidden_channels: width of the ResNet.
        num_blocks: residual blocks of the ResNet.
        clamp: soft bound on the log-scales.
        context_dim: size of a context vector the density also sees (as constant channels).
    Shapes: ``z``: ``(*batch, K, H, W)``; ``x``: ``(*batch, C, H, W)``; ``ladj``: ``batch``.
    References: SurVAE Flows (Nielsen et al., 2020), https://arxiv.org/abs/2007.02731;
    Kingma & Dhariwal, Glow (2018), https://arxiv.org/abs/1807.03039
    """

    stochastic_forward, stochastic_inverse = True, False
    event_dim = 3
    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)

    def __init__(self, dim, keep=None, hidden_channels=64, num_blocks=1, clamp=5.0,
                 context_dim=0):
        super().__init__()
        keep = int(dim) // 2 if keep is None else int(keep)
        if not 0 < keep < dim:
            raise ValueError(f"ChannelSlice needs 0 < keep < dim, got dim={dim}, keep={keep}")
        self.dim, self.keep, self.context_dim = int(dim), keep, int(context_dim)
        self.clamp = float(clamp)
        self.net = ConvResNet(keep + self.context_dim, 2 * (self.dim - keep), hidden_channels,
                              num_blocks)

    def _check(self, shape, channels, side):
        if len(shape) < 3 or shape[-3] != channels:
            raise ValueError(f"ChannelSlice expects events with {channels} channels in dimension "
                             f"-3 ((..., {channels}, H, W)) on its {side} side, got a tensor of "
                             f"shape {tuple(shape)}")

    def forward_shape(self, shape):
        self._check(shape, self.keep, "base")
        return torch.Size(shape[:-3]) + (self.dim,) + tuple(shape[-2:])

    def inverse_shape(self, shape):
        self._check(shape, self.dim, "data")
        return torch.Size(shape[:-3]) + (self.keep,) + tuple(shape[-2:])

    def params(self, z, context=None):
        """``(z, loc, log_scale)`` of the dropped channels given the kept ones ``z``
        (``z`` broadcast against the context)."""
        self._require_context(context)
        inp = z
        if self.context_dim:
            context, z = broadcast_context(context, z, 3)
            inp = torch.cat([z, context[..., None, None].expand(*context.shape, *z.shape[-2:])],
                            -3)
        loc, raw = self.net(inp).chunk(2, dim=-3)
        return z, loc, soft_clamp(raw, self.clamp)

    @staticmethod
    def _log_normal(eps, log_scale):
        return (-0.5 * eps.square() - log_scale - 0.5 * _LOG_2PI).sum((-3, -2, -1))

    def call_and_ladj(self, z, context=None):
        z, loc, log_scale = self.params(z, context)
        eps = torch.randn_like(loc)
        dropped = loc + eps * log_scale.exp()
        return torch.cat([z, dropped], -3), -self._log_normal(eps, log_scale)

    def inverse_and_ladj(self, x, context=None):
        z, dropped = x[..., : self.keep, :, :], x[..., self.keep:, :, :]
        z, loc, log_scale = self.params(z, context)
        if self.context_dim:
            dropped = dropped.expand(batch_shape_of(z, 3) + dropped.shape[-3:])
        return z, self._log_normal((dropped - loc) * torch.exp(-log_scale), log_scale)

    def extra_repr(self):
        return f"dim={self.dim}, keep={self.keep}, context_dim={self.context_dim}"
