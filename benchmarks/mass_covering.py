"""Mass-covering training of flow guides: Trace_ELBO vs RenyiELBO (alpha = 0.5, 0) vs an
importance-weighted (IWAE) objective, on a ring-shaped and a two-mode 2-D posterior.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/mass_covering.py --quick  # 1 seed, ~2 min
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/mass_covering.py   # 3 seeds x 1500 steps
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/mass_covering.py --init-scale 3 --no-checks
    # ~15 min each on a loaded 2-core machine; results: benchmarks/mass_covering.md

Models: ``examples/models/ring.py`` (every angle has the same mass) and
``examples/models/two_modes.py`` (modes of mass 0.60 / 0.40, 8 widths apart).

Guides: ``flow()`` = ``AutoFlowGuide(model)`` (the default: site couplings, none for these
one-site models, + full-rank LocScale, sticking the landing and its gradient clip),
``flow()-nostl`` = ``AutoFlowGuide(model, stl=False)`` (the same family with Pyro's full
gradient: it computes AutoMultivariateNormal's steps exactly), ``flow-nsf`` =
``AutoFlowGuide(model, flow="nsf")`` (spline couplings, no STL) and Pyro's
``AutoMultivariateNormal`` (reference). Every guide starts at ``init_to_median`` with scale
``--init-scale`` (0.1, both libraries' default).

Objectives, all with the same ``K`` vectorised particles, step budget, ``pyro.optim.Adam`` and
lr: ``Trace_ELBO(K)``, ``RenyiELBO(alpha=0.5, K)``, ``RenyiELBO(alpha=0, K)`` (the IWAE bound
:math:`\\log \\frac1K \\sum_k w_k`, Pyro's gradient) and ``iw-dreg``: the same IWAE bound
through ``vectorized_importance_weights`` with the doubly reparameterised gradient (Tucker et
al. 2019) :math:`\\sum_k \\tilde w_k^2 \\nabla_{path} \\log w_k`, which needs a path-only
``log q``: the flow guides are built with ``stl=True`` for it and the MVN is wrapped in
:class:`~pyro_flows_ext.infer.guide.SticksTheLanding`. (A direct ``logsumexp`` of
``vectorized_importance_weights`` would be RenyiELBO(alpha=0) again: the same estimator, see
:func:`check_iw_equals_renyi0`.)

What is measured, after training, per (model, guide, objective, seed):

* ``covered``: the exact posterior mass of the regions the guide visits. The latent plane is cut
  into regions independent of the guide (ring: 36 equal angular sectors; two modes: the two
  half-planes x1 < 0 and x1 > 0, the Voronoi cells of the two posterior modes); with
  :math:`P_r` the exact mass of region r (by grid integration of the model's density) and
  :math:`Q_r` the fraction of 4000 guide draws in it, ``covered`` =
  :math:`\\sum_r P_r [Q_r \\ge 0.1 P_r]`. ``1-TV`` = :math:`\\sum_r \\min(P_r, Q_r)` is the
  threshold-free companion (1 when the guide spreads its draws over the regions as the
  posterior does).
* ``W1``: the 2-D Wasserstein-1 distance between 1000 guide draws and 1000 exact draws (exact
  optimal matching, ``scipy.optimize.linear_sum_assignment``); ``W1 floor`` in the header is
  W1 between two independent exact 1000-draw sets (the Monte Carlo floor).
* ``IW err``: the importance-weighted log evidence from 2000 guide draws
  (``pyro_flows_ext.diagnostics.log_evidence``) minus the exact log evidence, with the
  estimate's delta-method standard error, and PSIS k-hat from the same weights.
* ``CPU ms/step`` (thread CPU time, what is comparable on a shared machine) and wall ms/step.

Exact draws come from a grid sampler written here from the model's ``log_joint`` (a 1200^2
grid over [-5, 5]^2: a cell by its mass, then uniform within the cell); its grid integral
reproduces the model file's closed-form log evidence to < 1e-3 (checked at start-up and in
``tests/test_mass_covering.py``).

torch runs on one thread. The table shows the median and [min, max] over seeds.
"""

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import pyro
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.infer.importance import vectorized_importance_weights
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from pyro_flows_ext import diagnostics
from pyro_flows_ext.infer import AutoFlowGuide
from pyro_flows_ext.infer.guide import SticksTheLanding

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_example  # noqa: E402

COVER_THRESHOLD = 0.1  # a region counts as covered with >= 10% of its exact share of draws
RING_SECTORS = 36


