"""Surjections as density models: data with a symmetry, an augmented flow, sets.

1. Four tilted Gaussians mirrored across both axes: ``pfe.flows.nsf`` against
   ``pfe.flows.abs_flow`` (the same couplings, then ``HalfNormalMap`` and ``Abs``: the flow
   models the folded quadrant once and a learned sign model puts it in every quadrant).
2. The same data with an augmented realnvp (``Augment(2, 2)`` at the data end): its
   ``log_prob`` is a stochastic lower bound, and ``pfe.infer.iw_log_prob`` tightens it.
3. Sets of 5 iid points from a 1-D mixture: couplings, ``Ordered`` (onto sorted vectors) and
   ``Sort`` (an exchangeable density) against a plain ``nsf`` on the unordered vectors.

Prints test NLLs (nats) and writes density PNGs next to ``--out``. The comparison with
matched parameter counts and timings is ``benchmarks/surjections.py``.

    PYTHONPATH=. python examples/surjections_symmetric.py --steps 800
"""

import argparse
import math
import os

import pyro
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.surjections import Augment, Ordered, Sort
from pyro_flows_ext.transforms import CholeskyAffine


def mirrored(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([1.5, 0.8]) + torch.randn(n, 2, generator=g) @ torch.tensor(
        [[0.45, 0.0], [0.25, 0.2]]).T
    return x * torch.where(torch.rand(n, 2, generator=g) < 0.5, 1.0, -1.0)


def mixture_sets(n, seed, size=5):
    g = torch.Generator().manual_seed(seed)
    comp = (torch.rand(n, size, generator=g) < 0.6).long()
    return torch.tensor([-2.0, 1.5])[comp] + torch.tensor([0.3, 0.5])[comp] * torch.randn(
        n, size, generator=g)


def fit(flow, train, steps):
    pfe.infer.fit_density(flow, train, num_steps=steps, progress=False, num_threads=1,
                          optim=pyro.optim.Adam({"lr": 2e-3}))
    return flow


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", default="runs/surjections")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    train, test = mirrored(20_000, 0), mirrored(5_000, 1)
    models = {"nsf": pfe.flows.nsf(2, num_layers=4, hidden_dims=(64, 64)),
              "abs_flow": pfe.flows.abs_flow(2, num_layers=4, hidden_dims=(64, 64))}
    inner = pfe.flows.realnvp(4, num_layers=6, hidden_dims=(64, 64), gaussian_start=False)
    models["realnvp+augment"] = pfe.Flow(None, list(inner.transforms)
                                         + [Augment(2, 2), CholeskyAffine(2)])
    from pyro_flows_ext.plots import plot_density

    for name, flow in models.items():
        fit(flow, train, args.steps)
        with torch.no_grad():
            line = f"mirrored  {name:16s} test NLL {-flow.log_prob(test).mean().item():.3f}"
            if not flow.is_exact:
                iw = {k: -pfe.infer.iw_log_prob(flow, test, num_samples=k).mean().item()
                      for k in (1, 10, 100)}
                line += " (upper bound); IW bound " + ", ".join(
                    f"K={k}: {v:.3f}" for k, v in iw.items())
        print(line)
        if flow.is_exact:
            plot_density(flow, os.path.join(args.out, f"mirrored_{name}.png"),
                         bounds=(-3.5, 3.5), title=name)

    sets_train, sets_test = mixture_sets(20_000, 0), mixture_sets(5_000, 1)
    d = sets_train.shape[1]
    plain = pfe.flows.nsf(d, num_layers=4, hidden_dims=(64, 64), gaussian_start=False)
    base_side = pfe.flows.nsf(d, num_layers=4, hidden_dims=(64, 64), gaussian_start=False)
    sort = pfe.Flow(None, list(base_side.transforms) + [Ordered(d), Sort(d)])
    for name, flow in {"nsf": plain, "nsf+sort": sort}.items():
        fit(flow, sets_train, args.steps)
        with torch.no_grad():
            nll = -flow.log_prob(sets_test).mean().item() / d
        print(f"sets      {name:16s} test NLL per point {nll:.3f}")
    # the per-point entropy of the mixture, for reference
    comps = torch.distributions.Normal(torch.tensor([-2.0, 1.5]), torch.tensor([0.3, 0.5]))
    x = mixture_sets(100_000, 2).flatten()
    lp = torch.logsumexp(comps.log_prob(x[:, None]) + torch.tensor([0.4, 0.6]).log(), -1)
    print(f"sets      true entropy per point {-lp.mean().item():.3f} "
          f"(+- {lp.std().item() / math.sqrt(len(x)):.3f})")


if __name__ == "__main__":
    main()
