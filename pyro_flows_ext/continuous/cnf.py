r"""Continuous normalizing flows (FFJORD) integrated with ``torchdiffeq``.

:math:`\frac{d y}{d t} = f(t, y, c)`, :math:`y(0) = z` (base side), :math:`x = y(T)` (data
side), and the instantaneous change of variables
:math:`\log|\det \partial x / \partial z| = \int_0^T \operatorname{tr} \frac{\partial f}{\partial
y}\, dt`, integrated together with the state (Chen et al. 2018; Grathwohl et al. 2019).
"""

import torch
from torchdiffeq import odeint, odeint_adjoint

from ..core import FlowLayer, broadcast_context
from ..nn.dynamics import TimeMLP
from ._trace import draw_noise, exact_divergence, hutchinson_divergence

__all__ = ["CNF"]

_TRACES = ("hutchinson", "exact")


class _Field:
    """The augmented right-hand side of one solve: velocity, divergence and (optionally) the
    RNODE integrands. A new one per solve, holding that solve's Hutchinson probe, so the
    adjoint pass of a solve always reuses the probe its forward pass used."""

    def __init__(self, dynamics, trace, eps, context, regularize):
        self.dynamics, self.trace, self.eps = dynamics, trace, eps
        self.context, self.regularize = context, regularize
        self.nfe = 0  # every evaluation, forward and adjoint
        self.nfe_solve = None  # evaluations of the (forward-in-the-graph) solve

    def __call__(self, t, state):
        self.nfe += 1
        y = state[0]

        def f(y, c):
            return self.dynamics(t, y, c)

        if self.trace == "exact":
            dy, div, frob = exact_divergence(f, y, self.context, self.regularize)
        else:
            dy, div, frob = hutchinson_divergence(f, y, self.eps, self.context, self.regularize)
        if self.regularize:
            return dy, div, dy.square().sum(-1), frob
        return dy, div


