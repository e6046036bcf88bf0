"""A two-mode posterior in 2-D: a broad Gaussian prior times a two-component Gaussian
mixture likelihood,

:math:`x \\sim N(0, \\sigma_p^2 I_2)`,
:math:`L(x) = \\sum_k w_k N(x; m_k, s^2 I_2)` (``pyro.factor``),

with modes ``MEANS`` (8 widths apart), weights ``WEIGHTS`` and width ``WIDTH``. The posterior
is the mixture :math:`\\sum_k \\pi_k N(\\lambda m_k, \\lambda s^2 I)`,
:math:`\\lambda = \\sigma_p^2 / (\\sigma_p^2 + s^2)`,
:math:`\\pi_k \\propto w_k N(m_k; 0, (\\sigma_p^2 + s^2) I)`; a mode-seeking guide (the
standard ELBO) tends to settle on one mode and miss the other's mass
(:func:`posterior_weights`). Exact log evidence, log density and draws are here for
benchmarks.

Run: ``pyro-flows infer examples/models/two_modes.py:model --neutra``.
"""

import math

import pyro
import pyro.distributions as dist
import torch

PRIOR_SCALE, WIDTH = 3.0, 0.5
MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
WEIGHTS = torch.tensor([0.6, 0.4])


def _log_likelihood(x, means, weights, width):
    comp = dist.Normal(means, width).log_prob(x.unsqueeze(-2)).sum(-1)  # (*batch, K)
    return torch.logsumexp(comp + weights.log(), -1)


def model(prior_scale=PRIOR_SCALE, width=WIDTH):
    x = pyro.sample("x", dist.Normal(0.0, prior_scale).expand([2]).to_event(1))
    # broadcasts over leading (particle) dimensions of x
    pyro.factor("mixture", _log_likelihood(x, MEANS.to(x), WEIGHTS.to(x), width))


def log_joint(x, prior_scale=PRIOR_SCALE, width=WIDTH):
    """:math:`\\log p(x) + \\log L(x)` for ``x`` ``(*batch, 2)`` (the model's log density)."""
    prior = dist.Normal(0.0, prior_scale).log_prob(x).sum(-1)
    return prior + _log_likelihood(x, MEANS.to(x), WEIGHTS.to(x), width)


def _components(prior_scale, width):
    total = prior_scale**2 + width**2
    log_pi = WEIGHTS.log() + dist.Normal(0.0, math.sqrt(total)).log_prob(MEANS).sum(-1)
    lam = prior_scale**2 / total
    return log_pi, lam * MEANS, math.sqrt(lam) * width


def log_evidence(prior_scale=PRIOR_SCALE, width=WIDTH):
    """The exact :math:`\\log \\sum_k w_k N(m_k; 0, (\\sigma_p^2 + s^2) I)`."""
    log_pi, _, _ = _components(prior_scale, width)
    return float(torch.logsumexp(log_pi, 0))


def posterior_weights(prior_scale=PRIOR_SCALE, width=WIDTH):
    """The exact posterior mass of each mode ``(K,)``."""
    log_pi, _, _ = _components(prior_scale, width)
    return torch.softmax(log_pi, 0)


def posterior_components(prior_scale=PRIOR_SCALE, width=WIDTH):
    """``(weights (K,), means (K, 2), sd)`` of the exact Gaussian-mixture posterior."""
    return posterior_weights(prior_scale, width), *_components(prior_scale, width)[1:]


def exact_sample(n, prior_scale=PRIOR_SCALE, width=WIDTH, generator=None):
    """``n`` exact posterior draws ``(n, 2)``."""
    weights, means, sd = posterior_components(prior_scale, width)
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    return means[k] + sd * torch.randn(n, 2, generator=generator)


def covered_mass(draws, threshold=0.1):
    """The fraction of the exact posterior's mass that ``draws`` ``(n, 2)`` (a guide's or a
    chain's) cover: each draw goes to its nearest posterior mode, and a mode's exact mass
    counts as covered when it receives at least ``threshold`` times that share of the draws.
    About 0.6 means only the heavier mode was found."""
    draws = torch.as_tensor(draws, dtype=torch.float32)
    weights, means, _ = posterior_components()
    nearest = torch.cdist(draws, means.to(draws)).argmin(-1)
    share = torch.bincount(nearest, minlength=len(means)).double() / len(draws)
    return float(weights.double()[share >= threshold * weights.double()].sum())
