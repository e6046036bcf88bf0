"""Surjective flows vs their bijective twins (issue 11), in one run, on one CPU thread.

Three comparisons, each at matched parameter counts (the bijective twin's hidden width is
chosen to match) and the same step budget, seed and minibatch sequence:

1. symmetric 2-D data (four Gaussians mirrored across both axes, checkerboard, a ring):
   ``nsf`` vs ``abs_flow`` (the same spline couplings, then HalfNormalMap + Abs with a
   learned sign model) vs ``rad_flow`` (the same couplings, then a 3-piece RAD fold);
2. augmentation (checkerboard, ring): ``realnvp(2)`` vs an augmented realnvp
   (``realnvp(4)`` layers, then ``Augment(2, 2)``): test NLL from the single-draw bound and
   the importance-weighted bound at K = 1, 10, 100 (``pfe.infer.iw_log_prob``);
3. exchangeable sets of D = 6 points, in random order: iid points of a 1-D two-component
   mixture (``sets``), and points iid only given a random set centre (``shared-sets``):
   ``nsf(6)`` vs the same couplings, then ``Ordered`` + ``Sort`` (a density on sorted vectors
   made exchangeable); per-point NLL.

Measured: test NLL (nats; per point for the sets) with the data's true entropy beside it
(closed form or Monte Carlo from the exact density), training steps/s and ``log_prob`` and
sampling throughput (points/s at 10,000 points, ``torch.no_grad()``), all in thread CPU time.
Training runs in interleaved rounds (every round trains each model for one block of steps,
in a rotating order), so machine drift hits all models alike; speeds are medians over
rounds. Adam (lr 2e-3, cosine decay to 0), batch 512, data-dependent layers initialised from
the training set. Writes the tables (markdown), ``results.json`` and one density PNG per 2-D
data set to ``--out``.

    PYTHONPATH=. python benchmarks/surjections.py                # 1500 steps (~20 min shared CPU)
    PYTHONPATH=. python benchmarks/surjections.py --quick        # 200 steps (~1 min)
"""

import argparse
import json
import math
import os
import statistics
import sys

import torch

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CLOCK  # noqa: E402
from torch import nn  # noqa: E402

import pyro_flows_ext as pfe  # noqa: E402
from pyro_flows_ext.surjections import Augment, Ordered, Sort  # noqa: E402
from pyro_flows_ext.transforms import CholeskyAffine  # noqa: E402
from pyro_flows_ext.transforms.preprocess import initialize_from_data  # noqa: E402

BATCH, BIG = 512, 10_000
N_TRAIN, N_TEST, SET_SIZE = 20_000, 5_000, 6

# -- data with known densities ----------------------------------------------------------------

MIRROR_LOC = torch.tensor([1.5, 0.8])
MIRROR_TRIL = torch.tensor([[0.45, 0.0], [0.25, 0.2]])  # tilted: the mirrors differ in tilt
RING_R, RING_S = 2.0, 0.15
MIX_W, MIX_LOC, MIX_SCALE = torch.tensor([0.4, 0.6]), torch.tensor([-2.0, 1.5]), torch.tensor(
    [0.3, 0.5])


def mirrored(n, g):
    x = MIRROR_LOC + torch.randn(n, 2, generator=g) @ MIRROR_TRIL.T
    return x * torch.where(torch.rand(n, 2, generator=g) < 0.5, 1.0, -1.0)


