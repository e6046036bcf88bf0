"""RealNVP parity: pyro_flows_ext's ``realnvp`` against zuko's ``RealNVP`` (and Pyro's
``affine_coupling`` stack) under ONE training loop.

Protocol (identical for every flow):

* data: 20,000 training, 5,000 validation and 5,000 test points, drawn with seeds
  ``(0, 1, 2)`` (``train_seed`` = 10 s for seed s when ``--vary-data``; by default the data are
  fixed and the seed varies the initialisation and minibatch order);
* loop: ``torch.optim.Adam(lr)`` (default 1e-3, ``foreach`` implementation), minibatches of
  512 drawn with replacement from a generator seeded with the run's seed, loss
  ``-log_prob(batch).mean()``, ``num_steps`` steps (default 2000), optional gradient-norm
  clip (off by default);
* scoring: validation and test NLL (nats, mean over points, eval mode, no grad) at step 0
  and every 100 steps. Two numbers per run: **best** = test NLL at the checkpoint with the
  lowest validation NLL (what ``fit_density`` returns), **final** = test NLL after the last
  step. ``spike`` = the largest increase of the validation NLL between consecutive
  checkpoints after step 500 (loss spikes of affine couplings);
* seeds 0, 1, 2 (``torch.manual_seed(seed)`` before building the flow, so zuko's random
  initialisation differs by seed); tables report medians and ranges (min-max).

Flows (8 couplings, hidden (64, 64), ReLU, for every D):

* ``ours``: ``pfe.flows.realnvp(D, **kwargs)`` (builder defaults unless a variant overrides
  them), its Gaussian start (``CholeskyAffine``) set from the training set before step 0 by
  ``pfe.infer.density.prepare`` exactly as ``fit_density`` does;
* ``zuko``: ``zuko.flows.RealNVP(D, transforms=8, hidden_features=(64, 64))`` (checkered masks
  alternating between couplings, ``MonotonicAffineTransform``, default random init);
* ``pyro``: 8 x ``T.affine_coupling(D, hidden_dims=[64, 64])`` with a fixed random
  ``T.Permute`` between them (a reversal for D = 2).

Data sets: ``moons`` and ``checkerboard`` (``pfe.datasets.toy``) and ``bm8`` / ``bm32``, the
banana-warped Gaussian mixtures of :func:`banana_mixture` (exact density known, so the
table also gives the true entropy, estimated on the test points); ``bm32r``: ``bm32``
rotated by a fixed random orthogonal matrix (no coordinate axis special: a control for
layouts that favour axis-aligned structure).

Training speed: steps/s from thread CPU time (``time.thread_time``) in blocks of 50 steps,
flows visited round-robin with a rotating order in each round (interleaved rounds), median
over rounds; one thread (``torch.set_num_threads(1)``).

zuko is imported only here (it switches distribution argument validation off globally, so
every flow runs without validation).

    python benchmarks/realnvp_parity.py run --data moons --flow ours --seeds 0 1 2 \\
        [--kwargs '{"mask": "alternate"}'] [--name ours-alt] --out results.jsonl
    python benchmarks/realnvp_parity.py speed --dims 2 32 --rounds 7 --out speed.jsonl
    python benchmarks/realnvp_parity.py report results.jsonl [speed.jsonl]
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pyro.distributions as dist  # noqa: E402
import pyro.distributions.transforms as T  # noqa: E402
import zuko  # noqa: E402  (benchmark only: it disables distribution validation globally)
from torch import nn  # noqa: E402

import pyro_flows_ext as pfe  # noqa: E402
from pyro_flows_ext.infer.density import prepare  # noqa: E402

N_TRAIN, N_VAL, N_TEST = 20_000, 5_000, 5_000
BATCH, EVAL_EVERY, LAYERS, HIDDEN = 512, 100, 8, (64, 64)
CLOCK = time.thread_time


# -- data ------------------------------------------------------------------------------------

def _banana_structure(dim, k=4):
    """Fixed mixture structure for ``dim``: means ``2 N(0, I)``, per-axis stds
    ``U(0.3, 1.0)``, from ``torch.Generator().manual_seed(1000 + dim)``."""
    g = torch.Generator().manual_seed(1000 + dim)
    means = 2.0 * torch.randn(k, dim, generator=g, dtype=torch.float64)
    stds = 0.3 + 0.7 * torch.rand(k, dim, generator=g, dtype=torch.float64)
    return means, stds


BANANA_B, BANANA_S = 0.3, 1.0


def banana_mixture(n, dim, seed, k=4):
    r"""``n`` points of the D-dimensional banana-warped Gaussian mixture ``bm{D}``: ``u`` from
    an equal-weight mixture of ``k = 4`` diagonal Gaussians (structure fixed per ``dim`` by
    :func:`_banana_structure`), then on each coordinate pair ``(2j, 2j+1)``:
    :math:`x_{2j} = u_{2j},\ x_{2j+1} = u_{2j+1} + b (u_{2j}^2 - s)` with ``b = 0.3``,
    ``s = 1``. The warp is triangular with unit diagonal (volume preserving), so
    :math:`\log p(x) = \log p_{mix}(u(x))` exactly (:func:`banana_log_prob`)."""
    means, stds = _banana_structure(dim, k)
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(k, (n,), generator=g)
    u = means[comp] + stds[comp] * torch.randn(n, dim, generator=g, dtype=torch.float64)
    x = u.clone()
    x[:, 1::2] += BANANA_B * (u[:, 0::2] ** 2 - BANANA_S)
    return x.float()


def banana_log_prob(x, dim, k=4):
    means, stds = _banana_structure(dim, k)
    u = x.double().clone()
    u[:, 1::2] -= BANANA_B * (u[:, 0::2] ** 2 - BANANA_S)
    comp = torch.distributions.Normal(means, stds).log_prob(u[:, None, :]).sum(-1)
    return torch.logsumexp(comp, -1) - math.log(k)


def _rotation(dim):
    """A fixed random orthogonal matrix (QR of a Gaussian matrix, generator seed 7)."""
    g = torch.Generator().manual_seed(7)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q * r.diagonal().sign()


def load(name, seed_offset=0):
    """``(train, val, test)`` of data set ``name``; ``bm{D}r``: ``bm{D}`` rotated by
    :func:`_rotation` (a control where no coordinate axis is special)."""
    seeds = [seed_offset + s for s in (0, 1, 2)]
    sizes = (N_TRAIN, N_VAL, N_TEST)
    if name.startswith("bm") and name.endswith("r"):
        dim = int(name[2:-1])
        q = _rotation(dim)
        return [(banana_mixture(n, dim, s).double() @ q.T).float() for n, s in zip(sizes, seeds)]
    if name.startswith("bm"):
        dim = int(name[2:])
        return [banana_mixture(n, dim, s) for n, s in zip(sizes, seeds)]
    return [pfe.datasets.toy(name, n, seed=s) for n, s in zip(sizes, seeds)]


def true_entropy(name, test):
    if name.startswith("bm") and name.endswith("r"):  # a rotation keeps volumes
        dim = int(name[2:-1])
        return -banana_log_prob((test.double() @ _rotation(dim)).float(), dim).mean().item()
    if name.startswith("bm"):
        return -banana_log_prob(test, int(name[2:])).mean().item()
    return {"checkerboard": math.log(32)}.get(name)


# -- flows: (module, log_prob) ---------------------------------------------------------------

def make_ours(dim, train, _start=None, **kwargs):
    """``_start`` (ablations of the Gaussian start, built here): ``"freeze"``: the
    CholeskyAffine is not trained; ``"base"``: the CholeskyAffine sits at the base end (a
    full-covariance Gaussian base); ``"base+std"``: that, plus a fixed data-side Standardize."""
    if _start in ("base", "base+std"):
        flow = pfe.flows.realnvp(dim, num_layers=LAYERS, hidden_dims=HIDDEN,
                                 gaussian_start=False, **kwargs)
        layers = [pfe.transforms.CholeskyAffine(dim)] + list(flow.transforms)
        if _start == "base+std":
            layers.append(pfe.transforms.Standardize(dim))
        flow = pfe.Flow(None, layers)
    else:
        flow = pfe.flows.realnvp(dim, num_layers=LAYERS, hidden_dims=HIDDEN, **kwargs)
    prepare(flow, train)  # the Gaussian start, as fit_density sets it before step 0
    if _start == "freeze":
        for t in flow.transforms:
            if isinstance(t, pfe.transforms.CholeskyAffine):
                t.requires_grad_(False)
    return flow, flow.log_prob


def make_zuko(dim, train, **kwargs):
    flow = zuko.flows.RealNVP(features=dim, transforms=LAYERS, hidden_features=HIDDEN,
                              **kwargs)
    return flow, lambda x: flow().log_prob(x)


def make_pyro(dim, train, **kwargs):
    transforms = []
    for i in range(LAYERS):
        transforms.append(T.affine_coupling(dim, hidden_dims=list(HIDDEN), **kwargs))
        if i < LAYERS - 1:
            perm = torch.arange(dim).flip(0) if dim == 2 else torch.randperm(dim)
            transforms.append(T.Permute(perm))
    base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
    flow = dist.TransformedDistribution(base, transforms)
    module = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])
    return module, flow.log_prob


MAKERS = {"ours": make_ours, "zuko": make_zuko, "pyro": make_pyro}


def build(flow, dim, train, seed, kwargs):
    torch.manual_seed(seed)
    module, log_prob = MAKERS[flow](dim, train, **kwargs)
    return module, log_prob


@torch.no_grad()
def nll(module, log_prob, x):
    module.eval()
    out = -torch.cat([log_prob(xb) for xb in x.split(2500)]).mean().item()
    module.train()
    return out


def run_one(data, flow, seed, kwargs, steps, lr, clip, seed_offset=0):
    train, val, test = load(data, seed_offset)
    dim = train.shape[1]
    module, log_prob = build(flow, dim, train, seed, kwargs)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curve = [(0, nll(module, log_prob, val), nll(module, log_prob, test))]
    module.train()
    start = CLOCK()
    bad = 0
    for step in range(1, steps + 1):
        x = train[torch.randint(0, len(train), (BATCH,), generator=gen)]
        loss = -log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        if not math.isfinite(loss.item()):
            bad += 1
            continue
        opt.step()
        if step % EVAL_EVERY == 0 or step == steps:
            curve.append((step, nll(module, log_prob, val), nll(module, log_prob, test)))
    cpu = CLOCK() - start
    best = min(curve, key=lambda c: c[1] if math.isfinite(c[1]) else math.inf)
    late = [c for c in curve if c[0] >= 500]
    spike = max((b[1] - a[1] for a, b in zip(late, late[1:])), default=0.0)
    return {"data": data, "flow": flow, "seed": seed, "kwargs": kwargs, "steps": steps,
            "lr": lr, "clip": clip, "best": best[2], "best_step": best[0],
            "final": curve[-1][2], "spike": spike, "nonfinite_steps": bad, "cpu_s": cpu,
            "params": sum(p.numel() for p in module.parameters()), "curve": curve,
            "entropy": true_entropy(data, test)}


def fit_check(seeds, kwargs):
    """Issue 8's check: ``pfe.flows.realnvp(2, **kwargs)`` fitted by ``fit_density`` with its
    defaults (2000 steps, Adam 1e-3, batch 512, best validation step) to sklearn's
    ``make_moons(20000, noise=0.05, random_state=seed)``; test NLL on
    ``make_moons(5000, noise=0.05, random_state=100 + seed)``."""
    from sklearn.datasets import make_moons

    for seed in seeds:
        train = torch.as_tensor(make_moons(20_000, noise=0.05, random_state=seed)[0]).float()
        test = torch.as_tensor(make_moons(5_000, noise=0.05, random_state=100 + seed)[0]).float()
        torch.manual_seed(seed)
        flow = pfe.flows.realnvp(2, **kwargs)
        history = pfe.infer.fit_density(flow, train, progress=False, seed=seed)
        with torch.no_grad():
            test_nll = -flow.log_prob(test).mean().item()
        yield {"fit": True, "seed": seed, "kwargs": kwargs, "test_nll": test_nll,
               "best_step": history["best_step"]}


# -- speed -----------------------------------------------------------------------------------

def speed(dims, rounds, block, variants):
    out = []
    for dim in dims:
        train = banana_mixture(N_TRAIN, dim, 0) if dim > 2 else pfe.datasets.toy("moons",
                                                                                 N_TRAIN)
        peers = []
        for name, flow, kwargs in variants:
            module, log_prob = build(flow, dim, train, 0, kwargs)
            opt = torch.optim.Adam(module.parameters(), lr=1e-3)
            peers.append([name, module, log_prob, opt, torch.Generator().manual_seed(0), []])

        def block_of(p, n, train=train):
            _, module, log_prob, opt, gen, _ = p
            module.train()
            for _ in range(n):
                x = train[torch.randint(0, len(train), (BATCH,), generator=gen)]
                loss = -log_prob(x).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

        for p in peers:
            block_of(p, 5)  # warm-up
        for r in range(rounds):
            order = peers[r % len(peers):] + peers[:r % len(peers)]
            for p in order:
                t = CLOCK()
                block_of(p, block)
                p[5].append(block / (CLOCK() - t))
        for p in peers:
            out.append({"speed": True, "dim": dim, "name": p[0], "steps_per_s": p[5],
                        "median": statistics.median(p[5])})
    return out


# -- report ----------------------------------------------------------------------------------

def _fmt(values):
    med = statistics.median(values)
    return f"{med:.3f} ({min(values):.3f}-{max(values):.3f})"


def _order(key):
    name = key[1]
    first = ("zuko", "ours, new", "ours (", "ours, old", "pyro")
    rank = next((i for i, p in enumerate(first) if name.startswith(p)), len(first))
    return rank, name, key[2:]


def report(paths):
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    runs = [r for r in rows if not r.get("speed") and not r.get("fit")]
    for r in (r for r in rows if r.get("fit")):
        print(f"fit_density on make_moons(noise=0.05), realnvp(2, **{r['kwargs']}), seed "
              f"{r['seed']}: test NLL {r['test_nll']:.3f} (best step {r['best_step']})")
    speeds = [r for r in rows if r.get("speed")]
    groups = {}
    for r in runs:
        key = (r["data"], r.get("name", r["flow"]), r["lr"], r["clip"], r["steps"])
        groups.setdefault(key, []).append(r)
    datas = sorted({k[0] for k in groups},
                   key=["moons", "checkerboard", "bm8", "bm32", "bm32r"].index)
    print("| data | flow | lr | clip | steps | seeds | test NLL best-of-val | test NLL final "
          "| max val spike | params | true entropy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d in datas:
        for key in sorted((k for k in groups if k[0] == d), key=_order):
            g = sorted(groups[key], key=lambda r: r["seed"])
            ent = g[0]["entropy"]
            print(f"| {d} | {key[1]} | {key[2]:g} | {key[3] or '-'} | {key[4]} "
                  f"| {','.join(str(r['seed']) for r in g)} | {_fmt([r['best'] for r in g])} "
                  f"| {_fmt([r['final'] for r in g])} "
                  f"| {statistics.median(r['spike'] for r in g):.3f} | {g[0]['params']:,} "
                  f"| {'' if ent is None else f'{ent:.3f}'} |")
    if speeds:
        print()
        print("| D | flow | train steps/s (median, range over rounds) |")
        print("|---:|---|---:|")
        for s in speeds:
            v = s["steps_per_s"]
            print(f"| {s['dim']} | {s['name']} | {statistics.median(v):.1f} "
                  f"({min(v):.1f}-{max(v):.1f}) |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", nargs="+", default=["moons", "checkerboard", "bm8", "bm32"])
    r.add_argument("--flow", nargs="+", default=["ours", "zuko"])
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the builder")
    r.add_argument("--name", help="label of the variant in the table")
    r.add_argument("--steps", type=int, default=2000)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--clip", type=float, default=None)
    r.add_argument("--out", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--dims", type=int, nargs="+", default=[2, 32])
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--block", type=int, default=50)
    s.add_argument("--variants", default='[["ours", "ours", {}], ["zuko", "zuko", {}], '
                                         '["pyro", "pyro", {}]]')
    s.add_argument("--out", required=True)
    f = sub.add_parser("fit", help="the issue's check: sklearn make_moons(noise=0.05), "
                                   "fit_density defaults")
    f.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    f.add_argument("--kwargs", default="{}")
    f.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "report":
        return report(args.paths)
    with open(args.out, "a") as f:
        if args.cmd == "fit":
            for row in fit_check(args.seeds, json.loads(args.kwargs)):
                f.write(json.dumps(row) + "\n")
                print(row, file=sys.stderr, flush=True)
            return
        if args.cmd == "speed":
            for row in speed(args.dims, args.rounds, args.block, json.loads(args.variants)):
                f.write(json.dumps(row) + "\n")
            return
        kwargs = json.loads(args.kwargs)
        for data in args.data:
            for flow in args.flow:
                for seed in args.seeds:
                    row = run_one(data, flow, seed, kwargs if flow == "ours" else {},
                                  args.steps, args.lr, args.clip)
                    row["name"] = args.name or flow
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(f"{data} {row['name']} seed {seed}: best {row['best']:.3f} "
                          f"final {row['final']:.3f} spike {row['spike']:.3f} "
                          f"({row['cpu_s']:.0f} s CPU)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
