r"""Pure tensor maths of the MCMC layers: :math:`\log\pi`, :math:`\nabla\log\pi`, clipping, and
one vectorised step of each kernel.

Every function treats the leading dimensions of ``x`` (``(*batch, D)``) as independent chains:
the energy is evaluated on the whole batch at once, each entry draws its own noise and makes
its own accept decision, and nothing is pooled across entries.
"""

import torch

__all__ = ["log_pi", "log_pi_and_grad", "clip_rows", "metropolis_step", "mala_step",
           "hmc_step"]


def _finite_or(t, value):
    return torch.where(torch.isfinite(t), t, torch.full_like(t, value))


def log_pi(energy, x):
    r""":math:`\log\pi(x) = -U(x)` per chain, shape ``batch``; NaN (an energy outside its
    domain) becomes :math:`-\infty`, so a proposal there is always rejected."""
    lp = -energy(x)
    if lp.shape != x.shape[:-1]:
        raise ValueError(f"the energy must map (..., D) to (...): got shape {tuple(lp.shape)} "
                         f"for an input of shape {tuple(x.shape)}")
    return torch.nan_to_num(lp, nan=-torch.inf)


def clip_rows(g, max_norm):
    """Rescales each row (last dimension) of ``g`` to Euclidean norm at most ``max_norm``.

    A deterministic function of the position, so an MH-corrected kernel using a clipped drift
    is still exact (its proposal density uses the same clipped drift) and leapfrog with a
    clipped force is still volume-preserving and reversible."""
    if max_norm is None:
        return g
    norm = g.norm(dim=-1, keepdim=True)
    return g * (max_norm / norm.clamp_min(max_norm)).detach()


def log_pi_and_grad(energy, x, create_graph, max_norm=None):
    r"""``(log pi(x), grad log pi(x))`` by autograd, both per chain.

    With ``create_graph`` (training: gradients enabled and ``x`` on a graph) the gradient is
    itself differentiable, so the loss reaches the flow's parameters through the drift of
    every proposal (second-order autograd). Otherwise ``x`` is detached and the results carry
    no graph. Non-finite gradient entries become 0; rows are clipped to ``max_norm``."""
    with torch.enable_grad():
        if not (create_graph and x.requires_grad):
            x, create_graph = x.detach().requires_grad_(True), False
        lp = log_pi(energy, x)
        (g,) = torch.autograd.grad(lp.sum(), x, create_graph=create_graph, allow_unused=True)
    if g is None:
        g = torch.zeros_like(x)
    g = clip_rows(_finite_or(g, 0.0), max_norm)
    if not create_graph:
        lp, g = lp.detach(), g.detach()
    return lp, g


def _accept(log_alpha):
    """Each chain's own accept decision ``log u < log alpha`` (NaN: reject)."""
    u = torch.rand_like(log_alpha)
    return u.log() < log_alpha


def _select(accept, new, old):
    """``new`` where the chain accepted, else ``old`` (event dimension broadcast)."""
    if new.dim() > accept.dim():
        accept = accept.unsqueeze(-1)
    return torch.where(accept, new, old)


def metropolis_step(energy, x, lp, step_size):
    r"""One random-walk Metropolis step per chain: :math:`x' = x + s\,\xi`,
    :math:`\xi \sim N(0, I)`, accepted with probability :math:`\min(1, \pi(x')/\pi(x))`.

    Returns ``(x_new, lp_new, accepted)``. ``x'`` is reparameterised (gradients flow through
    it and through :math:`s`); the accept indicator is a step function of the path and
    passes no gradient."""
    prop = x + step_size * torch.randn_like(x)
    lp_prop = log_pi(energy, prop)
    accept = _accept(lp_prop - lp)
    return _select(accept, prop, x), _select(accept, lp_prop, lp), accept


def _log_gauss_kernel(to, frm, drift, step_size):
    r""":math:`\log N(to;\ frm + \epsilon\,g,\ 2\epsilon I)` without the normalising constant
    (it cancels in every ratio used here)."""
    return -((to - frm - step_size * drift).square() / (4 * step_size)).sum(-1)


def mala_step(energy, x, lp, g, step_size, adjusted, create_graph, max_norm):
    r"""One Langevin step per chain: :math:`x' = x + \epsilon\nabla\log\pi(x) +
    \sqrt{2\epsilon}\,\xi`.

    ``adjusted``: MALA's MH correction with the Gaussian forward/backward densities.
    Returns ``(x_new, lp_new, g_new, accepted, log_ratio)`` with ``log_ratio`` the path term
    :math:`\log K(x'|x) - \log K(x|x')` of the move (used by the unadjusted kernel's V)."""
    prop = x + step_size * g + (2 * step_size).sqrt() * torch.randn_like(x)
    lp_prop, g_prop = log_pi_and_grad(energy, prop, create_graph, max_norm)
    log_fwd = _log_gauss_kernel(prop, x, g, step_size)
    log_bwd = _log_gauss_kernel(x, prop, g_prop, step_size)
    log_ratio = log_fwd - log_bwd
    if not adjusted:
        return prop, lp_prop, g_prop, torch.ones_like(lp, dtype=torch.bool), log_ratio
    accept = _accept(lp_prop - lp - log_ratio)
    return (_select(accept, prop, x), _select(accept, lp_prop, lp), _select(accept, g_prop, g),
            accept, log_ratio)


def hmc_step(energy, x, lp, g, step_size, leapfrog_steps, create_graph, max_norm):
    r"""One HMC step per chain: momentum :math:`p \sim N(0, I)` drawn afresh, ``leapfrog_steps``
    leapfrog steps of size :math:`\epsilon`, then accepted with probability
    :math:`\min(1, e^{H(x, p) - H(x', p')})`, :math:`H = -\log\pi(x) + |p|^2/2`.

    Returns ``(x_new, lp_new, g_new, accepted)``."""
    p = torch.randn_like(x)
    h0 = -lp + 0.5 * p.square().sum(-1)
    q, lq, gq = x, lp, g
    p = p + 0.5 * step_size * gq
    for i in range(leapfrog_steps):
        q = q + step_size * p
        lq, gq = log_pi_and_grad(energy, q, create_graph, max_norm)
        p = p + (step_size if i < leapfrog_steps - 1 else 0.5 * step_size) * gq
    h1 = -lq + 0.5 * p.square().sum(-1)
    accept = _accept(h0 - h1)
    return _select(accept, q, x), _select(accept, lq, lp), _select(accept, gq, g), accept
