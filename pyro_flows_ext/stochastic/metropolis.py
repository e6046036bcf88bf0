r"""Random-walk Metropolis layer."""

from ._base import MCMCLayer
from ._kernels import log_pi, metropolis_step

__all__ = ["MetropolisLayer"]


class MetropolisLayer(MCMCLayer):
    r"""``steps`` random-walk Metropolis steps targeting :math:`\pi \propto e^{-U}`; a stochastic
    layer (``log_prob`` is a stochastic lower bound whose exp is unbiased).

    Each step proposes :math:`x' = x + s\,\xi`, :math:`\xi \sim N(0, I)`, and accepts with
    probability :math:`\min(1, \pi(x')/\pi(x))`; :math:`V = \log\pi(x) - \log\pi(z)` (detailed
    balance). What flows through the accept decisions (as in the paper): gradients reach the
    flow's parameters through the reparameterised proposals that were accepted and through
    the energies in :math:`V`; the indicators themselves are treated as constants (their
    derivative is zero almost everywhere). The step size is adapted toward 40% acceptance in
    training mode by default (see :class:`~pyro_flows_ext.stochastic.MCMCLayer`).

    Args:
        energy: ``(..., D) -> (...)`` energy :math:`U`.
        steps: Metropolis steps per call (default 10).
        step_size: proposal scale :math:`s` (default 0.25).
        **kwargs: ``dim``, ``adapt``, ``target_accept`` (0.4), ``adapt_rate``,
            ``learn_step_size``, see :class:`~pyro_flows_ext.stochastic.MCMCLayer`.
    Shapes: ``(*batch, D)`` in and out; each batch entry is its own chain.

    Example:
        >>> import torch
        >>> layer = MetropolisLayer(lambda x: 0.5 * x.square().sum(-1), dim=2)
        >>> x, ladj = layer.call_and_ladj(torch.randn(100, 2))
        >>> tuple(x.shape), tuple(ladj.shape)
        ((100, 2), (100,))

    References: Wu, Köhler, Noé, Stochastic Normalizing Flows, NeurIPS 2020,
    https://arxiv.org/abs/2002.06707
    """

    target_accept_default = 0.4

    def __init__(self, energy, steps=10, step_size=0.25, **kwargs):
        super().__init__(energy, steps, step_size, **kwargs)

    def _chain(self, y, step_size, create_graph):
        lp0 = lp = log_pi(self.energy, y)
        acc = 0.0
        for _ in range(self.steps):
            y, lp, accepted = metropolis_step(self.energy, y, lp, step_size)
            acc = acc + accepted.float().mean()
        return y, lp - lp0, float(acc) / self.steps
