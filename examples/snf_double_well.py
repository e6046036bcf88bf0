"""Stochastic Normalizing Flows on the paper's 2-D double well, and as a Pyro SVI guide.

1. A RealNVP and the same RealNVP with adaptive Metropolis blocks between its couplings
   (energies on the ladder from the prior to the target) are trained by maximum likelihood,
   then by 0.5 ML + 0.5 reverse KL (Wu, Köhler, Noé 2020); the free-energy profile along x1
   is reweighted with the flows' importance weights and compared with the exact one.
2. A bimodal Pyro model (``pyro.factor``) is fitted with ``pyro.infer.SVI`` and an
   :class:`~pyro_flows_ext.stochastic.AutoSNFGuide` whose last layer runs Metropolis on the
   model's own potential, and with the same guide without it.

    PYTHONPATH=. python examples/snf_double_well.py [--iters 600] [--out snf_double_well.png]
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from matplotlib.figure import Figure
from pyro.infer.autoguide.initialization import init_to_value

from pyro_flows_ext import Flow
from pyro_flows_ext.stochastic import (
    AutoSNFGuide,
    MetropolisLayer,
    fit_snf,
    importance_weights,
    ladder,
)
from pyro_flows_ext.stochastic.train import default_snf_layers
from pyro_flows_ext.transforms import AffineCoupling


def double_well(x):
    d = x[..., 0]
    return d ** 4 - 6 * d ** 2 - 0.5 * d + 0.5 * x[..., 1] ** 2


def exact_samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-4, 4, 100_001, dtype=torch.float64)
    p = (-(grid ** 4 - 6 * grid ** 2 - 0.5 * grid)).exp()
    cdf = p.cumsum(0) / p.sum()
    x1 = grid[torch.searchsorted(cdf, torch.rand(n, generator=g, dtype=torch.float64))]
    return torch.stack([x1.float(), torch.randn(n, generator=g)], -1)


def make_flow(mcmc):
    masks = [torch.tensor([True, False]), torch.tensor([False, True])]
    layers = []
    for i, energy in enumerate(ladder(double_well, 3)):
        layers.append(AffineCoupling(2, hidden_dims=(64, 64), mask=masks[i % 2]))
        if mcmc:
            layers.append(MetropolisLayer(energy, steps=20, step_size=0.05))  # adapted
    return Flow(None, layers)


def profile(flow, n=100_000, bins=60):
    iw = importance_weights(flow, energy=double_well, num_samples=n, batch_size=50_000)
    hist = torch.histogram(iw.samples[:, 0].double(), bins=bins, range=(-2.5, 2.5),
                           weight=iw.weights.double())
    centres = 0.5 * (hist.bin_edges[1:] + hist.bin_edges[:-1])
    width = hist.bin_edges[1] - hist.bin_edges[0]
    return centres, -(hist.hist / width).log(), iw


MODE = 1.5


def bimodal_model():
    x = pyro.sample("x", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    comps = torch.stack([dist.Normal(torch.tensor([MODE, 0.0]), 0.5).log_prob(x).sum(-1),
                         dist.Normal(torch.tensor([-MODE, 0.0]), 0.5).log_prob(x).sum(-1)])
    pyro.factor("mixture", torch.logsumexp(comps, 0))


def svi_samples(mcmc_steps, steps):
    pyro.clear_param_store()

    def layers(dim, potential, init):
        mcmc = ([MetropolisLayer(potential, steps=mcmc_steps, step_size=1.5, adapt=False)]
                if mcmc_steps else [])
        return default_snf_layers(dim, potential, init, 0.1, mcmc=mcmc)

    guide = AutoSNFGuide(bimodal_model, layers=layers,
                         init_loc_fn=init_to_value(values={"x": torch.tensor([MODE, 0.0])}))
    svi = pyro.infer.SVI(bimodal_model, guide, pyro.optim.Adam({"lr": 1e-2}),
                         pyro.infer.Trace_ELBO(num_particles=32, vectorize_particles=True,
                                               max_plate_nesting=0))
    for _ in range(steps):
        svi.step()
    return guide.sample_unconstrained(num_samples=3000)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--svi-steps", type=int, default=150)
    p.add_argument("--out", default="snf_double_well.png")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = exact_samples(50_000)
    grid = torch.linspace(-2.5, 2.5, 400, dtype=torch.float64)
    exact = grid ** 4 - 6 * grid ** 2 - 0.5 * grid
    norm = torch.logsumexp(-exact, 0) + (grid[1] - grid[0]).log()

    fig = Figure(figsize=(13, 4))
    ax_f, ax_x, ax_svi = fig.subplots(1, 3)
    ax_f.plot(grid, exact + norm, "k-", label="exact")
    half = args.iters // 2
    for name, mcmc in (("RealNVP", False), ("RealNVP + adaptive Metropolis", True)):
        flow = make_flow(mcmc)
        fit_snf(flow, energy=double_well, data=data, num_steps=args.iters, batch_size=128,
                lr=5e-3, schedule=lambda s: (1.0, 0.0) if s < half else (0.5, 0.5))
        centres, f, iw = profile(flow)
        ax_f.plot(centres, f, ".", label=f"{name} (ESS {100 * iw.ess_fraction:.1f}%)")
        x = iw.samples[:3000]
        ax_x.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, label=name)
        print(f"{name}: ESS fraction {iw.ess_fraction:.3f}")
    ax_f.set(xlabel="x1", ylabel="free energy (kT)", title="Reweighted free energy",
             ylim=(-2, 14))
    ax_f.legend(fontsize=7)
    ax_x.set(xlabel="x1", ylabel="x2", title="Flow samples (before reweighting)")
    ax_x.legend(fontsize=7, markerscale=4)

    for label, steps in (("bijective guide", 0), ("SNF guide (Metropolis)", 20)):
        x = svi_samples(steps, args.svi_steps)
        right = (x[:, 0] > 0).float().mean().item()
        ax_svi.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, label=f"{label}: {right:.2f} right")
    ax_svi.set(xlabel="x1", ylabel="x2", title="SVI on a bimodal Pyro model")
    ax_svi.legend(fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
