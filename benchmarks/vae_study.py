"""The digits VAE (``examples/vae_digits.py``): a conditional-flow encoder against the
Gaussian encoder, the same decoder and epochs, over seeds.

Reported per encoder (nats per test image, higher is better): the test ELBO (20 guide draws)
and the importance-weighted log-likelihood :math:`\\log \\frac1K \\sum_k p(x, z_k)/q(z_k|x)`
(``K`` draws from the encoder), whose difference bounds the gap that a better encoder can
close: :math:`\\log p(x) - \\mathrm{ELBO} = \\mathrm{KL}(q \\| p(z|x))`, estimated from above
by IW - ELBO (IW is itself a lower bound on log p(x)). If that gap is small for the Gaussian
encoder, no encoder family can raise the ELBO much: the decoder sets the likelihood.

    PYTHONPATH=. python benchmarks/vae_study.py [--epochs 30,100] [--seeds 3] [--iw 200]
"""

import argparse
import math
import os
import statistics
import sys

import pyro
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
torch.set_num_threads(1)

from vae_digits import VAE, load_digits, test_elbo  # noqa: E402


@torch.no_grad()
def iw_log_likelihood(vae, x, k):
    """Mean over images of :math:`\\log \\frac1K \\sum_k p(x, z_k) / q(z_k | x)`."""
    q = vae.posterior(x)
    z = q.sample((k,))  # (K, N, latent)
    log_q = q.log_prob(z)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_lik = torch.distributions.Bernoulli(logits=vae.decoder(z)).log_prob(x).sum(-1)
    w = log_lik + log_prior - log_q
    return (torch.logsumexp(w, 0) - math.log(k)).mean().item()


def fit(kind, train_x, epochs, seed, latent_dim):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(latent_dim=latent_dim, flow_layers=4 if kind == "flow" else 0)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 2e-3}),
                         pyro.infer.Trace_ELBO())
    for _ in range(epochs):
        for batch in train_x[torch.randperm(len(train_x))].split(100):
            svi.step(batch)
    return vae


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", default="30,100")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--iw", type=int, default=200)
    p.add_argument("--latent-dim", type=int, default=4)
    a = p.parse_args(argv)
    print(f"latent dim {a.latent_dim}; K = {a.iw}; one thread; median (range) over "
          f"{a.seeds} seeds")
    print("| epochs | encoder | test ELBO | IW log-likelihood | IW - ELBO |")
    print("|---|---|---|---|---|")
    for epochs in map(int, a.epochs.split(",")):
        for kind in ("gaussian", "flow"):
            rows = []
            for seed in range(a.seeds):
                train_x, test_x = load_digits(seed)
                vae = fit(kind, train_x, epochs, seed, a.latent_dim)
                elbo = test_elbo(vae, test_x)
                iw = iw_log_likelihood(vae, test_x, a.iw)
                rows.append((elbo, iw, iw - elbo))

            def cell(i, rows=rows):
                v = [r[i] for r in rows]
                return f"{statistics.median(v):.2f} ({min(v):.2f} to {max(v):.2f})"

            print(f"| {epochs} | {kind} | {cell(0)} | {cell(1)} | {cell(2)} |", flush=True)


if __name__ == "__main__":
    main()
