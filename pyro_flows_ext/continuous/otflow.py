r"""OT-Flow (Onken et al. 2021): a CNF whose velocity is the gradient of a potential, with
the exact trace of its Jacobian in closed form and optimal-transport regularisers.

Potential on :math:`s = (x, t[, c])`: :math:`\Phi(s) = w^\top N(s) + \tfrac12 s^\top A^\top A
s + b^\top s`, :math:`N` a ResNet :math:`u_0 = \sigma(K_0 s + b_0)`, :math:`u_i = u_{i-1} + h
\sigma(K_i u_{i-1} + b_i)` with :math:`\sigma(a) = \log(e^a + e^{-a})` (so :math:`\sigma' =
\tanh`). Velocity :math:`v = -\nabla_x \Phi`; both :math:`\nabla_s \Phi` and
:math:`\Delta_x \Phi = \operatorname{tr} \nabla_x^2 \Phi` are computed by hand: one forward and
one backward sweep through :math:`N`, with the Hessian trace summed layer by layer,
:math:`\sum_i h_i \sum_k \sigma''(a_i)_k\, g_{i,k} \|(\partial a_i/\partial x)_k\|^2`, so the
exact trace costs about what one Hutchinson probe does in FFJORD (:math:`O(d)` per layer
for the first layer, no autograd inside the dynamics).
"""

import math

import torch
from torch import nn

from ..core import FlowLayer, broadcast_context

__all__ = ["OTFlow"]


def _logcosh2(a):
    """``log(exp(a) + exp(-a))``, stably."""
    b = a.abs()
    return b + torch.log1p(torch.exp(-2 * b))