class CNF(FlowLayer):
    r"""A continuous normalizing flow: :math:`x = z + \int_0^T f(t, y(t), c)\,dt`, exact
    (bijective) or, with ``augment_dim > 0``, an augmented neural ODE (a lower bound).

    :math:`\log|\det \partial x/\partial z| = \int_0^T \operatorname{tr}\,\partial f/\partial y
    \,dt`, with the trace computed exactly (``jacrev`` + ``vmap``: :math:`D` vector-Jacobian
    products, small :math:`D`) or estimated by Hutchinson's estimator with one probe
    :math:`\epsilon` drawn per solve (unbiased for the log-det, one vector-Jacobian product).
    In eval mode the trace is ``eval_trace`` (exact by default: "at test time you need the
    exact trace"), so ``log_prob`` of a model in eval mode is the exact log-density to the
    solver's tolerance. Sampling and scoring each cost one ODE solve.

    Gradients: with ``adjoint=True`` the adjoint method (``odeint_adjoint``, memory constant in
    the number of steps) with the dynamics' parameters passed explicitly as
    ``adjoint_params``, in train *and* eval mode; else backpropagation through the solver.

    RNODE (Finlay et al. 2020): when training with ``kinetic_weight`` or ``jacobian_weight``
    > 0, every solve also integrates :math:`\int\|f\|^2 dt` and :math:`\int\|\partial f/\partial
    y\|_F^2 dt` (Hutchinson's estimate in Hutchinson mode); :meth:`regularization` returns
    their weighted batch mean, which the training loss adds (``loss = nll +
    layer.regularization()``; :func:`pyro_flows_ext.continuous.regularization` sums a flow's).
    They make the dynamics simpler, so the adaptive solver takes fewer steps. A starting
    point: both weights 0.1 (on the 2-D benchmarks, ``benchmarks/cnf.md``: 5-10% fewer
    forward and 6-36% fewer backward evaluations after 300 steps, at +0.09 nats or less);
    0.01 does not change the step counts measurably; 0.5 roughly halves them but costs about
    half a nat at that budget.

    Augmented neural ODE (Dupont et al. 2019; ``augment_dim = A > 0``): the ODE runs on
    :math:`D + A` dims so trajectories can cross in the original :math:`D`. The base has
    event size :math:`D + A`; generatively :math:`x = y(T)_{:D}` (the rest is dropped);
    scoring pads :math:`x` with :math:`e \sim q(e \mid x, c)`, a
    :class:`~pyro_flows_ext.surjections.Augment` layer held as ``self.augment`` (a diagonal
    Gaussian from an MLP, starting at :math:`N(0, I_A)`, trained with the flow):
    :math:`V = \log|\det \partial z/\partial y| - \log q(e \mid x)`, so
    ``log_prob`` is a stochastic lower bound (``exact = False``) whose exp is unbiased for
    :math:`p(x)`; scoring ``x.expand((K,) + x.shape)`` gives K independent draws, and
    :math:`\log \frac1K \sum_k \exp(\cdot)` is the tighter importance-weighted bound.

    Args:
        dim: event size :math:`D`.
        hidden_dims: hidden sizes of the default dynamics
            (:class:`~pyro_flows_ext.nn.TimeMLP`, zero-initialised: starts at the identity).
        trace: training trace, ``'hutchinson'`` or ``'exact'``.
        noise: Hutchinson probe, ``'rademacher'`` or ``'gaussian'``.
        T: integration time.
        solver: a ``torchdiffeq`` method (``'dopri5'``, ``'rk4'``, ...).
        rtol, atol: solver tolerances.
        adjoint: adjoint-method gradients.
        augment_dim: extra dims :math:`A` of an augmented neural ODE.
        context_dim: context size (``layer.condition(c)`` or ``context=``).
        eval_trace: trace in eval mode (``None``: as ``trace``).
        kinetic_weight, jacobian_weight: RNODE weights (0: not computed).
        layer, activation: of the default dynamics (``'concatsquash'``/``'concat'``;
            ``'tanh'``, ``'softplus'``, ...).
        dynamics: your own ``nn.Module`` ``f(t, y, context) -> dy`` on :math:`D + A` dims
            (replaces the default network).
        solver_options: ``options`` passed to ``odeint`` (e.g. ``{'step_size': 0.05}`` for
            fixed-step methods).
    Shapes: ``z``: ``(*batch, D + A)``; ``x``: ``(*batch, D)``; context ``(*batch, C)``.
    Attributes: ``nfe_forward``, ``nfe_backward``: function evaluations of the last solve and
    of its backward pass (adjoint: evaluations of the adjoint solve; direct backprop: the
    recorded evaluations, equal to the solve's).
    References: FFJORD (Grathwohl et al. 2019) https://arxiv.org/abs/1810.01367; RNODE
    (Finlay et al. 2020) https://arxiv.org/abs/2002.02798; ANODE (Dupont et al. 2019)
    https://arxiv.org/abs/1904.01681
    """

    def __init__(self, dim, hidden_dims=(64, 64, 64), trace="hutchinson", noise="rademacher",
                 T=1.0, solver="dopri5", rtol=1e-5, atol=1e-5, adjoint=False, augment_dim=0,
                 context_dim=0, eval_trace="exact", kinetic_weight=0.0, jacobian_weight=0.0,
                 layer="concatsquash", activation="tanh", dynamics=None, solver_options=None):
        super().__init__()
        for name, value in (("trace", trace), ("eval_trace", eval_trace)):
            if value not in _TRACES and not (name == "eval_trace" and value is None):
                raise ValueError(f"{name} must be 'hutchinson' or 'exact', got {value!r}")
        draw_noise(torch.zeros(1), noise)  # validates the name
        if not (isinstance(augment_dim, int) and augment_dim >= 0):
            raise ValueError(f"augment_dim must be a non-negative integer, got {augment_dim!r}")
        if not T > 0:
            raise ValueError(f"T must be positive, got {T!r}")
        self.dim, self.augment_dim, self.context_dim = dim, augment_dim, context_dim
        self.trace, self.noise, self.eval_trace = trace, noise, eval_trace
        self.T, self.solver, self.rtol, self.atol = float(T), solver, rtol, atol
        self.adjoint, self.solver_options = bool(adjoint), solver_options
        self.kinetic_weight, self.jacobian_weight = float(kinetic_weight), float(jacobian_weight)
        self.dynamics = dynamics if dynamics is not None else TimeMLP(
            dim + augment_dim, tuple(hidden_dims), context_dim, layer, activation)
        if augment_dim:  # a generative surjection: the Augment layer's contract, reused
            from ..surjections import Augment

            self.augment = Augment(dim, augment_dim, context_dim=context_dim)
            self.bijective, self.exact, self.stochastic_inverse = False, False, True
        self._last, self._terms = None, None

    # -- shapes --------------------------------------------------------------------------------
    def _check_size(self, shape, size, side):
        if len(shape) < 1 or shape[-1] != size:
            raise ValueError(f"CNF expects events of size {size} in the last dimension on the "
                             f"{side} side, got a tensor of shape {tuple(shape)}")

    def forward_shape(self, shape):
        self._check_size(shape, self.dim + self.augment_dim, "base")
        return torch.Size(shape[:-1]) + (self.dim,)

    def inverse_shape(self, shape):
        self._check_size(shape, self.dim, "data")
        return torch.Size(shape[:-1]) + (self.dim + self.augment_dim,)

    def base_event_shape(self):
        return torch.Size([self.dim + self.augment_dim])

    # -- the solve -----------------------------------------------------------------------------
    def velocity(self, t, y, context=None):
        """The field :math:`f(t, y, c)` (what flow matching regresses)."""
        return self.dynamics(t, y, context)

    def _solve(self, y, t0, t1, context):
        """``(y(t1), int_{t0}^{t1} tr df/dy dt)`` from ``y(t0) = y``."""
        self._require_context(context)
        if context is not None:
            context, y = broadcast_context(context, y)
        batch, size = y.shape[:-1], y.shape[-1]
        flat = y.reshape(-1, size)
        c = None if context is None else context.reshape(-1, context.shape[-1])
        trace = self.trace if self.training else (self.eval_trace or self.trace)
        eps = draw_noise(flat, self.noise) if trace == "hutchinson" else None
        regularize = bool(self.training and torch.is_grad_enabled()
                          and (self.kinetic_weight or self.jacobian_weight))
        field = _Field(self.dynamics, trace, eps, c, regularize)
        zeros = flat.new_zeros(flat.shape[0])
        state = (flat, zeros) + ((zeros, zeros) if regularize else ())
        ts = torch.tensor([t0, t1], dtype=flat.dtype, device=flat.device)
        kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.solver,
                      options=self.solver_options)
        if self.adjoint and torch.is_grad_enabled():
            params = tuple(p for p in self.dynamics.parameters() if p.requires_grad)
            if c is not None and c.requires_grad:
                params += (c,)
            out = odeint_adjoint(field, state, ts, adjoint_params=params, **kwargs)
        else:
            out = odeint(field, state, ts, **kwargs)
        field.nfe_solve = field.nfe
        field.eps = eps
        self._last = field
        final = [s[-1] for s in out]
        if regularize:
            sign = 1.0 if t1 > t0 else -1.0  # integrals run backwards when scoring
            self._terms = {"kinetic": sign * final[2].mean(), "jacobian": sign * final[3].mean()}
        else:
            self._terms = None
        return final[0].reshape(batch + (size,)), final[1].reshape(batch)

    def call_and_ladj(self, z, context=None):
        y, ladj = self._solve(z, 0.0, self.T, context)
        if not self.augment_dim:
            return y, ladj
        x, log_q = self.augment.call_and_ladj(y, context)  # drops e; log q(e | x, c)
        return x, ladj + log_q  # -V of the pair: V = v_ode - log q(e | x)

    def inverse_and_ladj(self, x, context=None):
        if self.augment_dim:
            y, v_augment = self.augment.inverse_and_ladj(x, context)  # [x, e], -log q
            z, v = self._solve(y, self.T, 0.0, context)
            return z, v + v_augment
        return self._solve(x, self.T, 0.0, context)

    # -- diagnostics and regularisation ----------------------------------------------------------
    @property
    def nfe_forward(self):
        """Function evaluations of the last solve (either time direction)."""
        return None if self._last is None else self._last.nfe_solve

    @property
    def nfe_backward(self):
        """Function evaluations of the last solve's backward pass (adjoint: the adjoint solve,
        0 until ``backward()`` ran; direct backprop: the recorded evaluations)."""
        last = self._last
        if last is None:
            return None
        return last.nfe - last.nfe_solve if self.adjoint else last.nfe_solve

    def regularization_terms(self):
        """``{'kinetic': ..., 'jacobian': ...}``: RNODE integrals (batch means) of the last
        training solve, or ``None`` when none were computed (eval mode, zero weights)."""
        return self._terms

    def regularization(self):
        r"""``kinetic_weight * E int |f|^2 dt + jacobian_weight * E int |df/dy|_F^2 dt`` of the
        last training solve (a tensor with a graph; 0 when none were computed)."""
        terms = self._terms
        if terms is None:
            return torch.zeros(())
        return self.kinetic_weight * terms["kinetic"] + self.jacobian_weight * terms["jacobian"]

    def clear_cache(self):
        super().clear_cache()
        self._terms = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_last"], state["_terms"] = None, None
        return state
