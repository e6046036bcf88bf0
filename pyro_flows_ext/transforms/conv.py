"""Invertible 1x1 convolution (Glow, Kingma & Dhariwal 2018)."""

import torch
from torch import nn

from ..core import FlowLayer, batch_shape_of


class InvertibleConv1x1(FlowLayer):
    r"""A learned invertible linear map of the channels, :math:`x = W z` at every pixel.

    :math:`\log|\det J| = H W \log|\det W|` (``H W = 1`` for vectors). With ``lu=True``,
    :math:`W = P L (U + \mathrm{diag}(s\, e^{\log|s|}))` as in Glow, so the log-det is
    :math:`\sum \log|s|` and costs no decomposition.

    Args:
        dim: channels ``C`` (the event size for vectors).
        lu: use the LU parametrisation.
        event_dim: 1 for vectors ``(*batch, C)``, 3 for images ``(*batch, C, H, W)``.
        init: ``"rotation"`` (a random rotation, as Glow) or ``"reverse"`` (starts as the
            channel reversal, so a coupling stack starts as RealNVP with alternating halves).
    """

    def __init__(self, dim, lu=False, event_dim=1, init="rotation"):
        super().__init__()
        if event_dim not in (1, 3):
            raise ValueError("event_dim must be 1 (vectors) or 3 (C, H, W images), "
                             f"got {event_dim}")
        self.dim, self.lu, self.event_dim = dim, lu, event_dim
        if init == "rotation":
            rotation = torch.linalg.qr(torch.randn(dim, dim))[0].contiguous()
        elif init == "reverse":
            rotation = torch.eye(dim).flip(0)
        else:
            raise ValueError(f"init must be 'rotation' or 'reverse', got {init!r}")
        if not lu:
            self.weight = nn.Parameter(rotation)
            return
        p, lower, upper = torch.linalg.lu(rotation)
        s = upper.diagonal()
        self.register_buffer("p", p)
        self.register_buffer("sign_s", s.sign())
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1))
        self.register_buffer("eye", torch.eye(dim))
        self.lower = nn.Parameter(lower.contiguous())
        self.upper = nn.Parameter(torch.triu(upper, 1).contiguous())
        self.log_abs_s = nn.Parameter(s.abs().log().contiguous())

    def weight_and_logdet(self):
        """``(W, log|det W|)``."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_abs_s.exp())
        return self.p @ lower @ upper, self.log_abs_s.sum()

    def _apply_matrix(self, w, y):
        if self.event_dim == 1:
            return nn.functional.linear(y, w)
        return (w @ y.flatten(-2)).view_as(y)

    def _ladj(self, y, logdet, sign=1):
        if self.event_dim == 3:
            logdet = logdet * (sign * y.shape[-2] * y.shape[-1])
        elif sign < 0:
            logdet = -logdet
        return logdet.expand(batch_shape_of(y, self.event_dim))

    def call_and_ladj(self, z):
        w, logdet = self.weight_and_logdet()
        return self._apply_matrix(w, z), self._ladj(z, logdet)

    def inverse_and_ladj(self, x):
        w, logdet = self.weight_and_logdet()
        return self._apply_matrix(torch.linalg.inv(w), x), self._ladj(x, logdet, -1)
