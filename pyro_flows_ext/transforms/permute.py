"""Volume-preserving permutations of the event."""

import torch

from ..core import FlowLayer, batch_shape_of


class Permute(FlowLayer):
    r"""Fixed permutation of the last dimension: :math:`x_i = z_{\pi(i)}`, log-det 0.

    Args:
        dim: event size ``D``.
        permutation: a permutation of ``range(D)``; default random (``torch.randperm``).
    """

    def __init__(self, dim, permutation=None):
        super().__init__()
        if permutation is None:
            permutation = torch.randperm(dim)
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        if sorted(permutation.tolist()) != list(range(dim)):
            raise ValueError(f"permutation must be a permutation of range({dim}), "
                             f"got {permutation.tolist()}")
        self.dim = dim
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def call_and_ladj(self, z):
        return z[..., self.permutation], z.new_zeros(batch_shape_of(z, 1))

    def inverse_and_ladj(self, x):
        return x[..., self.inverse_permutation], x.new_zeros(batch_shape_of(x, 1))


class Reverse(FlowLayer):
    r"""Reverses the order of the event: :math:`x_i = z_{D-1-i}`, log-det 0."""

    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def call_and_ladj(self, z):
        return z.flip(-1), z.new_zeros(batch_shape_of(z, 1))

    def inverse_and_ladj(self, x):
        return x.flip(-1), x.new_zeros(batch_shape_of(x, 1))
