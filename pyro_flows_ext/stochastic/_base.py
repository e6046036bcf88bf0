r"""The shared machinery of the MCMC layers: energy, step size (learnable or adapted), both
directions, and the likelihood contribution :math:`V`."""

import math

import torch
from torch import nn

from ..core import StochasticLayer

__all__ = ["MCMCLayer"]


class MCMCLayer(StochasticLayer):
    r"""Base of the MCMC layers of a Stochastic Normalizing Flow (Wu, Köhler, Noé 2020).

    Both directions run the same kernel ``steps`` times: sampling runs it from ``z`` and
    returns ``x``; scoring runs it from ``x`` and returns ``z`` (the kernel is reversible, so
    it is its own backward kernel). Subclasses implement :meth:`_chain`, returning the end of
    the chain and the log path ratio :math:`r = \log K(\text{end}|\text{start}) -
    \log K(\text{start}|\text{end})`; then :math:`V = r` when sampling and :math:`V = -r`
    when scoring. For MH-corrected kernels :math:`r = \log\pi(\text{end}) -
    \log\pi(\text{start})` by detailed balance, so :math:`V = \log\pi(x) - \log\pi(z)` in both
    directions, whatever :math:`\pi` is (it only has to be the layer's own energy), and
    :math:`\exp` of the flow's ``log_prob`` stays unbiased for the flow's marginal density.

    Step sizes are a buffer adapted in training mode (``adapt=True``, the default for the
    MH-corrected layers): after each call, :math:`\log s \mathrel{+}= \gamma (\bar a - a^*)`
    with :math:`\bar a` the call's mean acceptance, so the kernel is fixed within a call (and
    stays reversible); eval mode never adapts. With ``learn_step_size=True`` the log step size
    is an ``nn.Parameter`` trained by the loss through the reparameterised proposals (and,
    for unadjusted Langevin, through :math:`V`). The two are exclusive.

    Args:
        energy: callable ``(..., D) -> (...)``, :math:`U = -\log\pi` up to a constant; an
            ``nn.Module`` is registered as a submodule (it follows ``.to()``).
        steps: kernel applications per call.
        step_size: initial step size, a float or a ``(D,)`` tensor.
        dim: event size ``D`` (default ``energy.dim`` if it has one; ``None`` accepts any).
        adapt: adapt the step size in training mode toward ``target_accept``.
        target_accept: target mean acceptance probability.
        adapt_rate: :math:`\gamma`.
        learn_step_size: make the log step size a trainable parameter.
        max_grad_norm: per-chain clip of :math:`\nabla\log\pi` (kernels stay exact).
    Shapes: ``z``, ``x``: ``(*batch, D)``; every batch entry is its own chain; ``ladj``:
    ``batch``.
    """

    target_accept_default = 0.5
    adapt_default = True

    def __init__(self, energy, steps=10, step_size=0.1, dim=None, adapt=None,
                 target_accept=None, adapt_rate=0.1, learn_step_size=False,
                 max_grad_norm=1e4):
        super().__init__()
        if not callable(energy):
            raise TypeError(f"energy must be a callable (..., D) -> (...), got "
                            f"{type(energy).__name__}")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        adapt = self.adapt_default if adapt is None else bool(adapt)
        if adapt and learn_step_size:
            raise ValueError("choose adapt=True (a buffer adapted toward target_accept) or "
                             "learn_step_size=True (a trained parameter), not both")
        step = torch.as_tensor(step_size, dtype=torch.get_default_dtype())
        if not (step > 0).all() or not torch.isfinite(step).all():
            raise ValueError(f"step_size must be positive and finite, got {step_size!r}")
        self.energy = energy
        self.dim = dim if dim is not None else getattr(energy, "dim", None)
        self.steps, self.adapt, self.adapt_rate = steps, adapt, float(adapt_rate)
        self.target_accept = float(self.target_accept_default if target_accept is None
                                   else target_accept)
        self.learn_step_size, self.max_grad_norm = bool(learn_step_size), max_grad_norm
        if learn_step_size:
            self.log_step_size = nn.Parameter(step.log())
        else:
            self.register_buffer("log_step_size", step.log())
        # acceptance of the last call (a diagnostic; NaN before the first call)
        self.register_buffer("accept_rate", torch.tensor(math.nan))

    @property
    def step_size(self):
        return self.log_step_size.exp()

    def _chain(self, y, step_size, create_graph):
        """Runs the kernel from ``y``; returns ``(end, log_ratio, mean_acceptance)``."""
        raise NotImplementedError

    def _run(self, y):
        create_graph = torch.is_grad_enabled() and (y.requires_grad or self.learn_step_size)
        step = self.step_size.to(y)  # a fresh tensor: adapting the buffer never hits a graph
        if not create_graph:
            with torch.no_grad():
                end, r, acc = self._chain(y, step, False)
        else:
            end, r, acc = self._chain(y, step, True)
        self._after(acc)
        return end, r

    def _after(self, acc):
        with torch.no_grad():
            self.accept_rate.fill_(float(acc))
            if self.adapt and self.training:
                self.log_step_size.add_(self.adapt_rate * (float(acc) - self.target_accept))

    @property
    def reversible(self):
        """Whether the kernel satisfies detailed balance for its energy (MH-corrected)."""
        return True

    def _ladj_of_unseen_pair(self, z, x):
        """``-V = log pi(z) - log pi(x)`` for any pair: detailed balance of the ``steps``-fold
        kernel makes the path ratio a closed form of the pair (MH-corrected layers only)."""
        if not self.reversible:
            return super()._ladj_of_unseen_pair(z, x)
        return self.energy(x) - self.energy(z)

    def call_and_ladj(self, z):
        x, r = self._run(z)
        return x, -r  # V = r, ladj = -V

    def inverse_and_ladj(self, x):
        z, r = self._run(x)
        return z, -r  # V = -r

    def extra_repr(self):
        how = "adapted" if self.adapt else ("learned" if self.learn_step_size else "fixed")
        return (f"dim={self.dim}, steps={self.steps}, step_size={self.step_size.tolist()} "
                f"({how})")
