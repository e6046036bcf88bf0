"""Bayesian logistic regression on scikit-learn's breast cancer set (569 x 30, standardised).

:math:`w \\sim N(0, I)`, :math:`b \\sim N(0, 5^2)`,
:math:`y_n \\sim \\mathrm{Bernoulli}(\\sigma(x_n^\\top w + b))`.

Run: ``pyro-flows infer examples/models/logistic.py:model --steps 2000``.
"""

import functools

import pyro
import pyro.distributions as dist
import torch


@functools.lru_cache(maxsize=1)
def load_data():
    """``(x, y)``: standardised features ``(569, 30)`` and labels ``(569,)`` (float32)."""
    from sklearn.datasets import load_breast_cancer  # only this example needs scikit-learn

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.tensor(data.target, dtype=torch.float32)


def model(x=None, y=None, subsample_size=None):
    if x is None:
        x, y = load_data()
    d = x.shape[-1]
    w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 5.0))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        # w: (*particles, 1, d) and b: (*particles, 1) under an outer particle plate
        logits = (x[idx] * w).sum(-1) + b
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[idx])
