"""Affine coupling for ``(C, H, W)`` images with a convolutional ResNet conditioner
(RealNVP, Dinh et al. 2017; Glow, Kingma & Dhariwal 2018)."""

import torch
from torch.distributions import constraints

from ..core import FlowLayer, broadcast_context
from ..nn.resnet import ConvResNet
from .element_maps import Affine

__all__ = ["ImageCoupling"]


def checkerboard(height, width, parity=0, dtype=None, device=None):
    """``(1, H, W)`` mask, 1 where ``(i + j) % 2 == parity``."""
    i = torch.arange(height, device=device)[:, None]
    j = torch.arange(width, device=device)
    return ((i + j) % 2 == parity).to(dtype or torch.get_default_dtype())[None]


class ImageCoupling(FlowLayer):
    r"""Affine coupling of images: the passive part :math:`x_a` passes through, the rest
    is mapped element-wise by :class:`~pyro_flows_ext.transforms.Affine` with parameters
    :math:`(t, s) = \mathrm{ResNet}(x_a, c)`. With ``invert=True`` (default, zuko's and
    Glow's form) the map runs data to base, :math:`z_b = x_b e^{s} + t`,
    :math:`\log|\det \partial z/\partial x| = \sum s`; ``invert=False``:
    :math:`x_b = z_b e^{s} + t`. One network pass in either direction; the network's last
    layer starts at zero, so the layer starts as the identity.

    Masks: ``"checkerboard"``: passive pixels are those with ``(i + j) % 2 == parity`` in
    every channel; the network sees the masked image and the mask (as one more channel).
    ``"channel"``: the first ``C // 2`` channels are passive (``parity=1``: the last
    ``C // 2``); needs ``C >= 2``.

    Args:
        dim: channels ``C``.
        mask: ``"checkerboard"`` or ``"channel"``.
        parity: which half is passive (0 or 1); alternate it between layers.
        hidden_channels: width of the ResNet.
        num_blocks: residual blocks of the ResNet.
        clamp: soft bound on the log-scales.
        context_dim: size of a context vector (broadcast as constant channels);
            ``layer.condition(c)``.
        invert: affine map data to base (see above).
    Shapes: ``z``, ``x``: ``(*batch, C, H, W)``; context ``(*batch', K)`` broadcast against the
    batch; ``ladj``: the batch shape. ``H, W >= 2`` for the checkerboard.
    """

    event_dim = 3
    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)

    def __init__(self, dim, mask="checkerboard", parity=0, hidden_channels=64, num_blocks=1,
                 clamp=5.0, context_dim=0, invert=True):
        super().__init__()
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"mask must be 'checkerboard' or 'channel', got {mask!r}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        if mask == "channel" and dim < 2:
            raise ValueError(f"a channel mask needs at least 2 channels, got dim={dim}; use "
                             "mask='checkerboard'")
        self.dim, self.mask, self.parity = int(dim), mask, int(parity)
        self.context_dim, self.invert = int(context_dim), bool(invert)
        self.element_map = Affine(clamp)
        if mask == "checkerboard":
            n_in, n_out = self.dim + 1, 2 * self.dim
        else:
            self.num_passive = self.dim // 2
            n_in, n_out = self.num_passive, 2 * (self.dim - self.num_passive)
        self.net = ConvResNet(n_in + self.context_dim, n_out, hidden_channels, num_blocks)
        self.base_shape = None  # set by builders that know it (the flow's base event shape)

    def base_event_shape(self):
        if self.base_shape is not None:
            return torch.Size(self.base_shape)
        return super().base_event_shape()

    def _features(self, y, context):
        """``(y, network input without context, context channels or None)``."""
        self._require_context(context)
        if not self.context_dim:
            return y, None
        context, y = broadcast_context(context, y, 3)
        return y, context[..., None, None].expand(*context.shape, *y.shape[-2:])

    def _transform(self, y, context, generative):
        y, c = self._features(y, context)
        emap = self.element_map
        fn = emap.forward if generative != self.invert else emap.inverse
        if self.mask == "checkerboard":
            h, w = y.shape[-2:]
            if h * w < 2:
                raise ValueError(f"a checkerboard mask needs at least 2 pixels, got a tensor of "
                                 f"shape {tuple(y.shape)}; use mask='channel'")
            m = checkerboard(h, w, self.parity, y.dtype, y.device)
            inp = [y * m, m.expand(*y.shape[:-3], 1, h, w)]
            out = self.net(torch.cat(inp + ([c] if c is not None else []), -3))
            y_new, lad = fn(y, out.chunk(2, dim=-3))
            passive = m.bool()
            return torch.where(passive, y, y_new), lad.masked_fill(passive, 0.0).sum((-3, -2, -1))
        n = self.num_passive
        first, second = y.split([n, self.dim - n] if self.parity == 0 else [self.dim - n, n], -3)
        y_a, y_b = (first, second) if self.parity == 0 else (second, first)
        out = self.net(y_a if c is None else torch.cat([y_a, c], -3))
        y_b, lad = fn(y_b, out.chunk(2, dim=-3))
        parts = [y_a, y_b] if self.parity == 0 else [y_b, y_a]
        return torch.cat(parts, -3), lad.sum((-3, -2, -1))

    def call_and_ladj(self, z, context=None):
        return self._transform(z, context, True)

    def inverse_and_ladj(self, x, context=None):
        return self._transform(x, context, False)

    def extra_repr(self):
        return (f"dim={self.dim}, mask={self.mask!r}, parity={self.parity}, "
                f"context_dim={self.context_dim}")
