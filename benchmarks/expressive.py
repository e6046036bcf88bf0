"""Expressive-flow benchmark: pyro_flows_ext's nsf / maf / residual_flow against Pyro, zuko
and normflows, per layer type, at roughly matched parameter counts (printed).

* NSF:      ours ``pfe.flows.nsf`` (4 spline couplings) | Pyro 4 x ``spline_coupling(order=
            'quadratic')`` + Permute | zuko ``NSF(transforms=3)`` (MADE conditioner)
* MAF:      ours ``pfe.flows.maf`` (5 layers) | zuko ``MAF(transforms=5)`` | Pyro 5 x
            ``affine_autoregressive`` used through ``.inv`` (one-pass log_prob)
* residual: ours ``pfe.flows.residual_flow`` (exact log-det in training) | normflows
            ``Residual(LipschitzMLP)`` + ActNorm (Russian-roulette log-det)

Measured on one thread (``torch.set_num_threads(1)``, thread CPU time, robust to other
processes on the machine): training steps/s (batch 512, Adam 1e-3), log_prob and sampling
throughput at 10,000 points, in interleaved rounds (medians); test NLL after a fixed number
of steps on moons, checkerboard, 8gaussians (2-D) and sklearn's breast cancer (30-D,
standardised with the training split's statistics; 80/20 split).

    python benchmarks/expressive.py [--quick] [--steps N] [--rounds R]
"""

import argparse
import statistics
import sys
import time

import torch

torch.set_num_threads(1)

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pyro.distributions.transforms as T  # noqa: E402
import pyro.nn  # noqa: E402
import zuko  # noqa: E402  (benchmark only: it disables distribution validation globally)
from _common import Peer, rate, test_nll, train  # noqa: E402
from torch import nn  # noqa: E402

import pyro_flows_ext as pfe  # noqa: E402

try:
    import normflows as nf  # noqa: E402
except Exception:  # pragma: no cover
    nf = None

BATCH, BIG, BLOCK = 512, 10_000, 20


def ours(builder, **kw):
    def make(dim):
        flow = builder(dim, **kw)
        return Peer("ours", flow, flow.log_prob, lambda n: flow.sample((n,)))
    return make


def pyro_flow(dim, transforms, name):
    base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
    flow = dist.TransformedDistribution(base, transforms)
    module = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)]
                           + [getattr(t, "_inv", None) for t in transforms
                              if isinstance(getattr(t, "_inv", None), nn.Module)])
    return Peer(name, module, flow.log_prob, lambda n: flow.sample((n,)))


def pyro_nsf(dim, layers=4):
    ts = []
    for i in range(layers):
        split, k = dim // 2, 8
        net = pyro.nn.DenseNN(split, [64, 64], param_dims=[(dim - split) * k] * 2
                              + [(dim - split) * (k - 1)])  # quadratic: no lambda outputs
        ts.append(T.SplineCoupling(dim, split, net, count_bins=k, bound=5.0, order="quadratic"))
        if i < layers - 1:
            ts.append(T.Permute(torch.arange(dim).flip(0)))
    return pyro_flow(dim, ts, "pyro spline_coupling")


def pyro_maf(dim, layers=5):
    ts = []
    for i in range(layers):
        ts.append(T.affine_autoregressive(dim, hidden_dims=[64, 64]).inv)
        if i < layers - 1:
            ts.append(T.Permute(torch.arange(dim).flip(0)))
    return pyro_flow(dim, ts, "pyro affine_autoregressive.inv")


def zuko_peer(cls, name, **kw):
    def make(dim):
        flow = cls(features=dim, hidden_features=(64, 64), **kw)
        return Peer(name, flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,)))
    return make


def normflows_residual(dim, blocks=6):
    flows = []
    for _ in range(blocks):
        net = nf.nets.LipschitzMLP([dim, 64, 64, dim], init_zeros=True, lipschitz_const=0.97)
        flows += [nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm(dim)]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), flows)
    return Peer("normflows Residual", model, model.log_prob, lambda n: model.sample(n)[0])


GROUPS = {
    "NSF": [ours(pfe.flows.nsf), pyro_nsf, zuko_peer(zuko.flows.NSF, "zuko NSF", transforms=3)],
    "MAF": [ours(pfe.flows.maf), zuko_peer(zuko.flows.MAF, "zuko MAF", transforms=5), pyro_maf],
    "residual": [ours(pfe.flows.residual_flow)] + ([normflows_residual] if nf else []),
}


def build(maker, dim, seed=0):
    torch.manual_seed(seed)
    peer = maker(dim)
    peer.opt = torch.optim.Adam(peer.module.parameters(), lr=1e-3)
    return peer