def mirrored_log_prob(x):
    mvn = torch.distributions.MultivariateNormal(MIRROR_LOC.double(),
                                                 scale_tril=MIRROR_TRIL.double())
    parts = [mvn.log_prob(x * torch.tensor(s, dtype=x.dtype))
             for s in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
    return torch.logsumexp(torch.stack(parts), 0) - math.log(4)


def ring(n, g):
    angle = torch.rand(n, generator=g) * 2 * math.pi
    r = RING_R + RING_S * torch.randn(n, generator=g)
    return torch.stack([r * angle.cos(), r * angle.sin()], -1)


def ring_log_prob(x):
    # polar coordinates: p(x) = N(r; R, s) / (2 pi r); mass at r < 0 (~1e-41) ignored
    r = x.norm(dim=-1)
    return torch.distributions.Normal(RING_R, RING_S).log_prob(r) - torch.log(2 * math.pi * r)


def sets(n, g):
    comp = (torch.rand(n, SET_SIZE, generator=g) < MIX_W[1]).long()
    return MIX_LOC[comp] + MIX_SCALE[comp] * torch.randn(n, SET_SIZE, generator=g)


SHARED_SCALE, SHARED_OFFSET, SHARED_NOISE = 1.5, 1.0, 0.25


def shared_sets(n, g):
    """Exchangeable but dependent: a set centre c ~ N(0, 1.5^2), each point c +- 1 (fair coin)
    plus N(0, 0.25^2) noise; the points are iid only given c."""
    c = SHARED_SCALE * torch.randn(n, 1, generator=g)
    side = torch.where(torch.rand(n, SET_SIZE, generator=g) < 0.5, -1.0, 1.0)
    return c + SHARED_OFFSET * side + SHARED_NOISE * torch.randn(n, SET_SIZE, generator=g)


def shared_sets_log_prob(x, grid=1001):
    """Per-point log-density (each point's share of the set's), the integral over the centre
    on a fine grid (midpoint rule on a smooth integrand; error far below the MC error)."""
    c = torch.linspace(-10.0, 10.0, grid, dtype=torch.float64)
    log_w = torch.distributions.Normal(0.0, SHARED_SCALE).log_prob(c) + math.log(c[1] - c[0])
    out = []
    for part in x.split(2000):
        d = part.unsqueeze(-1) - c  # (n, D, grid)
        noise = torch.distributions.Normal(0.0, SHARED_NOISE)
        point = torch.logsumexp(torch.stack([noise.log_prob(d - SHARED_OFFSET),
                                             noise.log_prob(d + SHARED_OFFSET)]), 0) - math.log(2)
        out.append(torch.logsumexp(point.sum(1) + log_w, -1))
    lp = torch.cat(out)
    return (lp / x.shape[-1]).unsqueeze(-1).expand(x.shape)


def mixture_log_prob(x):
    comps = torch.distributions.Normal(MIX_LOC.double(), MIX_SCALE.double())
    return torch.logsumexp(comps.log_prob(x.unsqueeze(-1)) + MIX_W.double().log(), -1)


def entropy(sample_fn, log_prob_fn, n=200_000, seed=123):
    """Monte-Carlo entropy (mean, standard error) from the exact density."""
    x = sample_fn(n, torch.Generator().manual_seed(seed)).double()
    lp = log_prob_fn(x)
    lp = lp.sum(-1) / x.shape[-1] if lp.dim() > 1 else lp  # sets: per point
    return -lp.mean().item(), lp.std().item() / math.sqrt(n)


DATA = {
    "mirrored": (mirrored, lambda: entropy(mirrored, mirrored_log_prob)),
    "checkerboard": (lambda n, g: pfe.datasets.toy("checkerboard", n, g.initial_seed()),
                     lambda: (math.log(32.0), 0.0)),
    "ring": (ring, lambda: entropy(ring, ring_log_prob)),
    "sets": (sets, lambda: entropy(sets, mixture_log_prob)),
    "shared-sets": (shared_sets, lambda: entropy(shared_sets, shared_sets_log_prob, n=10_000)),
}

# -- models ------------------------------------------------------------------------------------


def count(flow):
    return sum(p.numel() for p in flow.parameters())


def matched_width(build, target, widths=range(16, 257)):
    """The hidden width whose ``build(width)`` parameter count is closest to ``target``."""
    return min(widths, key=lambda h: abs(count(build(h)) - target))


def symmetric_models():
    kw = dict(num_layers=4, hidden_dims=(64, 64))
    models = {"nsf+abs": pfe.flows.abs_flow(2, **kw), "nsf+rad": pfe.flows.rad_flow(2, **kw)}
    target = statistics.mean(count(m) for m in models.values())
    h = matched_width(lambda h: pfe.flows.nsf(2, num_layers=4, hidden_dims=(h, h)), target)
    return {"nsf": pfe.flows.nsf(2, num_layers=4, hidden_dims=(h, h)), **models}


def augmented_models(extra=2):
    inner = pfe.flows.realnvp(2 + extra, num_layers=6, hidden_dims=(64, 64),
                              gaussian_start=False)
    aug = pfe.Flow(None, list(inner.transforms)
                   + [Augment(2, extra, hidden_dims=(32, 32)), CholeskyAffine(2)])
    h = matched_width(lambda h: pfe.flows.realnvp(2, num_layers=6, hidden_dims=(h, h)),
                      count(aug))
    return {"realnvp": pfe.flows.realnvp(2, num_layers=6, hidden_dims=(h, h)),
            "realnvp+augment": aug}


def set_models():
    inner = pfe.flows.nsf(SET_SIZE, num_layers=4, hidden_dims=(64, 64), gaussian_start=False)
    sort = pfe.Flow(None, list(inner.transforms) + [Ordered(SET_SIZE), Sort(SET_SIZE)])
    return {"nsf": pfe.flows.nsf(SET_SIZE, num_layers=4, hidden_dims=(64, 64),
                                 gaussian_start=False),
            "nsf+sort": sort}


# -- the run -----------------------------------------------------------------------------------

class Peer:
    def __init__(self, task, name, flow, train, test, steps):
        self.task, self.name, self.flow = task, name, flow
        self.train_data, self.test = train, test
        initialize_from_data(flow, train)
        self.opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, max(steps, 1))
        self.gen = torch.Generator().manual_seed(0)  # the same minibatches for every model
        self.rates, self.lp_rates, self.sample_rates = [], [], []

    def train_block(self, steps):
        self.flow.train()
        start = CLOCK()
        for _ in range(steps):
            idx = torch.randint(0, len(self.train_data), (BATCH,), generator=self.gen)
            loss = -self.flow.log_prob(self.train_data[idx]).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.sched.step()
        self.rates.append(steps / max(CLOCK() - start, 1e-9))
        return loss.item()

    @torch.no_grad()
    def time_inference(self):
        self.flow.eval()
        x = self.test[:BIG].clone()
        start = CLOCK()
        self.flow.log_prob(x)
        self.lp_rates.append(len(x) / max(CLOCK() - start, 1e-9))
        start = CLOCK()
        self.flow.sample((BIG,))
        self.sample_rates.append(BIG / max(CLOCK() - start, 1e-9))

    @torch.no_grad()
    def evaluate(self, ks=(1, 10, 100)):
        self.flow.eval()
        per = self.test.shape[-1] if self.task.endswith("sets") else 1
        out = {"params": count(self.flow), "exact": self.flow.is_exact,
               "nll": -self.flow.log_prob(self.test).mean().item() / per}
        if not self.flow.is_exact:
            torch.manual_seed(1)
            for k in ks:
                out[f"iw{k}"] = -pfe.infer.iw_log_prob(self.flow, self.test,
                                                       num_samples=k).mean().item() / per
        out.update(steps_per_s=statistics.median(self.rates),
                   log_prob_per_s=statistics.median(self.lp_rates),
                   samples_per_s=statistics.median(self.sample_rates))
        return out