# -- exact reference -----------------------------------------------------------------------------
class GridPosterior:
    """The exact posterior of a 2-D model on a fine grid: ``log_joint`` at the centres of
    ``n x n`` cells over ``[-half, half]^2`` (float64). ``log_evidence`` is the grid integral;
    ``sample`` picks a cell by its mass and a uniform point inside it."""

    def __init__(self, log_joint, half=5.0, n=1200):
        self.half, self.n = half, n
        self.h = 2 * half / n
        c = -half + self.h * (torch.arange(n, dtype=torch.float64) + 0.5)
        xx, yy = torch.meshgrid(c, c, indexing="ij")
        self.centres = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
        log_d = log_joint(self.centres).double()
        self.log_evidence = float(torch.logsumexp(log_d, 0) + 2 * math.log(self.h))
        self.probs = torch.softmax(log_d, 0)

    def sample(self, num, generator):
        cell = torch.multinomial(self.probs, num, replacement=True, generator=generator)
        jitter = (torch.rand(num, 2, generator=generator, dtype=torch.float64) - 0.5) * self.h
        return (self.centres[cell] + jitter).float()

    def region_mass(self, region_fn, num_regions):
        """Exact mass of each region ``(R,)`` (cells assigned by their centre)."""
        r = region_fn(self.centres)
        return torch.zeros(num_regions, dtype=torch.float64).index_add_(0, r, self.probs)


def ring_regions(x):
    angle = torch.atan2(x[..., 1].double(), x[..., 0].double())
    return ((angle + math.pi) / (2 * math.pi) * RING_SECTORS).long().clamp(0, RING_SECTORS - 1)


def two_mode_regions(x):
    return (x[..., 0] > 0).long()  # the Voronoi cells of the modes (+-lambda*2, 0)


def coverage(draws, region_fn, exact_mass):
    """``(covered, 1 - TV)`` of guide ``draws`` against the exact region masses."""
    r = region_fn(draws)
    share = torch.bincount(r, minlength=len(exact_mass)).double() / len(draws)
    covered = float(exact_mass[share >= COVER_THRESHOLD * exact_mass].sum())
    return covered, float(torch.minimum(share, exact_mass).sum())


def w1(a, b):
    """Exact W1 between two equal-size point sets (optimal matching)."""
    cost = cdist(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


# -- guides and objectives -----------------------------------------------------------------------
class STLMultivariateNormal(AutoMultivariateNormal):
    """AutoMultivariateNormal whose log-density carries only the path gradient (for DReG)."""

    def get_posterior(self, *args, **kwargs):
        return SticksTheLanding(super().get_posterior(*args, **kwargs))


def make_guide(name, model, objective, init_scale=0.1):
    dreg = objective == "iw-dreg"  # needs a path-only log q
    s = init_scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stl=True with splines warns (measured here)
        if name == "flow()":
            return AutoFlowGuide(model, stl=True if dreg else None, init_scale=s)
        if name == "flow()-nostl":  # the default's layers with Pyro's full gradient
            return AutoFlowGuide(model, stl=False, init_scale=s)
        if name == "flow-nsf":
            return AutoFlowGuide(model, flow="nsf", stl=True if dreg else None, init_scale=s)
        if name == "mvn":
            cls = STLMultivariateNormal if dreg else AutoMultivariateNormal
            return cls(model, init_scale=s)
    raise ValueError(name)


def dreg_loss(particles):
    """The negative IWAE bound, with the doubly reparameterised gradient: the guide's log q is
    path-only, and the surrogate weighs each log w_k by its squared normalised weight."""

    def loss(model, guide, *args, **kwargs):
        log_w = vectorized_importance_weights(model, guide, *args, num_samples=particles,
                                              max_plate_nesting=0, **kwargs)[0]
        w = torch.softmax(log_w.detach(), 0)
        bound = torch.logsumexp(log_w.detach(), 0) - math.log(particles)
        surrogate = (w.square() * log_w).sum()
        return -(surrogate - surrogate.detach() + bound)

    return loss


def make_loss(objective, particles):
    if objective == "elbo":
        return Trace_ELBO(num_particles=particles, vectorize_particles=True,
                          max_plate_nesting=0)
    if objective.startswith("renyi"):
        return RenyiELBO(alpha=float(objective[5:]), num_particles=particles,
                         vectorize_particles=True, max_plate_nesting=0)
    if objective == "iw-dreg":
        return dreg_loss(particles)
    raise ValueError(objective)


def check_iw_equals_renyi0(model, particles=8):
    """RenyiELBO(alpha=0) and a direct logsumexp of vectorized_importance_weights give the
    same loss and gradient from the same random draws (so the benchmark does not repeat it)."""
    grads = []
    for which in ("renyi", "direct"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(model)
        guide()
        pyro.set_rng_seed(1)
        if which == "renyi":
            RenyiELBO(alpha=0, num_particles=particles, vectorize_particles=True,
                      max_plate_nesting=0).loss_and_grads(model, guide)
        else:
            log_w = vectorized_importance_weights(model, guide, num_samples=particles,
                                                  max_plate_nesting=0)[0]
            (-(torch.logsumexp(log_w, 0) - math.log(particles))).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in guide.parameters()]))
    return float((grads[0] - grads[1]).abs().max() / grads[0].abs().max().clamp_min(1e-12))


