"""A ring-shaped posterior in 2-D: a broad Gaussian prior times a likelihood that keeps
:math:`|x|` near ``RADIUS``,

:math:`x \\sim N(0, \\sigma_p^2 I_2)`, :math:`\\log L(x) = -(|x| - r)^2 / (2 s^2)`
(``pyro.factor``), with :math:`\\sigma_p` = ``PRIOR_SCALE``, :math:`r` = ``RADIUS``,
:math:`s` = ``WIDTH``.

The posterior is rotation invariant, so every angle has the same mass: a guide (or NeuTra
chain) that covers half the ring misses half the posterior, which PSIS k-hat cannot see
(it only checks the guide's tails where the guide has mass). Exact log evidence
(:func:`log_evidence`), unnormalised log density (:func:`log_joint`) and exact draws
(:func:`exact_sample`) are here for benchmarks.

Run: ``pyro-flows infer examples/models/ring.py:model --neutra``.
"""

import math

import pyro
import pyro.distributions as dist
import torch

PRIOR_SCALE, RADIUS, WIDTH = 3.0, 2.0, 0.2


def model(prior_scale=PRIOR_SCALE, radius=RADIUS, width=WIDTH):
    x = pyro.sample("x", dist.Normal(0.0, prior_scale).expand([2]).to_event(1))
    # broadcasts over leading (particle) dimensions of x
    pyro.factor("ring", -(x.norm(dim=-1) - radius) ** 2 / (2 * width**2))


def log_joint(x, prior_scale=PRIOR_SCALE, radius=RADIUS, width=WIDTH):
    """:math:`\\log p(x) + \\log L(x)` for ``x`` ``(*batch, 2)`` (the model's log density)."""
    prior = dist.Normal(0.0, prior_scale).log_prob(x).sum(-1)
    return prior - (x.norm(dim=-1) - radius) ** 2 / (2 * width**2)


def _radial(prior_scale, radius, width):
    # exponent of the radial density rho * exp(-(a rho^2 - 2 b rho + c) / 2)
    a = 1 / prior_scale**2 + 1 / width**2
    b = radius / width**2
    c = radius**2 / width**2
    return a, b, c


def log_evidence(prior_scale=PRIOR_SCALE, radius=RADIUS, width=WIDTH):
    r"""The exact :math:`\log \int N(x; 0, \sigma_p^2 I) L(x)\,dx` (closed form): in polar
    coordinates :math:`Z = \sigma_p^{-2} \int_0^\infty \rho\, e^{-(a\rho^2 - 2b\rho + c)/2}
    d\rho` with :math:`a = \sigma_p^{-2} + s^{-2}`, :math:`b = r/s^2`, :math:`c = r^2/s^2`,
    and :math:`\int_0^\infty \rho\, e^{-a(\rho-m)^2/2} d\rho = e^{-am^2/2}/a +
    m\sqrt{2\pi/a}\,\Phi(m\sqrt a)`, :math:`m = b/a`."""
    a, b, c = _radial(prior_scale, radius, width)
    m = b / a
    phi = 0.5 * (1 + math.erf(m * math.sqrt(a) / math.sqrt(2)))
    inner = math.exp(-a * m**2 / 2) / a + m * math.sqrt(2 * math.pi / a) * phi
    return -2 * math.log(prior_scale) - (c - b**2 / a) / 2 + math.log(inner)


def exact_sample(n, prior_scale=PRIOR_SCALE, radius=RADIUS, width=WIDTH, generator=None):
    """``n`` posterior draws ``(n, 2)``: a uniform angle and the radius by inverse CDF on a
    fine grid (20 001 points up to ``radius + 12 width``; the error is far below Monte Carlo
    noise)."""
    a, b, _ = _radial(prior_scale, radius, width)
    rho = torch.linspace(0, radius + 12 * width, 20_001, dtype=torch.float64)
    log_d = rho.clamp_min(1e-300).log() - (a * rho**2 - 2 * b * rho) / 2
    cdf = torch.cumsum(torch.exp(log_d - log_d.max()), 0)
    cdf = cdf / cdf[-1]
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    r = rho[torch.searchsorted(cdf, u).clamp_max(len(rho) - 1)]
    angle = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.stack([r * angle.cos(), r * angle.sin()], -1).float()


def covered_mass(draws, bins=36, threshold=0.1):
    """The fraction of the exact posterior's mass that ``draws`` ``(n, 2)`` (a guide's or a
    chain's) cover: the ring is cut into ``bins`` equal angular sectors (each holds ``1/bins``
    of the exact mass, by symmetry), and a sector counts as covered when it holds at least
    ``threshold`` times its exact share of the draws. 1.0: every direction is visited; 0.5:
    half the ring is missing."""
    draws = torch.as_tensor(draws, dtype=torch.float64)
    angle = torch.atan2(draws[:, 1], draws[:, 0])
    sector = ((angle + math.pi) / (2 * math.pi) * bins).long().clamp(0, bins - 1)
    share = torch.bincount(sector, minlength=bins).double() / len(draws)
    return float((share >= threshold / bins).double().mean())
