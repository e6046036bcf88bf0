"""Density-estimation benchmark: pyro_flows_ext's RealNVP against Pyro's and zuko's.

Three RealNVP-style flows on 2-D data with matched parameter counts (~36-37k):

* ours  - ``pfe.flows.realnvp(2)``: the data-initialised CholeskyAffine at the base end,
  8 x (AffineCoupling(64, 64, invert=True) + Reverse), a data-initialised Standardize at the
  data end (together the Gaussian start; ``whiten="base"``)
* pyro  - 8 x ``affine_coupling(2, hidden_dims=[65, 65])`` interleaved with ``Permute([1, 0])``
* zuko  - ``zuko.flows.RealNVP(2, transforms=8, hidden_features=(65, 65))``

Measured, on one CPU thread (``torch.set_num_threads(1)``):

a. training steps/s: minibatch 512, loss = -log_prob(batch).mean(), zero_grad, backward,
   ``Adam(lr=1e-3, fused=True)`` (the same optimiser for all), timed in blocks of 50 steps;
b. log_prob throughput (points/s) on 10,000 points under ``torch.no_grad()``;
c. sampling throughput (points/s) of 10,000 points under ``torch.no_grad()``;
d. test NLL (nats) on moons and checkerboard after the same number of training steps
   from the same seed (same initialisation seed, same minibatch sequence).

a-c run in interleaved rounds: every round visits each library once (the visiting order
rotates between rounds), so slow drifts of the machine hit all of them alike; the tables
report the median over rounds. zuko is imported only here: importing it switches torch's
distribution argument validation off globally, so all three run without validation.

    python benchmarks/density.py [--quick] [--steps N] [--rounds R]
"""

import argparse
import math
import statistics
import sys
import time

import torch

torch.set_num_threads(1)

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pyro.distributions.transforms as T  # noqa: E402
import zuko  # noqa: E402  (benchmark only: it disables distribution validation globally)
from _common import CLOCK, Peer, rate, test_nll, train  # noqa: E402
from torch import nn  # noqa: E402

import pyro_flows_ext as pfe  # noqa: E402

BATCH, BIG, BLOCK = 512, 10_000, 50
N_TRAIN, N_TEST = 20_000, 5_000


def moons_entropy(n=10_000, grid=2_000, seed=123):
    """Monte-Carlo estimate (+- ~0.01 nats) of the moons' differential entropy, from the exact
    density of ``pfe.datasets.toy("moons")``: each moon a half circle (uniform angle) scaled
    by 2, plus isotropic noise of std 0.1; the angle integral is done on a fine grid."""
    x = pfe.datasets.toy("moons", n, seed=seed).double()
    angle = (torch.arange(grid, dtype=torch.float64) + 0.5) * math.pi / grid
    outer = torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    inner = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], -1)
    centres = torch.cat([outer, inner]) * 2 + torch.tensor([-1.0, -0.2], dtype=torch.float64)
    var = 0.1 ** 2
    log_p = torch.cat([torch.logsumexp(-torch.cdist(xb, centres) ** 2 / (2 * var), -1)
                       for xb in x.split(1000)])
    log_p = log_p - math.log(len(centres)) - math.log(2 * math.pi * var)
    return -log_p.mean().item()


# -- the three peers: each is (modules for .parameters()/.train()/.eval(), log_prob, sample) --

def make_ours():
    flow = pfe.flows.realnvp(2)
    return Peer("ours (pyro_flows_ext)", flow, flow.log_prob, lambda n: flow.sample((n,)))


def make_ours_couplings():
    """The same couplings without the Gaussian start: exactly Pyro's and zuko's structure."""
    flow = pfe.flows.realnvp(2, gaussian_start=False)
    return Peer("ours, couplings only", flow, flow.log_prob, lambda n: flow.sample((n,)))


def make_pyro(layers=8, hidden=65):
    transforms = []
    for i in range(layers):
        transforms.append(T.affine_coupling(2, hidden_dims=[hidden, hidden]))
        if i < layers - 1:
            transforms.append(T.Permute(torch.tensor([1, 0])))
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    flow = dist.TransformedDistribution(base, transforms)
    module = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])
    return Peer("pyro (built-in)", module, flow.log_prob, lambda n: flow.sample((n,)))


def make_zuko(layers=8, hidden=65):
    flow = zuko.flows.RealNVP(features=2, transforms=layers, hidden_features=(hidden, hidden))
    return Peer("zuko", flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,)))


MAKERS = [make_ours, make_ours_couplings, make_pyro, make_zuko]


def build(maker, seed=0):
    torch.manual_seed(seed)
    peer = maker()
    try:
        peer.opt = torch.optim.Adam(peer.module.parameters(), lr=1e-3, fused=True)
        peer.fused = True
    except (RuntimeError, TypeError, ValueError):
        peer.opt = torch.optim.Adam(peer.module.parameters(), lr=1e-3)
        peer.fused = False
    return peer


# -- measurements ----------------------------------------------------------------------------

def time_train(peer, data, gen):
    return rate(lambda: train(peer, data, BLOCK, gen, BATCH), BLOCK)


@torch.no_grad()
def time_log_prob(peer, x, reps=5):
    peer.module.eval()
    # a fresh tensor per call: ours and Pyro's transforms cache the last (input, output) pair
    # by identity, so scoring the same tensor object again would skip the whole network
    xs = [x.clone() for _ in range(reps)]
    start = CLOCK()
    for xi in xs:
        lp = peer.log_prob(xi)
    speed = reps * len(x) / (CLOCK() - start)
    peer.finite_lp = getattr(peer, "finite_lp", True) and bool(torch.isfinite(lp).all())
    return speed


