r"""Langevin layers: MALA (Metropolis-adjusted) and unadjusted Langevin."""

import torch

from ._base import MCMCLayer
from ._kernels import log_pi_and_grad, mala_step

__all__ = ["LangevinLayer"]


class LangevinLayer(MCMCLayer):
    r"""``steps`` Langevin steps targeting :math:`\pi \propto e^{-U}`:
    :math:`x' = x + \epsilon\nabla\log\pi(x) + \sqrt{2\epsilon}\,\xi`; a stochastic layer.

    ``adjusted=True`` (MALA): each move is MH-corrected with the Gaussian forward/backward
    proposal densities, so :math:`\pi` is exactly invariant and :math:`V = \log\pi(x) -
    \log\pi(z)`. ``adjusted=False`` (unadjusted Langevin, ULA): every move is kept, the chain
    is only approximately :math:`\pi`-invariant (bias :math:`O(\epsilon)`), and :math:`V` is
    the path ratio :math:`\sum_k \log N(y_{k+1}; y_k + \epsilon\nabla\log\pi(y_k), 2\epsilon)
    - \log N(y_k; y_{k+1} + \epsilon\nabla\log\pi(y_{k+1}), 2\epsilon)` along the generative
    path, which keeps ``log_prob`` an honest bound (its exp unbiased) all the same.

    Gradients: in training (gradients enabled, input on a graph) :math:`\nabla\log\pi` is
    taken with ``create_graph=True``, so the loss reaches earlier layers through every drift
    term and the reparameterised noise; MALA's accept indicators pass no gradient (as in the
    paper). Step size: MALA adapts it toward 57% acceptance in training mode by default; ULA
    keeps it fixed unless ``learn_step_size=True`` (then :math:`V` depends on it and the loss
    trains it).

    Args:
        energy: ``(..., D) -> (...)`` energy :math:`U` (differentiable).
        steps: Langevin steps per call (default 10).
        step_size: :math:`\epsilon` (default 0.05).
        adjusted: MH-correct each move (MALA).
        **kwargs: see :class:`~pyro_flows_ext.stochastic.MCMCLayer`.
    Shapes: ``(*batch, D)`` in and out; each batch entry is its own chain.

    References: Wu, Köhler, Noé, Stochastic Normalizing Flows, NeurIPS 2020;
    Roberts and Tweedie, Bernoulli 2 (1996).
    """

    target_accept_default = 0.574

    def __init__(self, energy, steps=10, step_size=0.05, adjusted=True, adapt=None,
                 **kwargs):
        self.adjusted = bool(adjusted)
        if adapt is None:
            adapt = self.adjusted and not kwargs.get("learn_step_size", False)
        if adapt and not self.adjusted:
            raise ValueError("adjusted=False has no accept rate to adapt to: use a fixed "
                             "step_size or learn_step_size=True")
        super().__init__(energy, steps, step_size, adapt=adapt, **kwargs)

    @property
    def reversible(self):
        return self.adjusted  # ULA's V is a path ratio, not a closed form of the pair

    def _chain(self, y, step_size, create_graph):
        lp, g = log_pi_and_grad(self.energy, y, create_graph, self.max_grad_norm)
        lp0, path, acc = lp, 0.0, 0.0
        for _ in range(self.steps):
            y, lp, g, accepted, log_ratio = mala_step(self.energy, y, lp, g, step_size,
                                                      self.adjusted, create_graph,
                                                      self.max_grad_norm)
            acc = acc + accepted.float().mean()
            path = path + log_ratio
        r = lp - lp0 if self.adjusted else path * torch.ones_like(lp)
        return y, r, float(acc) / self.steps

    def extra_repr(self):
        return f"{super().extra_repr()}, adjusted={self.adjusted}"
