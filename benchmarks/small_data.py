"""Small real data sets: every builder against the full-covariance Gaussian on held-out rows.

For each scikit-learn data set (wine 178x13, iris 150x4, diabetes 442x10, breast cancer
569x30, the 8x8 digits as 1797x64 vectors dequantised with U(0, 1) noise), a seeded 80/20
train/test split; the Gaussian is the maximum-likelihood fit of the training rows; each
builder (defaults plus ``standardize=True``, so the Gaussian start applies) is fitted with
``fit_density`` defaults (Adam 1e-3, batch 512, validation split, early stopping) for
``--steps`` steps on one thread. Reported: test NLL (nats, data units), its difference to the
Gaussian with the standard error of that paired difference, the best validation step and the
wall time.

    python benchmarks/small_data.py [--steps 500] [--sets wine,iris] [--flows nsf,maf] [--seeds 1]
"""

import argparse
import math
import time
import warnings

import torch

torch.set_num_threads(1)

import pyro_flows_ext as pfe  # noqa: E402

SETS = ("wine", "iris", "diabetes", "breast_cancer", "digits")
FLOWS = ("realnvp", "nsf", "maf", "residual_flow")


def load(name, seed):
    from sklearn import datasets

    x = getattr(datasets, f"load_{name}")().data
    x = torch.as_tensor(x, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    if name == "digits":  # integer pixels: dequantise so a density exists
        x = x + torch.rand(x.shape, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(x), generator=g)
    n_test = len(x) // 5
    return x[perm[n_test:]], x[perm[:n_test]]


def gaussian_logp(train, test):
    mean = train.mean(0)
    cov = (train - mean).T @ (train - mean) / len(train)
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(test)


def run(name, flow_name, steps, seed):
    train, test = load(name, seed)
    g_lp = gaussian_logp(train, test)
    torch.manual_seed(seed)
    flow = pfe.flows.FLOWS[flow_name](train.shape[1], standardize=True).double()
    wall = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hist = pfe.infer.fit_density(flow, train, num_steps=steps, progress=False, seed=seed)
    wall = time.perf_counter() - wall
    with torch.no_grad():
        lp = flow.log_prob(test)
    diff = g_lp - lp  # flow NLL minus Gaussian NLL, per test row
    return dict(data=name, flow=flow_name, gauss=-g_lp.mean().item(), nll=-lp.mean().item(),
                diff=diff.mean().item(), se=diff.std().item() / math.sqrt(len(diff)),
                step0=hist["val_nll"][0], best=hist["best_step"], n=len(hist["loss"]),
                wall=wall)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--flows", default=",".join(FLOWS))
    p.add_argument("--seeds", type=int, default=1)
    args = p.parse_args(argv)
    print("| data | flow | Gaussian test NLL | flow test NLL | flow - Gaussian (se) | "
          "best step / steps run | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        for flow_name in args.flows.split(","):
            for seed in range(args.seeds):
                r = run(name, flow_name, args.steps, seed)
                print(f"| {r['data']} | {r['flow']} | {r['gauss']:.2f} | {r['nll']:.2f} | "
                      f"{r['diff']:+.2f} ({r['se']:.2f}) | {r['best']} / {r['n']} | "
                      f"{r['wall']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