def speed(group, rounds, data):
    peers = [build(m, 2) for m in GROUPS[group]]
    gens = [torch.Generator().manual_seed(0) for _ in peers]
    x_big = data[:BIG]
    for p, g in zip(peers, gens):
        train(p, data, 3, g)
    res = {p.name: {"train": [], "log_prob": [], "sample": []} for p in peers}
    for r in range(rounds):
        order = list(range(len(peers)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            p = peers[i]
            res[p.name]["train"].append(
                rate(lambda p=p, i=i: train(p, data, BLOCK, gens[i]), BLOCK))
            p.module.eval()
            with torch.no_grad():
                res[p.name]["log_prob"].append(rate(lambda p=p: p.log_prob(x_big.clone()), BIG))
                res[p.name]["sample"].append(rate(lambda p=p: p.sample(BIG), BIG))
    return peers, {n: {k: statistics.median(v) for k, v in r.items()} for n, r in res.items()}


def breast_cancer():
    from sklearn.datasets import load_breast_cancer
    x = torch.tensor(load_breast_cancer().data, dtype=torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n = int(0.8 * len(x))
    tr, te = x[perm[:n]], x[perm[n:]]
    mean, std = tr.mean(0), tr.std(0)
    return (tr - mean) / std, (te - mean) / std


def nll_table(group, steps, bc_steps):
    sets = {n: (pfe.datasets.toy(n, 20_000, seed=0), pfe.datasets.toy(n, 5_000, seed=1))
            for n in ("moons", "checkerboard", "8gaussians")}
    sets["breast cancer"] = breast_cancer()
    out = {}
    for name, (tr, te) in sets.items():
        dim, n_steps = tr.shape[-1], (bc_steps if name == "breast cancer" else steps)
        for maker in GROUPS[group]:
            peer = build(maker, dim)
            try:
                train(peer, tr, n_steps, torch.Generator().manual_seed(0),
                      batch=min(BATCH, len(tr)))
                out.setdefault(peer.name, {})[name] = test_nll(peer, te)
            except Exception as e:  # a peer failing is a result, not a crash
                print(f"  {peer.name} on {name}: {type(e).__name__}: {str(e)[:80]}")
                out.setdefault(peer.name, {})[name] = float("nan")
    return out


SETS = ("moons", "checkerboard", "8gaussians", "breast cancer")


def report(group, peers, sp, nll):
    print(f"\n### {group}\n")
    print("| library | params (2-D) | train steps/s | log_prob pts/s | sample pts/s | "
          + " | ".join(f"NLL {s}" for s in SETS) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(SETS))
    for p in peers:
        s, n = sp[p.name], nll[p.name]
        print(f"| {p.name} | {p.num_params():,} | {s['train']:.1f} | {s['log_prob']:,.0f} | "
              f"{s['sample']:,.0f} | " + " | ".join(f"{n[k]:.3f}" for k in SETS) + " |")
    ours_ = peers[0].name
    print("\n| ours / peer | train | log_prob | sample | "
          + " | ".join(f"dNLL {s}" for s in SETS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(SETS))
    for p in peers[1:]:
        r = [sp[ours_][k] / sp[p.name][k] for k in ("train", "log_prob", "sample")]
        d = [nll[ours_][k] - nll[p.name][k] for k in SETS]
        print(f"| {p.name} | " + " | ".join(f"{v:.2f}x" for v in r) + " | "
              + " | ".join(f"{v:+.3f}" for v in d) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 steps, 2 rounds")
    parser.add_argument("--steps", type=int, help="training steps for the 2-D NLL (default 2000)")
    parser.add_argument("--rounds", type=int, help="speed rounds (default 5)")
    parser.add_argument("--groups", default="NSF,MAF,residual")
    args = parser.parse_args(argv)
    steps = args.steps or (300 if args.quick else 2000)
    rounds = args.rounds or (2 if args.quick else 5)
    bc_steps = 150 if args.quick else 300  # 455 training rows: longer runs overfit
    wall = time.perf_counter()
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, zuko {zuko.__version__}, "
          f"normflows {getattr(nf, '__version__', 'missing')}, python {sys.version.split()[0]}")
    print(f"1 thread, thread CPU time; batch {BATCH}, train blocks of {BLOCK} steps, "
          f"{rounds} rounds (medians); NLL after {steps} steps (2-D, 20k train / 5k test) and "
          f"{bc_steps} steps (breast cancer, batch 455)")
    print(f"true entropies: checkerboard {pfe.datasets.ENTROPY['checkerboard']:.3f}, "
          f"8gaussians {pfe.datasets.ENTROPY['8gaussians']:.3f}, moons ~1.67; breast cancer: "
          "full-covariance Gaussian ~13.7")
    data = pfe.datasets.toy("moons", 20_000, seed=0)
    for group in args.groups.split(","):
        peers, sp = speed(group, rounds, data)
        report(group, peers, sp, nll_table(group, steps, bc_steps))
        sys.stdout.flush()
    print(f"\ntotal wall time: {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