@torch.no_grad()
def time_sample(peer, reps=5):
    peer.module.eval()
    start = CLOCK()
    for _ in range(reps):
        x = peer.sample(BIG)
    speed = reps * BIG / (CLOCK() - start)
    peer.finite_x = getattr(peer, "finite_x", True) and bool(torch.isfinite(x).all())
    return speed


def speed_rounds(rounds, data):
    """Rounds of (train block, log_prob, sample) per peer, peers visited round-robin."""
    peers = [build(m) for m in MAKERS]
    gens = [torch.Generator().manual_seed(0) for _ in peers]
    x_big = data[:BIG]
    for peer, gen in zip(peers, gens):  # warm-up (also runs ActNorm's data-dependent init)
        train(peer, data, 5, gen)
        time_log_prob(peer, x_big, reps=1)
        time_sample(peer, reps=1)
    results = {p.name: {"train": [], "log_prob": [], "sample": []} for p in peers}
    for r in range(rounds):
        order = list(range(len(peers)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            peer, res = peers[i], results[peers[i].name]
            res["train"].append(time_train(peer, data, gens[i]))
            res["log_prob"].append(time_log_prob(peer, x_big))
            res["sample"].append(time_sample(peer))
    medians = {name: {k: statistics.median(v) for k, v in res.items()}
               for name, res in results.items()}
    return peers, medians


def nll_runs(steps, names=("moons", "checkerboard")):
    """Test NLL of each peer after ``steps`` training steps from the same seeds."""
    out = {}
    for name in names:
        data, test = (pfe.datasets.toy(name, N_TRAIN, seed=0),
                      pfe.datasets.toy(name, N_TEST, seed=1))
        for maker in MAKERS:
            peer = build(maker, seed=0)
            train(peer, data, steps, torch.Generator().manual_seed(0))
            out.setdefault(peer.name, {})[name] = test_nll(peer, test)
    return out


# -- report ----------------------------------------------------------------------------------

def fmt(v, digits=0):
    return "nan" if v is None or math.isnan(v) else f"{v:,.{digits}f}"


def report(peers, speed, nll):
    print("| library | params | train steps/s | log_prob pts/s | sample pts/s "
          "| NLL moons | NLL checkerboard |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for p in peers:
        s, n = speed[p.name], nll[p.name]
        print(f"| {p.name} | {p.num_params():,} | {fmt(s['train'], 1)} | {fmt(s['log_prob'])} "
              f"| {fmt(s['sample'])} | {fmt(n['moons'], 3)} | {fmt(n['checkerboard'], 3)} |")
    print(f"| true entropy | | | | | {moons_entropy():.2f} (MC estimate) "
          f"| {pfe.datasets.ENTROPY['checkerboard']:.3f} (log 32) |")
    print()
    print("Ratios ours/peer (> 1: ours faster); NLL difference ours - peer (< 0: ours better)")
    print()
    print("| ours | peer | train | log_prob | sample | dNLL moons | dNLL checkerboard |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for o in (p.name for p in peers if p.name.startswith("ours")):
        for p in (p for p in peers if not p.name.startswith("ours")):
            r = {k: speed[o][k] / speed[p.name][k] for k in ("train", "log_prob", "sample")}
            d = {k: nll[o][k] - nll[p.name][k] for k in ("moons", "checkerboard")}
            print(f"| {o} | {p.name} | {r['train']:.2f}x | {r['log_prob']:.2f}x "
                  f"| {r['sample']:.2f}x | {d['moons']:+.3f} | {d['checkerboard']:+.3f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 training steps, 3 rounds")
    parser.add_argument("--steps", type=int, help="training steps for the NLL (default 2000)")
    parser.add_argument("--rounds", type=int, help="speed rounds (default 10)")
    args = parser.parse_args(argv)
    steps = args.steps or (300 if args.quick else 2000)
    rounds = args.rounds or (3 if args.quick else 10)

    wall = time.perf_counter()
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, zuko {zuko.__version__}, "
          f"pyro_flows_ext {pfe.__version__}, python {sys.version.split()[0]}")
    print(f"torch.get_num_threads() = {torch.get_num_threads()}; distribution validation: "
          f"{torch.distributions.Distribution._validate_args}; rates from thread CPU time "
          "(time.thread_time)")
    print(f"batch {BATCH}, train blocks of {BLOCK} steps, log_prob/sample at {BIG:,} points, "
          f"{rounds} interleaved rounds (medians); NLL after {steps} steps, "
          f"{N_TRAIN:,} train (seed 0) / {N_TEST:,} test (seed 1) points")
    peers, speed = speed_rounds(rounds, pfe.datasets.toy("moons", N_TRAIN, seed=0))
    print("optimiser: Adam(lr=1e-3, "
          + ", ".join(f"{p.name}: fused={p.fused}" for p in peers) + ")")
    bad = [p.name for p in peers if not (p.finite_lp and p.finite_x)]
    if bad:
        print(f"WARNING: non-finite log_prob or samples from: {', '.join(bad)}")
    nll = nll_runs(steps)
    print()
    report(peers, speed, nll)
    print(f"\ntotal wall time: {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
