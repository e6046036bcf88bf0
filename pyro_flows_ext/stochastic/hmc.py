r"""Hamiltonian Monte Carlo layer."""

from ._base import MCMCLayer
from ._kernels import hmc_step, log_pi_and_grad

__all__ = ["HMCLayer"]


class HMCLayer(MCMCLayer):
    r"""``steps`` MH-corrected HMC steps targeting :math:`\pi \propto e^{-U}`, the momentum
    :math:`p \sim N(0, I)` drawn afresh at each step, ``leapfrog_steps`` leapfrog steps of
    size :math:`\epsilon`; a stochastic layer.

    Each step leaves :math:`\pi` invariant and satisfies detailed balance on the position
    (the momentum is resampled and integrated out), so :math:`V = \log\pi(x) - \log\pi(z)`.
    Gradients: in training the forces are differentiated (``create_graph=True``), so the loss
    reaches earlier layers through the whole leapfrog trajectory; the accept indicators pass
    no gradient (as in the paper). The step size adapts toward 65% acceptance in training
    mode by default.

    Args:
        energy: ``(..., D) -> (...)`` energy :math:`U` (differentiable).
        steps: HMC steps per call (default 5).
        leapfrog_steps: leapfrog steps per HMC step (default 5).
        step_size: :math:`\epsilon` (default 0.1).
        **kwargs: see :class:`~pyro_flows_ext.stochastic.MCMCLayer`.
    Shapes: ``(*batch, D)`` in and out; each batch entry is its own chain.

    References: Wu, Köhler, Noé, Stochastic Normalizing Flows, NeurIPS 2020;
    Neal, MCMC using Hamiltonian dynamics (2011).
    """

    target_accept_default = 0.65

    def __init__(self, energy, steps=5, leapfrog_steps=5, step_size=0.1, **kwargs):
        if not (isinstance(leapfrog_steps, int) and leapfrog_steps >= 1):
            raise ValueError(f"leapfrog_steps must be a positive integer, got {leapfrog_steps!r}")
        self.leapfrog_steps = leapfrog_steps
        super().__init__(energy, steps, step_size, **kwargs)

    def _chain(self, y, step_size, create_graph):
        lp, g = log_pi_and_grad(self.energy, y, create_graph, self.max_grad_norm)
        lp0, acc = lp, 0.0
        for _ in range(self.steps):
            y, lp, g, accepted = hmc_step(self.energy, y, lp, g, step_size,
                                          self.leapfrog_steps, create_graph,
                                          self.max_grad_norm)
            acc = acc + accepted.float().mean()
        return y, lp - lp0, float(acc) / self.steps

    def extra_repr(self):
        return f"{super().extra_repr()}, leapfrog_steps={self.leapfrog_steps}"
