"""Test NLL against the true entropy at a stated training budget (issue 3's target: within
0.05 nats on checkerboard and 8gaussians).

Trains ``pfe.flows.<flow>(2, **kwargs)`` with ``pfe.infer.fit_density`` on a large fixed
training set (``--train`` points, seed 0; 10% of it held out for fit_density's best-state
selection), Adam with a cosine learning-rate decay to zero over ``--steps`` steps, batch
``--batch``, one torch thread; reports the NLL on ``--test`` independent points (seed 1)
against ``pfe.datasets.ENTROPY``, the gap and its standard error, and the wall and thread
CPU time of the fit.

    python benchmarks/entropy_budget.py [--flows nsf,maf] [--sets checkerboard,8gaussians]
        [--steps 15000] [--lr 2e-3] [--kw '{"count_bins": 16}']
"""

import argparse
import json
import math
import sys
import time

import torch

torch.set_num_threads(1)

import pyro_flows_ext as pfe  # noqa: E402
from pyro_flows_ext.infer.density import mean_nll  # noqa: E402


def cosine_adam(params, lr, steps):
    """Adam whose learning rate follows a cosine from ``lr`` to 0 over ``steps`` steps (the
    scheduler is stepped by a post-step hook, so fit_density's plain ``optim.step()`` drives
    it)."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    opt.register_step_post_hook(lambda *_: sched.step())
    return opt


def run(flow_name, data_name, args, kw):
    train = pfe.datasets.toy(data_name, args.train, seed=0)
    test = pfe.datasets.toy(data_name, args.test, seed=1)
    torch.manual_seed(0)
    flow = pfe.flows.FLOWS[flow_name](2, **kw)
    n_params = sum(p.numel() for p in flow.parameters())
    wall, cpu = time.perf_counter(), time.thread_time()
    hist = pfe.infer.fit_density(flow, train, num_steps=args.steps, batch_size=args.batch,
                                 optim=cosine_adam(flow.parameters(), args.lr, args.steps),
                                 eval_every=250, progress=False)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    flow.eval()
    with torch.no_grad():
        lp = flow.log_prob(test)
    nll, se = -lp.mean().item(), lp.std().item() / math.sqrt(len(test))
    assert abs(nll - mean_nll(flow, test)) < 1e-4
    h = pfe.datasets.ENTROPY[data_name]
    return dict(flow=flow_name, data=data_name, params=n_params, nll=nll, se=se, entropy=h,
                gap=nll - h, best_step=hist["best_step"], wall=wall, cpu=cpu)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flows", default="nsf")
    p.add_argument("--sets", default="checkerboard,8gaussians")
    p.add_argument("--steps", type=int, default=15_000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train", type=int, default=200_000)
    p.add_argument("--test", type=int, default=20_000)
    p.add_argument("--kw", default="{}", help="JSON keyword arguments for the builder")
    args = p.parse_args(argv)
    kw = json.loads(args.kw)
    print(f"torch {torch.__version__}, 1 thread; {args.steps} steps, batch {args.batch}, Adam "
          f"lr {args.lr} with cosine decay; {args.train:,} train (10% validation) / "
          f"{args.test:,} test points; builder kwargs {kw}")
    print("\n| flow | data | params | test NLL (± s.e.) | entropy | gap | best step "
          "| wall s | CPU s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for flow_name in args.flows.split(","):
        for data_name in args.sets.split(","):
            r = run(flow_name, data_name, args, kw)
            print(f"| {r['flow']} | {r['data']} | {r['params']:,} | "
                  f"{r['nll']:.4f} ± {r['se']:.4f} | "
                  f"{r['entropy']:.4f} | {r['gap']:+.4f} | {r['best_step']} | {r['wall']:.0f} | "
                  f"{r['cpu']:.0f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
