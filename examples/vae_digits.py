"""Amortized inference with a conditional flow: a VAE on scikit-learn's digits (8x8).

Two encoders, the same decoder and the same training budget:

* ``gaussian``: :math:`q(z \\mid x) = N(\\mu(x), \\sigma(x)^2)` (the usual VAE);
* ``flow``: the same Gaussian pushed through conditional affine couplings whose conditioner
  also sees features of :math:`x` (the tutorial's "VAEs with flows in the middle, like IAF"):
  :math:`z = f_K \\circ \\dots \\circ f_1(\\mu(x) + \\sigma(x)\\,\\epsilon;\\ h(x))`.

Pixels are binarised (value > 8 of 16) and modelled as Bernoulli. Prints the test ELBO
(nats per image, higher is better) of each, from 20 guide draws per test image.

    PYTHONPATH=. python examples/vae_digits.py --epochs 30
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import pyro_flows_ext as pfe


def load_digits(seed=0):
    from sklearn.datasets import load_digits as sk_load  # only this example needs sklearn

    x = torch.tensor(sk_load().data, dtype=torch.float32)
    x = (x > 8).float()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:1500]], x[perm[1500:]]


class VAE(nn.Module):
    def __init__(self, latent_dim=4, hidden=128, flow_layers=0, pixels=64):
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, pixels))
        self.features = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(),
                                      nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 2 * latent_dim)
        context = 16
        self.context = nn.Linear(hidden, context)
        self.layers = nn.ModuleList(
            pfe.transforms.AffineCoupling(latent_dim, context_dim=context, hidden_dims=(64,),
                                          mask=(torch.arange(latent_dim) % 2 == i % 2))
            for i in range(flow_layers))

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def posterior(self, x):
        """``q(z | x)``: batch ``(N,)``, event ``(latent_dim,)``."""
        h = self.features(x)
        loc, raw = self.head(h).chunk(2, -1)
        base = dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1)
        if not len(self.layers):
            return base
        c = self.context(h)
        return pfe.Flow(base, [layer.condition(c) for layer in self.layers])

    def guide(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", len(x)):
            pyro.sample("z", self.posterior(x))


@torch.no_grad()
def test_elbo(vae, x, draws=20):
    """Mean ELBO per image, averaged over ``draws`` guide draws."""
    total = 0.0
    for _ in range(draws):
        total += -Trace_ELBO().loss(vae.model, vae.guide, x)
    return total / draws / len(x)


def train(kind, train_x, test_x, epochs, batch_size=100, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(flow_layers=4 if kind == "flow" else 0)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 2e-3}), Trace_ELBO())
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in train_x[torch.randperm(len(train_x))].split(batch_size):
            svi.step(batch)
    return test_elbo(vae, test_x), time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    train_x, test_x = load_digits(a.seed)
    print(f"digits: {len(train_x)} train, {len(test_x)} test images; {a.epochs} epochs")
    for kind in ("gaussian", "flow"):
        elbo, seconds = train(kind, train_x, test_x, a.epochs, seed=a.seed)
        print(f"{kind:>8} encoder: test ELBO {elbo:.2f} nats/image ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
