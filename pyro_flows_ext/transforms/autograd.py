"""User bijections that supply only the two maps; log|det J| comes from autograd."""

import torch
from torch.func import jacrev, vmap

from ..core import FlowLayer


class AutogradBijection(FlowLayer):
    r"""Base for a bijection given by its two maps; the log-det is computed by autograd.

    Subclass and implement ``forward_map(z)`` and ``inverse_map(x)`` for vector events of
    size ``dim`` (``None``: any size; they must accept a single event of shape ``(D,)``);
    :math:`\log|\det J|` is the
    ``slogdet`` of the Jacobian from :func:`torch.func.jacrev`, vectorised over the batch,
    so it costs ``O(D)`` backward passes and ``O(D^3)`` per event. This is the tutorial's
    ``ADBijector``: the quickest way to a correct layer; write ``call_and_ladj`` by hand
    when speed matters.

    Example:
        >>> class Cube(AutogradBijection):
        ...     def forward_map(self, z):
        ...         return z + z**3
        ...     def inverse_map(self, x):  # solve x = z + z^3 by Newton steps
        ...         z = x / 2
        ...         for _ in range(50):
        ...             z = z - (z + z**3 - x) / (1 + 3 * z**2)
        ...         return z
        >>> x, ladj = Cube().call_and_ladj(torch.ones(2))
        >>> round(ladj.item(), 4)  # log(4) + log(4)
        2.7726
    """

    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim  # event size, checked on every call (None: any)

    def forward_map(self, z):
        raise NotImplementedError

    def inverse_map(self, x):
        raise NotImplementedError

    def _ladj_at(self, z):
        flat = z.reshape(-1, z.shape[-1])
        jac = vmap(jacrev(self.forward_map))(flat)
        return torch.linalg.slogdet(jac)[1].reshape(z.shape[:-1])

    def call_and_ladj(self, z):
        return self.forward_map(z), self._ladj_at(z)

    def inverse_and_ladj(self, x):
        z = self.inverse_map(x)
        return z, -self._ladj_at(z)
