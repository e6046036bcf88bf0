"""FFJORD on moons three ways: maximum likelihood with RNODE, flow matching, and OT-Flow.

    OMP_NUM_THREADS=1 python examples/cnf_moons.py --steps 300
"""

import argparse

import pyro.optim
import torch

import pyro_flows_ext as pfe
from pyro_flows_ext.continuous import regularization
from pyro_flows_ext.infer.density import mean_nll


def maximum_likelihood(flow, data, steps, lr):
    """A plain loop: fit_density does not add the regularisers, so add them here."""
    pfe.transforms.preprocess.initialize_from_data(flow, data)  # the Gaussian start
    opt = torch.optim.Adam(flow.parameters(), lr)
    flow.train()
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (256,))]
        loss = -flow.log_prob(x).mean() + regularization(flow)
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = pfe.datasets.toy("moons", 10000, 0), pfe.datasets.toy("moons", 1000, 1)

    rnode = pfe.flows.ffjord(2, kinetic_weight=0.01, jacobian_weight=0.01)
    maximum_likelihood(rnode, train, args.steps, 5e-3)
    fm = pfe.flows.ffjord(2)
    pfe.infer.fit_flow_matching(fm, train, num_steps=args.steps, progress=False,
                                optim=pyro.optim.Adam({"lr": 5e-3}))
    ot = pfe.flows.ot_flow(2)
    maximum_likelihood(ot, train, args.steps, 5e-3)
    for name, flow in (("FFJORD + RNODE", rnode), ("flow matching", fm), ("OT-Flow", ot)):
        nll = mean_nll(flow, test)
        print(f"{name:<16} test NLL {nll:.3f} nats (moons floor 1.68), "
              f"{flow.transforms[0].nfe_forward} evaluations per solve")


if __name__ == "__main__":
    main()
