r"""Emerging convolutions (Hoogeboom, van den Berg & Welling, 2019): an invertible ``k x k``
convolution made of two masked autoregressive convolutions."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from ..core import FlowLayer, batch_shape_of

__all__ = ["EmergingConv"]


def _masks(dim, k):
    """``(lower, upper)`` 0/1 kernels ``(C, C, k, k)`` of the strictly triangular parts.

    The lower convolution's taps are the top-left ``(k+1)/2`` square of the ``k x k`` window
    (every tap but the centre is at an earlier pixel in raster order); at the centre it sees
    channels ``c' < c``. The upper one is the mirror image: the bottom-right square, channels
    ``c' > c``. Each Jacobian is then triangular in raster order (channels inside a pixel),
    with the kernel's centre diagonal on its diagonal at every pixel (zero padding keeps this
    at the border), and the two squares add up to the full ``k x k`` window."""
    p = k // 2
    lower = torch.zeros(dim, dim, k, k)
    lower[:, :, : p + 1, : p + 1] = 1.0
    lower[:, :, p, p] = torch.tril(torch.ones(dim, dim), -1)
    upper = torch.zeros(dim, dim, k, k)
    upper[:, :, p:, p:] = 1.0
    upper[:, :, p, p] = torch.triu(torch.ones(dim, dim), 1)
    return lower, upper


class EmergingConv(FlowLayer):
    r"""An invertible ``k x k`` convolution of ``(C, H, W)`` images (emerging convolution):
    :math:`z = L * (U * x)` from data to base, with :math:`L` and :math:`U` masked
    (autoregressive) convolutions on opposite ``(k+1)/2``-square corners of the window, whose
    Jacobians are lower and upper triangular in raster order, so their composition is a
    ``k x k`` convolution (full receptive field) that mixes every channel. :math:`L` has a
    unit centre diagonal and :math:`U` the centre diagonal
    :math:`\sigma e^{\log|s|}` (signs fixed), so
    :math:`\log|\det \partial z/\partial x| = H W \sum_c \log|s_c|` exactly.

    Scoring (data to base, what training uses) is two convolutions. Sampling inverts
    exactly by the autoregressive solve: the two triangular systems (each the
    ``N x N`` matrix of its convolution, ``N = C H W``, built by convolving the identity)
    solved by forward/back substitution (``torch.linalg.solve_triangular``): ``O(N^2)``
    memory and per-image time, fine for small images (``N`` up to a few thousand).

    Starts as Glow's LU-parametrised 1x1 convolution at a random rotation (the centre taps
    are the rotation's L and U factors, the other taps zero).

    Why this one: of the ``d x d`` convolutions of Hoogeboom et al. (2019), the periodic one
    (FFT) assumes the image wraps around at its borders and needs complex arithmetic; the
    Woodbury transforms (Lu & Huang, 2020) are global low-rank maps, not local convolutions.
    Emerging convolutions are local, zero-padded like the conditioner's convolutions, with a
    log-det that is free and exact; only sampling pays for the solve.

    Args:
        dim: channels ``C``.
        kernel_size: odd ``k``.
    Shapes: ``z``, ``x``: ``(*batch, C, H, W)``; ``ladj``: the batch shape.
    References: Hoogeboom, van den Berg, Welling, Emerging Convolutions for Generative
    Normalizing Flows (ICML 2019), https://arxiv.org/abs/1901.11137
    """

    event_dim = 3
    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)

    def __init__(self, dim, kernel_size=3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.dim, self.kernel_size = int(dim), int(kernel_size)
        k, p = self.kernel_size, self.kernel_size // 2
        lower_mask, upper_mask = _masks(self.dim, k)
        self.register_buffer("lower_mask", lower_mask)
        self.register_buffer("upper_mask", upper_mask)
        eye = torch.zeros(self.dim, self.dim, k, k)
        eye[:, :, p, p] = torch.eye(self.dim)
        self.register_buffer("centre_eye", eye)
        rotation = torch.linalg.qr(torch.randn(self.dim, self.dim))[0]
        perm, low, up = torch.linalg.lu(rotation)
        # L U = P^T Q is a rotation too: start from its factors
        lower, upper = torch.zeros(self.dim, self.dim, k, k), torch.zeros(self.dim, self.dim, k, k)
        lower[:, :, p, p] = torch.tril(low, -1)
        upper[:, :, p, p] = torch.triu(up, 1)
        s = up.diagonal()
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(upper)
        self.log_abs_s = nn.Parameter(s.abs().log())
        self.register_buffer("sign_s", s.sign())

    def kernels(self):
        """``(L, U)`` kernels ``(C, C, k, k)`` with their masks and centre diagonals."""
        lower = self.lower * self.lower_mask + self.centre_eye
        diag = (self.sign_s * self.log_abs_s.exp())[:, None, None, None]
        upper = self.upper * self.upper_mask + self.centre_eye * diag
        return lower, upper

    def _ladj(self, y, sign):
        logdet = self.log_abs_s.sum() * (sign * y.shape[-1] * y.shape[-2])
        return logdet.expand(batch_shape_of(y, 3))

    def _conv(self, y, kernel):
        batch = y.shape[:-3]
        out = F.conv2d(y.reshape(-1, *y.shape[-3:]), kernel, padding=self.kernel_size // 2)
        return out.reshape(*batch, *out.shape[-3:])

    def _matrix(self, kernel, h, w):
        """``T`` with ``conv(y)`` = ``y T`` for ``y`` flattened in ``(H, W, C)`` order."""
        n = self.dim * h * w
        eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device)
        basis = eye.view(n, h, w, self.dim).permute(0, 3, 1, 2)
        return self._conv(basis, kernel).permute(0, 2, 3, 1).reshape(n, n)

    def inverse_and_ladj(self, x):
        lower, upper = self.kernels()
        return self._conv(self._conv(x, upper), lower), self._ladj(x, 1)

    def call_and_ladj(self, z):
        lower, upper = self.kernels()
        c, h, w = z.shape[-3:]
        flat = z.movedim(-3, -1).reshape(-1, c * h * w)
        # z = L(u), u = U(x): solve u T_L = z (T_L upper triangular), then x T_U = u (lower)
        u = torch.linalg.solve_triangular(self._matrix(lower, h, w), flat, upper=True,
                                          left=False, unitriangular=True)
        x = torch.linalg.solve_triangular(self._matrix(upper, h, w), u, upper=False, left=False)
        x = x.reshape(*z.shape[:-3], h, w, c).movedim(-1, -3)
        return x, self._ladj(z, -1)

    def extra_repr(self):
        return f"dim={self.dim}, kernel_size={self.kernel_size}"
