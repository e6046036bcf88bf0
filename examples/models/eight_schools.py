"""Eight schools, centered parameterisation (Rubin 1981; Gelman et al., BDA 5.5).

:math:`\\mu \\sim N(0, 5^2)`, :math:`\\tau \\sim \\mathrm{HalfCauchy}(5)`,
:math:`\\theta_j \\sim N(\\mu, \\tau^2)`, :math:`y_j \\sim N(\\theta_j, \\sigma_j^2)`. The
funnel between ``tau`` and ``theta`` gives plain NUTS divergences.

Run: ``pyro-flows infer examples/models/eight_schools.py:model --steps 2000 --neutra``.
"""

import pyro
import pyro.distributions as dist
import torch

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def model(y=Y, sigma=SIGMA):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def model_noncentered(y=Y, sigma=SIGMA):
    """The non-centered form: :math:`\\theta_j = \\mu + \\tau \\eta_j`,
    :math:`\\eta_j \\sim N(0, 1)`."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)