class OTFlow(FlowLayer):
    r"""OT-Flow: :math:`\frac{dx}{dt} = -\nabla_x \Phi(x, t)`, integrated by fixed-step RK4.

    Direction (as in the paper): data at :math:`t = 0`, base at :math:`t = T`; scoring
    integrates :math:`0 \to T` with :math:`\log|\det \partial z/\partial x| = -\int_0^T
    \Delta_x \Phi\, dt` (exact trace, closed form), sampling integrates back. ``num_steps``
    RK4 steps while training, ``eval_steps`` in eval mode (more: the discretisation error of
    the log-density shrinks as ``steps ** -4``). Exact up to that discretisation.

    Regularisers (training solves): transport cost :math:`L = E \int_0^T \tfrac12 \|\nabla_x
    \Phi\|^2 dt` and the HJB penalty :math:`R = E \int_0^T |\partial_t \Phi - \tfrac12
    \|\nabla_x \Phi\|^2|\, dt`; :meth:`regularization` returns ``transport_weight * L +
    hjb_weight * R`` for the training loss to add.

    Args:
        dim: event size :math:`d`.
        width: ResNet width :math:`m`.
        depth: ResNet layers (the opening layer included; Onken's ``nTh``, >= 2).
        rank: rank of :math:`A` (default ``min(10, d + 1)``).
        T: integration time.
        num_steps, eval_steps: RK4 steps in train and eval mode.
        context_dim: context size (appended to :math:`s`).
        transport_weight, hjb_weight: regulariser weights.
    Shapes: ``(*batch, d)`` both sides; context ``(*batch, C)``.
    Attributes: ``nfe_forward`` (4 per RK4 step); ``nfe_backward`` (the same: backprop through
    the recorded steps).
    References: Onken, Wu Fung, Li, Ruthotto, "OT-Flow: Fast and Accurate Continuous
    Normalizing Flows via Optimal Transport", AAAI 2021, https://arxiv.org/abs/2006.00104
    """

    def __init__(self, dim, width=32, depth=2, rank=None, T=1.0, num_steps=4,
                 eval_steps=12, context_dim=0, transport_weight=0.01, hjb_weight=0.05):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be at least 2 (opening layer + ResNet), got "
                             f"{depth}")
        self.dim, self.context_dim, self.width, self.depth = dim, context_dim, width, depth
        self.T, self.num_steps, self.eval_steps = float(T), int(num_steps), int(eval_steps)
        self.transport_weight, self.hjb_weight = float(transport_weight), float(hjb_weight)
        n = dim + 1 + context_dim
        rank = min(10, dim + 1) if rank is None else rank
        self.rank = rank
        self.h = 1.0 / (depth - 1)
        opening = nn.Linear(n, width)
        self.K0, self.b0 = nn.Parameter(opening.weight.data), nn.Parameter(opening.bias.data)
        blocks = [nn.Linear(width, width) for _ in range(depth - 1)]
        self.K = nn.ParameterList(nn.Parameter(b.weight.data) for b in blocks)
        self.b = nn.ParameterList(nn.Parameter(b.bias.data) for b in blocks)
        self.w = nn.Parameter(torch.zeros(width))  # Phi starts at the small quadratic below
        A = torch.empty(rank, n)
        nn.init.xavier_uniform_(A)
        self.A = nn.Parameter(0.1 * A)
        self.bq = nn.Parameter(torch.zeros(n))
        self._terms, self._nfe = None, None

    # -- the potential ---------------------------------------------------------------------------
    def _s(self, x, t, c):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[:-1] + (1,))
        return torch.cat([x, t] if c is None else [x, t, c], -1)

    def potential(self, x, t, context=None):
        r""":math:`\Phi(x, t[, c])` (shapes ``(N, d) -> (N,)``)."""
        s = self._s(x, t, context)
        u = _logcosh2(s @ self.K0.T + self.b0)
        for K, b in zip(self.K, self.b):
            u = u + self.h * _logcosh2(u @ K.T + b)
        quad = 0.5 * (s @ self.A.T).square().sum(-1)
        return u @ self.w + quad + s @ self.bq

    def _constants(self):
        """Parameter-only pieces of the gradient and Laplacian, the same at every evaluation
        of a solve (so a solve computes them once; gradients flow through them)."""
        d = self.dim
        Kx = self.K0[:, :d]  # d a0 / d x
        return {"KxT": Kx.T.unsqueeze(1), "Kx2": Kx.square().sum(-1),
                "AtA": self.A.T @ self.A, "trAA": self.A[:, :d].square().sum()}

    def grad_and_laplacian(self, x, t, context=None, constants=None):
        r"""``(grad_s Phi, Laplacian_x Phi)``, both in closed form: ``(N, d + 1 + C)`` (the
        first ``d`` entries are :math:`\nabla_x \Phi`, entry ``d`` is :math:`\partial_t \Phi`)
        and ``(N,)``."""
        k = self._constants() if constants is None else constants
        h = self.h
        s = self._s(x, t, context)
        a0 = torch.addmm(self.b0, s, self.K0.T)
        tanh0 = torch.tanh(a0)
        acts, rows = [], []  # tanh(a_i) and ||(d a_i / d x)_k||^2, layers i >= 1: (N, m)
        last = len(self.K) - 1  # >= 0: depth >= 2
        u = _logcosh2(a0)
        # d u_i / d x laid out (d, N, m): every product with K_i is one (d N, m) x (m, m) matmul
        jac = tanh0.unsqueeze(0) * k["KxT"]
        for i, (K, b) in enumerate(zip(self.K, self.b)):
            a = torch.addmm(b, u, K.T)
            th = torch.tanh(a)
            acts.append(th)
            KJ = jac @ K.T  # d a_i / d x
            rows.append(KJ.square().sum(0))
            if i < last:  # the last layer's output is not needed for the gradient or trace
                u = u + h * _logcosh2(a)
                jac = jac + h * th.unsqueeze(0) * KJ
        g = self.w  # dPhi/du of the last layer, (m,); (N, m) below it
        trace = k["trAA"]
        for i in range(last, -1, -1):
            th, hg = acts[i], h * g
            curv = (1 - th.square()) * rows[i]
            trace = trace + (curv @ hg if hg.dim() == 1 else (curv * hg).sum(-1))
            g = torch.addmm(g, th * hg, self.K[i])
        trace = trace + ((1 - tanh0.square()) * g) @ k["Kx2"]
        grad = torch.addmm(torch.addmm(self.bq, s, k["AtA"]), tanh0 * g, self.K0)
        return grad, trace

    def velocity(self, t, x, context=None):
        r""":math:`v = -\nabla_x \Phi(x, t)`."""
        return -self.grad_and_laplacian(x, t, context)[0][..., :self.dim]

    # -- RK4 ---------------------------------------------------------------------------------
    def _rates(self, x, t, c, regularize, constants):
        """``d/dt [x, l(, L, R)]`` as one ``(N, d + 1 (+ 2))`` tensor."""
        grad, lap = self.grad_and_laplacian(x, t, c, constants)
        d = self.dim
        gx = grad[:, :d]
        if not regularize:
            return torch.cat([gx, lap.unsqueeze(-1)], -1).neg()
        kinetic = 0.5 * gx.square().sum(-1, keepdim=True)
        hjb = (grad[:, d:d + 1] - kinetic).abs()
        return torch.cat([gx.neg(), lap.unsqueeze(-1).neg(), kinetic, hjb], -1)

    def _solve(self, y, t0, t1, context):
        self._require_context(context)
        if context is not None:
            context, y = broadcast_context(context, y)
        batch, d = y.shape[:-1], self.dim
        x = y.reshape(-1, d)
        c = None if context is None else context.reshape(-1, context.shape[-1])
        steps = self.num_steps if self.training else self.eval_steps
        regularize = self.training and torch.is_grad_enabled()
        constants = self._constants()
        dt = (t1 - t0) / steps
        # the state [x, l(, L, R)]: one tensor, so an RK4 step is a handful of tensor ops
        state = torch.cat([x, x.new_zeros(len(x), 3 if regularize else 1)], -1)
        t = t0
        for _ in range(steps):
            x0 = state[:, :d]
            k1 = self._rates(x0, t, c, regularize, constants)
            k2 = self._rates(x0 + (0.5 * dt) * k1[:, :d], t + 0.5 * dt, c, regularize, constants)
            k3 = self._rates(x0 + (0.5 * dt) * k2[:, :d], t + 0.5 * dt, c, regularize, constants)
            k4 = self._rates(x0 + dt * k3[:, :d], t + dt, c, regularize, constants)
            state = state + (dt / 6) * (k1 + 2 * (k2 + k3) + k4)
            t = t + dt
        self._nfe = 4 * steps
        if regularize:
            sign = math.copysign(1.0, t1 - t0)
            means = state[:, d + 1:].mean(0)
            self._terms = {"transport": sign * means[0], "hjb": sign * means[1]}
        else:
            self._terms = None
        return state[:, :d].reshape(batch + (d,)), state[:, d].reshape(batch)

    def call_and_ladj(self, z, context=None):
        return self._solve(z, self.T, 0.0, context)

    def inverse_and_ladj(self, x, context=None):
        return self._solve(x, 0.0, self.T, context)

    # -- diagnostics and regularisation --------------------------------------------------------
    @property
    def nfe_forward(self):
        """Potential-gradient evaluations of the last solve (4 per RK4 step)."""
        return self._nfe

    @property
    def nfe_backward(self):
        return self._nfe

    def regularization_terms(self):
        """``{'transport': L, 'hjb': R}`` of the last training solve (or ``None``)."""
        return self._terms

    def regularization(self):
        """``transport_weight * L + hjb_weight * R`` of the last training solve (0 if none)."""
        terms = self._terms
        if terms is None:
            return torch.zeros(())
        return self.transport_weight * terms["transport"] + self.hjb_weight * terms["hjb"]

    def clear_cache(self):
        super().clear_cache()
        self._terms = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_terms"] = None
        return state
