"""Element-wise bijections."""

from torch.distributions import constraints

from ..core import FlowLayer


class Exp(FlowLayer):
    r"""Element-wise exponential, the tutorial's first bijection: :math:`x = e^z`,
    :math:`\log|\det J| = \sum_i z_i`.

    Args:
        dim: event size ``D`` (``None`` accepts any).
    Shapes: ``z``, ``x``: ``(*batch, D)``; ``x > 0``.
    """

    codomain = constraints.independent(constraints.positive, 1)

    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def call_and_ladj(self, z):
        return z.exp(), z.sum(-1)

    def inverse_and_ladj(self, x):
        z = x.log()
        return z, -z.sum(-1)
