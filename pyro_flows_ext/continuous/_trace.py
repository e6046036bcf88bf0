r"""Divergence (trace of the Jacobian) of a vector field, exact or by Hutchinson's estimator.

Each function takes ``f`` mapping a batch of states ``(N, D)`` (and per-row contexts
``(N, C)`` or ``None``) to velocities ``(N, D)``, and returns the velocity with
:math:`\operatorname{tr} \partial f/\partial y` per row, plus :math:`\|\partial f/\partial
y\|_F^2` (exact) or its one-sample estimate :math:`\|\epsilon^\top \partial f/\partial y\|^2`
(Hutchinson) when ``frobenius=True`` (RNODE's Jacobian penalty). Both are differentiable
(with respect to ``y`` and to anything ``f`` closes over) when gradients are enabled.
"""

import torch
from torch.func import jacrev, vmap

__all__ = ["draw_noise", "exact_divergence", "hutchinson_divergence"]


def draw_noise(like, noise="rademacher"):
    r"""Hutchinson probe :math:`\epsilon` with :math:`E[\epsilon\epsilon^\top] = I`:
    ``'rademacher'`` (:math:`\pm 1`, the lower-variance choice) or ``'gaussian'``."""
    if noise == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    if noise == "gaussian":
        return torch.randn_like(like)
    raise ValueError(f"unknown noise {noise!r}; expected 'rademacher' or 'gaussian'")


def exact_divergence(f, y, context=None, frobenius=False, method="auto"):
    r"""``(f(y), tr J, |J|_F^2 or None)`` with the full Jacobian :math:`J` of each row, by
    :math:`D` vector-Jacobian products: ``method='vjp'`` runs them as :math:`D` backward
    passes through one forward pass (fastest for small :math:`D`: 2-3x ``jacrev`` at
    :math:`D = 2`), ``'jacrev'`` as ``torch.func.jacrev`` vectorised by ``vmap`` over the
    rows; ``'auto'`` takes ``'vjp'`` up to :math:`D = 8`. For small :math:`D` only."""
    if method == "auto":
        method = "vjp" if y.shape[-1] <= 8 else "jacrev"
    if method == "vjp":
        return _vjp_divergence(f, y, context, frobenius)
    if method != "jacrev":
        raise ValueError(f"unknown method {method!r}; expected 'auto', 'vjp' or 'jacrev'")

    def row(y_row, c_row):
        out = f(y_row[None], None if c_row is None else c_row[None])[0]
        return out, out

    if context is None:
        jac, dy = vmap(jacrev(lambda r: row(r, None), has_aux=True))(y)
    else:
        jac, dy = vmap(jacrev(row, has_aux=True))(y, context)
    trace = jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    frob = jac.square().sum((-2, -1)) if frobenius else None
    return dy, trace, frob


def _vjp_divergence(f, y, context, frobenius):
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        if not (create_graph and y.requires_grad):
            y = y.detach().requires_grad_()
        dy = f(y, context)
        trace, frob = 0.0, 0.0
        d = y.shape[-1]
        for i in range(d):
            e = torch.zeros_like(dy)
            e[:, i] = 1.0
            (row,) = torch.autograd.grad(dy, y, e, create_graph=create_graph,
                                         retain_graph=create_graph or i < d - 1)
            trace = trace + row[:, i]
            if frobenius:
                frob = frob + row.square().sum(-1)
    if not create_graph:
        dy, trace = dy.detach(), trace.detach()
        frob = frob.detach() if frobenius else frob
    return dy, trace, (frob if frobenius else None)


def hutchinson_divergence(f, y, eps, context=None, frobenius=False):
    r"""``(f(y), eps^T J eps, |eps^T J|^2 or None)``: one vector-Jacobian product; unbiased
    for :math:`\operatorname{tr} J` and :math:`\|J\|_F^2`. ``eps`` must be drawn once per
    solve, not per evaluation: fresh noise at every evaluation makes the integrand rough and
    the adaptive solver's step count explode."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        if not (create_graph and y.requires_grad):  # a leaf of its own for this product
            y = y.detach().requires_grad_()
        dy = f(y, context)
        (e_j,) = torch.autograd.grad(dy, y, eps, create_graph=create_graph)
    if not create_graph:
        dy = dy.detach()
    trace = (e_j * eps).sum(-1)
    frob = e_j.square().sum(-1) if frobenius else None
    return dy, trace, frob
