"""Neal's funnel in 10 dimensions:
:math:`v \\sim N(0, 3^2)`, :math:`x_i \\mid v \\sim N(0, e^{v})`,
``i = 1..9``. The exact marginal of ``v`` is N(0, 3); the neck (v << 0) defeats plain HMC.

Run: ``pyro-flows infer examples/models/funnel.py:model --steps 2000``.
"""

import pyro
import pyro.distributions as dist
import torch

DIM = 10


def model(dim=DIM):
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    # scale broadcasts over any leading (particle) dimensions of v
    scale = torch.exp(v / 2).unsqueeze(-1).expand(v.shape + (dim - 1,))
    pyro.sample("x", dist.Normal(0.0, scale).to_event(1))


def exact_sample(n, dim=DIM, generator=None):
    """``n`` exact draws: ``v`` ``(n,)`` and ``x`` ``(n, dim - 1)``."""
    v = 3.0 * torch.randn(n, generator=generator)
    x = torch.exp(v / 2).unsqueeze(-1) * torch.randn(n, dim - 1, generator=generator)
    return {"v": v, "x": x}
