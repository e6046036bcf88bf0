"""Exact log-densities of the toy data sets, written from their generative definitions in
``pfe.datasets`` (independently of any flow), and the floor an honest test NLL respects.

A density model cannot beat the data's own density on held-out points: the mean over test
points of ``log p(x) - log q(x)`` estimates ``KL(p || q) >= 0``. A log-det sign error or a
density that does not normalise makes a flow look *better* than the truth, which a one-sided
"NLL below a threshold" test passes; :func:`assert_nll_not_below_entropy` catches it.

The moons' entropy from :func:`moons_log_prob` is 1.676 +- 0.002 nats (200,000 draws); its
angle quadrature agrees with ``scipy.integrate.quad`` to 1e-14 and the density integrates to
1 - 4e-14 on a grid.
"""

import math

import torch


def moons_log_prob(x, nodes=4000):
    """Moons (FFJORD's scale): with probability 1/2 each, the upper arc ``(cos t, sin t)`` or
    the lower arc ``(1 - cos t, 0.5 - sin t)``, ``t ~ U(0, pi)``, plus N(0, 0.05^2 I) noise,
    all scaled by 2 and shifted by ``(-1, -0.2)``: arcs of radius 2 and noise std 0.1. The
    integral over ``t`` is a midpoint rule on ``nodes`` points per arc (spacing 8e-4 rad, far
    finer than the noise's angular width 0.05 rad)."""
    x = x.double()
    t = (torch.arange(nodes, dtype=torch.float64) + 0.5) * math.pi / nodes
    upper = torch.stack([torch.cos(t), torch.sin(t)], -1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], -1)
    centres = torch.cat([upper, lower]) * 2 + torch.tensor([-1.0, -0.2], dtype=torch.float64)
    var = 0.1 ** 2
    out = [torch.logsumexp(-torch.cdist(part, centres).square() / (2 * var), -1)
           for part in x.reshape(-1, 2).split(2000)]
    log_p = torch.cat(out) - math.log(len(centres)) - math.log(2 * math.pi * var)
    return log_p.reshape(x.shape[:-1])


def eight_gaussians_log_prob(x):
    """8gaussians: an equal mixture of N(c_k, 0.5^2 I), ``c_k`` at radius 4 and angles
    ``k pi / 4``, all divided by sqrt(2)."""
    x = x.double()
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centres = 4 * torch.stack([torch.cos(angles), torch.sin(angles)], -1) / math.sqrt(2)
    var = 0.5 ** 2 / 2
    sq = (x.unsqueeze(-2) - centres).square().sum(-1)
    return torch.logsumexp(-sq / (2 * var), -1) - math.log(8) - math.log(2 * math.pi * var)


def checkerboard_log_prob(x):
    """Checkerboard: uniform on 8 squares of side 2 (area 32): ``-log 32`` on them."""
    x = x.double()
    cells = torch.floor(x / 2) + 2
    inside = ((cells >= 0) & (cells < 4)).all(-1) & ((cells.sum(-1) % 2) == 0)
    return torch.where(inside, -math.log(32.0), -math.inf)


TRUE_LOG_PROB = {"moons": moons_log_prob, "8gaussians": eight_gaussians_log_prob,
                 "checkerboard": checkerboard_log_prob}


def assert_nll_not_below_entropy(flow, x, true_log_prob):
    """Asserts the flow's held-out NLL on ``x`` (samples of the true density) is no better
    than the truth's: ``mean(log p - log q) > -3`` standard errors of that mean (paired on
    the same points, so the test set's own entropy noise cancels). Returns the flow's NLL."""
    was_training = flow.training
    flow.eval()
    try:
        with torch.no_grad():
            log_q = torch.cat([flow.log_prob(part) for part in x.split(10_000)]).double()
    finally:
        flow.train(was_training)
    diff = true_log_prob(x) - log_q
    kl, se = diff.mean().item(), diff.std().item() / math.sqrt(len(diff))
    assert kl > -3 * se, (
        f"test NLL {-log_q.mean().item():.4f} beats the data's own density "
        f"({-true_log_prob(x).mean().item():.4f}) by {-kl:.4f} > 3 s.e. ({3 * se:.4f}): the "
        "flow's log_prob cannot be a normalised density (log-det sign, missing term?)")
    return -log_q.mean().item()
