r"""Data-parallel SVI with ``torchrun``: Bayesian logistic regression on N rows, a flow guide,
and each process scoring its share of every global subsample.

Run (one node, 2 processes, 1 thread each)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/distributed_svi.py

or as one plain process: ``python examples/distributed_svi.py`` (the same steps, to float
rounding). The model takes the indices its plate scores (``pyro.plate("data", N,
subsample=idx)``), so Pyro scales that rank's likelihood by :math:`N / B_r`;
``DistributedSVI`` weights each rank's ELBO by :math:`B_r / B` and all-reduces the gradient
of Pyro's param-store parameters, which makes the sum the one-process ELBO on the global
subsample of size :math:`B`.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as dist_

from pyro_flows_ext import distributed as D
from pyro_flows_ext.infer import AutoFlowGuide


def make_data(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    y = torch.bernoulli(torch.sigmoid(x @ w), generator=g)
    return x, y, w


def model(x, y, idx):
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(x), subsample=idx):
        pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w + b), obs=y[idx])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--subsample", type=int, default=512, help="global subsample size")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    started = D.init_from_env()
    try:
        pyro.set_rng_seed(0)  # DistributedSVI gives every rank rank 0's RNG state anyway
        x, y, w_true = make_data(args.rows, args.features)
        guide = AutoFlowGuide(model, flow="maf", stl=False)
        svi = D.DistributedSVI(model, guide, pyro.optim.ClippedAdam({"lr": args.lr}),
                               pyro.infer.Trace_ELBO(), seed=0)
        for step in range(args.steps):
            loss = svi.step(x, y, svi.subsample(args.rows, args.subsample))
            if D.is_main_process() and step % max(1, args.steps // 10) == 0:
                print(f"step {step:5d}  loss {loss:12.3f}")
        if D.is_main_process():
            with torch.no_grad():
                draws = torch.stack([guide()["w"] for _ in range(500)])
            err = (draws.mean(0) - w_true).abs().max().item()
            print(f"{D.get_world_size()} process(es): posterior mean of w within {err:.3f} of "
                  "the true weights (max abs)")
    finally:
        if started:
            dist_.destroy_process_group()


if __name__ == "__main__":
    main()