class _IW(nn.Module):
    """A flow scored by the importance-weighted bound (for density pictures)."""

    def __init__(self, flow, k=20):
        super().__init__()
        self.flow, self.k = flow, k

    def log_prob(self, x):
        return pfe.infer.iw_log_prob(self.flow, x, num_samples=self.k)


def pictures(peers, out):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pyro_flows_ext.plots import density_grid

    paths = []
    for task in ("mirrored", "checkerboard", "ring"):
        group = [p for p in peers if p.task == task]
        if not group:
            continue
        fig = Figure(figsize=(4 * (len(group) + 1), 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, len(group) + 1, 1)
        pts = group[0].test[:3000]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set(title=f"{task}: data", xlim=(-4.5, 4.5), ylim=(-4.5, 4.5))
        for i, p in enumerate(group):
            model = p.flow if p.flow.is_exact else _IW(p.flow)
            with torch.no_grad():
                xx, yy, dens = density_grid(model, (-4.5, 4.5), 150)
            ax = fig.add_subplot(1, len(group) + 1, i + 2)
            ax.pcolormesh(xx, yy, dens, shading="auto", cmap="viridis")
            ax.set(title=p.name + ("" if p.flow.is_exact else " (IW K=20)"))
        path = os.path.join(out, f"surjections_{task}.png")
        fig.savefig(path, dpi=80, bbox_inches="tight")
        paths.append(path)
    return paths


def table(results, entropies):
    lines = ["| task | model | params | exact | test NLL | IW K=1 | IW K=10 | IW K=100 | "
             "true entropy | steps/s | log_prob pts/s | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (task, name), r in results.items():
        h, se = entropies[task]
        iw = [f"{r[k]:.3f}" if k in r else "" for k in ("iw1", "iw10", "iw100")]
        lines.append(f"| {task} | {name} | {r['params']} | {'yes' if r['exact'] else 'bound'} | "
                     f"{r['nll']:.3f} | {' | '.join(iw)} | {h:.3f}"
                     f"{f' +- {se:.3f}' if se else ''} | {r['steps_per_s']:.1f} | "
                     f"{r['log_prob_per_s']:.0f} | {r['samples_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--block", type=int, default=100, help="steps per interleaved round")
    parser.add_argument("--quick", action="store_true", help="200 steps")
    parser.add_argument("--tasks", default="mirrored,checkerboard,ring,augment,sets,shared-sets")
    parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
    args = parser.parse_args(argv)
    steps = 200 if args.quick else args.steps
    block = min(args.block, steps)
    os.makedirs(args.out, exist_ok=True)
    tasks = args.tasks.split(",")
    torch.manual_seed(0)

    peers = []
    for task in tasks:
        groups = [(task, symmetric_models if task in ("mirrored", "checkerboard", "ring")
                   else set_models if task in ("sets", "shared-sets") else None)]
        if task == "augment":
            groups = [(src, augmented_models) for src in ("checkerboard", "ring")]
        for src, make in groups:
            sample_fn = DATA[src][0]
            train = sample_fn(N_TRAIN, torch.Generator().manual_seed(0)).float()
            test = sample_fn(N_TEST, torch.Generator().manual_seed(1)).float()
            label = f"{src} (augment)" if task == "augment" else src
            torch.manual_seed(0)
            for name, flow in make().items():
                peers.append(Peer(label, name, flow, train, test, steps))
    entropies = {}
    for p in peers:
        src = p.task.split(" ")[0]
        if p.task not in entropies:
            entropies[p.task] = DATA[src][1]()
    # training in interleaved rounds, rotating the visiting order
    rounds = math.ceil(steps / block)
    for r in range(rounds):
        n = min(block, steps - r * block)
        order = peers[r % len(peers):] + peers[: r % len(peers)]
        for p in order:
            p.train_block(n)
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    for r in range(3):
        order = peers[r % len(peers):] + peers[: r % len(peers)]
        for p in order:
            p.time_inference()
    results = {(p.task, p.name): p.evaluate() for p in peers}
    text = table(results, entropies)
    print(f"{steps} steps per model, batch {BATCH}, one thread; NLL in nats (sets: per point)")
    print(text)
    with open(os.path.join(args.out, "surjections_results.json"), "w") as f:
        json.dump({f"{t}/{n}": r for (t, n), r in results.items()}, f, indent=1)
    for path in pictures(peers, args.out):
        print("wrote", path)


if __name__ == "__main__":
    main()