def stl_bias_check(module, particles=16, reps=600, warm_steps=300, seed=0):
    """Mean IWAE-bound gradient at one fixed, partly trained default guide (ring: it covers
    part of the ring) from three estimators: RenyiELBO(alpha=0) with the default guide's
    sticking-the-landing log q (what ``AutoFlowGuide(model)`` gives), RenyiELBO(alpha=0) with
    ``stl=False`` (Pyro's reparameterised IWAE gradient, unbiased) and DReG (unbiased). No
    gradient clip, so only the estimator differs. Returns ``{name: (|mean - unbiased| /
    |unbiased|, max |t|)}`` against the ``stl=False`` mean (t: difference over its standard
    error, per coordinate)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    base = AutoFlowGuide(module.model, clip=False)
    base()
    train(module.model, base, "elbo", warm_steps, 1e-2, particles)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    means = {}
    for name, stl, objective in [("renyi0, stl", True, "renyi0"),
                                 ("renyi0, no stl", False, "renyi0"),
                                 ("iw-dreg", True, "iw-dreg")]:
        pyro.clear_param_store()
        guide = AutoFlowGuide(module.model, stl=stl, clip=False)
        guide()
        guide.load_state_dict(state)
        loss = make_loss(objective, particles)
        grads = []
        for _ in range(reps):
            for p in guide.parameters():
                p.grad = None
            if objective == "renyi0":
                loss.loss_and_grads(module.model, guide)
            else:
                loss(module.model, guide).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in guide.parameters()]))
        g = torch.stack(grads).double()
        means[name] = (g.mean(0), g.std(0) / math.sqrt(reps))
    ref, ref_se = means["renyi0, no stl"]
    return {k: (float((m - ref).norm() / ref.norm()),
                float(((m - ref).abs() / (se.square() + ref_se.square()).sqrt()
                       .clamp_min(1e-12)).max()))
            for k, (m, se) in means.items() if k != "renyi0, no stl"}


def estimator_checks(modules, args):
    rel = check_iw_equals_renyi0(next(iter(modules.values())).model)
    checks = [f"RenyiELBO(alpha=0) vs a direct logsumexp of vectorized_importance_weights, "
              f"same draws: max relative gradient difference {rel:.1e} (the same estimator)"]
    if "ring" in modules:
        bias = stl_bias_check(modules["ring"], args.particles, reps=150 if args.quick else 600)
        checks += [f"IWAE-bound gradient at a fixed partly trained ring guide (no clip), "
                   f"against RenyiELBO(alpha=0) with stl=False: {k}: relative difference of "
                   f"the mean {d:.2f}, max |t| {t:.1f}" for k, (d, t) in bias.items()]
    return checks


def train(model, guide, objective, steps, lr, particles):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), make_loss(objective, particles))
    losses = []
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        losses.append(svi.step())
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    return losses, 1e3 * cpu / steps, 1e3 * wall / steps


@torch.no_grad()
def guide_draws(guide, n):
    return guide.get_posterior().sample((n,)).reshape(n, 2)


def run_one(name, module, exact, guide_name, objective, seed, args):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(guide_name, module.model, objective, args.init_scale)
    guide()  # set up
    losses, cpu_ms, wall_ms = train(module.model, guide, objective, args.steps, args.lr,
                                    args.particles)
    row = {"model": name, "guide": guide_name, "objective": objective, "seed": seed,
           "cpu_ms": cpu_ms, "wall_ms": wall_ms,
           "finite": bool(all(math.isfinite(v) for v in losses))}
    draws = guide_draws(guide, args.mass_draws)
    if not torch.isfinite(draws).all():
        row.update(covered=math.nan, overlap=math.nan, w1=math.nan, iw_err=math.nan,
                   iw_se=math.nan, khat=math.nan)
        return row
    row["covered"], row["overlap"] = coverage(draws, exact["region_fn"], exact["mass"])
    g = torch.Generator().manual_seed(10_000 + seed)
    row["w1"] = w1(draws[: args.w1_draws], exact["grid"].sample(args.w1_draws, g))
    est = diagnostics.log_evidence(module.model, guide, num_samples=args.iw_draws)
    row["iw_err"] = est["log_evidence"] - exact["log_z"]
    row["iw_se"], row["khat"] = est["log_evidence_se"], est["khat"]
    return row


def exact_reference(name, module, w1_draws):
    grid = GridPosterior(module.log_joint)
    log_z = module.log_evidence()
    if abs(grid.log_evidence - log_z) > 1e-3:
        raise RuntimeError(f"{name}: grid log evidence {grid.log_evidence:.5f} != exact "
                           f"{log_z:.5f}")
    region_fn, k = (ring_regions, RING_SECTORS) if name == "ring" else (two_mode_regions, 2)
    g = torch.Generator().manual_seed(99)
    floor = w1(grid.sample(w1_draws, g), grid.sample(w1_draws, g))
    return {"grid": grid, "log_z": log_z, "grid_log_z": grid.log_evidence,
            "region_fn": region_fn, "mass": grid.region_mass(region_fn, k), "w1_floor": floor}


# -- table ---------------------------------------------------------------------------------------
def summary(values, fmt):
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0 or not np.isfinite(v).any():
        return "nan"
    if len(v) == 1:
        return fmt.format(v[0])
    lo, mid, hi = (fmt.format(f(v)) for f in (np.nanmin, np.nanmedian, np.nanmax))
    return f"{mid} [{lo}, {hi}]"


COLUMNS = [("covered", "covered", "{:.2f}"), ("overlap", "1-TV", "{:.2f}"),
           ("w1", "W1", "{:.3f}"), ("iw_err", "IW err", "{:+.3f}"), ("iw_se", "IW se", "{:.3f}"),
           ("khat", "k-hat", "{:.2f}"), ("cpu_ms", "CPU ms/step", "{:.1f}"),
           ("wall_ms", "wall ms/step", "{:.1f}")]


def table(rows, refs):
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        ref = refs[name]
        lines += [f"**{name}**: exact log Z {ref['log_z']:.4f} (grid {ref['grid_log_z']:.4f}), "
                  f"W1 floor {ref['w1_floor']:.3f}", "",
                  "| guide | objective | " + " | ".join(c[1] for c in COLUMNS) + " |",
                  "|---|---|" + "---|" * len(COLUMNS)]
        keys = dict.fromkeys((r["guide"], r["objective"]) for r in rows if r["model"] == name)
        for guide, objective in keys:
            sel = [r for r in rows if (r["model"], r["guide"], r["objective"])
                   == (name, guide, objective)]
            cells = [summary([r.get(k) for r in sel], fmt) for k, _, fmt in COLUMNS]
            bad = sum(not r["finite"] for r in sel)
            lines.append(f"| {guide} | {objective}{f' ({bad} non-finite)' if bad else ''} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 300 steps, fewer draws")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--particles", type=int, default=16)
    p.add_argument("--models", default="ring,two_modes")
    p.add_argument("--guides", default="flow(),flow()-nostl,flow-nsf,mvn")
    p.add_argument("--objectives", default="elbo,renyi0.5,renyi0,iw-dreg")
    p.add_argument("--init-scale", type=float, default=0.1,
                   help="every guide's initial scale (both libraries' default: 0.1)")
    p.add_argument("--no-checks", action="store_true", help="skip the estimator checks")
    p.add_argument("--mass-draws", type=int, default=4000)
    p.add_argument("--w1-draws", type=int, default=1000)
    p.add_argument("--iw-draws", type=int, default=2000)
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--json", default=None, help="write the raw rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.w1_draws, args.iw_draws = "0", 300, 500, 1000
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    modules = {n: load_example(n) for n in args.models.split(",")}
    refs = {n: exact_reference(n, m, args.w1_draws) for n, m in modules.items()}
    checks = []
    if not args.no_checks:
        checks = estimator_checks(modules, args)
    print("\n".join(checks), flush=True)
    # warm-up (one-time costs out of the first timing)
    pyro.clear_param_store()
    first = next(iter(modules.values())).model
    warm = make_guide("flow()", first, "elbo")
    warm()
    train(first, warm, "elbo", 20, args.lr, args.particles)
    rows = []
    start = time.perf_counter()
    for seed in seeds:
        for name, module in modules.items():
            for guide in args.guides.split(","):
                for objective in args.objectives.split(","):
                    if guide == "flow()-nostl" and objective == "iw-dreg":
                        continue  # DReG needs the path-only log q: that is flow() itself
                    row = run_one(name, module, refs[name], guide, objective, seed, args)
                    rows.append(row)
                    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                      for k, v in row.items()}), flush=True)
    elapsed = time.perf_counter() - start
    header = (f"{len(seeds)} seed(s) {args.seeds}; {args.steps} steps, pyro.optim.Adam lr "
              f"{args.lr}, K = {args.particles} vectorised particles for every objective, "
              f"init_scale {args.init_scale}; "
              f"torch threads 1; {elapsed / 60:.1f} min wall; load "
              f"{os.getloadavg()[0]:.1f}\n")
    text = header + "\n" + "\n".join(f"- {c}" for c in checks) + "\n\n" + table(rows, refs)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
