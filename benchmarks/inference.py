"""Flow guides vs Pyro's autoguides (and zuko), and NUTS vs NeuTra, on five posteriors.

    PYTHONPATH=. python benchmarks/inference.py --quick     # ~5-8 min on one thread
    PYTHONPATH=. python benchmarks/inference.py             # 2000 SVI steps, 500+500 NUTS
    PYTHONPATH=. python benchmarks/inference.py --seeds 0,1,2 --optim adam --skip-mcmc
    # one process per seed, then one table: --json rows_S.json ... --aggregate rows_*.json

Guides: the default AutoFlowGuide, the previous default and Pyro's four autoguides
(``--every`` adds the other builders and the ablations of the default's levers). The ELBO is
estimated from 1000 fresh draws after training (the same estimator for every guide); with
several seeds the table shows the median and the range.

SVI table: ELBO, importance-weighted log evidence and PSIS k-hat from the same 1000 draws,
CPU ms per SVI step (every guide trains in interleaved rounds,
in rotating order; median over rounds), and W1 of a key marginal against exact draws where
they exist (funnel: v; banana: x2). MCMC table: plain NUTS vs NeuTra(AutoFlowGuide) vs
NeuTra(AutoIAFNormal): divergences, min bulk ESS per CPU second (sampling only, and
including guide training), max R-hat. Every time is the process's CPU time
(``time.process_time``), which a machine shared with other jobs changes far less than wall
time (under a load of 8 on 2 cores wall time made both NUTS and NeuTra look 5x slower).
torch runs on one thread (OpenMP spin-waiting makes two threads
next to a busy process 100x slower). zuko is imported here only: it switches off torch's
argument validation process-wide. The zuko guide (``PFE_BENCH_ZUKO=1``) is opt-in: it samples
through zuko's autoregressive NSF, whose sampling inverts D passes per draw.
"""

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, JitTrace_ELBO, Trace_ELBO
from pyro.infer import autoguide as ag
from pyro.infer.autoguide import AutoContinuous
from scipy.stats import wasserstein_distance

import pyro_flows_ext as pfe
from pyro_flows_ext import diagnostics
from pyro_flows_ext.infer import AutoFlowGuide, neutra_mcmc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_example  # noqa: E402


def banana():
    x1 = pyro.sample("x1", dist.Normal(0.0, 2.0))
    pyro.sample("x2", dist.Normal(0.25 * x1**2, 1.0))


def banana_exact(n, g):
    x1 = 2.0 * torch.randn(n, generator=g)
    return 0.25 * x1**2 + torch.randn(n, generator=g)


def models():
    funnel, schools, logistic = (load_example(n) for n in ("funnel", "eight_schools", "logistic"))
    g = torch.Generator().manual_seed(123)
    return {
        "funnel10": (funnel.model, "v", funnel.exact_sample(20000, generator=g)["v"]),
        "banana2": (banana, "x2", banana_exact(20000, g)),
        "8schools-c": (schools.model, None, None),
        "8schools-nc": (schools.model_noncentered, None, None),
        "logistic": (logistic.model, None, None),
    }


class ZukoGuide(AutoContinuous):
    """A zuko NSF over the packed latent, through pyro.contrib.zuko.ZukoToPyro."""

    def __init__(self, model):
        super().__init__(model, init_loc_fn=ag.init_to_median)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        import zuko

        self.zflow = zuko.flows.NSF(self.latent_dim, transforms=3, hidden_features=(64, 64))

    def get_posterior(self, *args, **kwargs):
        from pyro.contrib.zuko import ZukoToPyro

        class RealVector(ZukoToPyro):
            support = torch.distributions.constraints.real_vector

            def rsample(self, sample_shape=()):
                return self(torch.Size(sample_shape))

        return RealVector(self.zflow())


def guide_factories(every=False):
    """The default guide, the previous default and Pyro's four autoguides; ``every`` adds the
    other builders and recipes (ablations)."""
    out = {"flow:default": lambda m: AutoFlowGuide(m),
           # the default before issue 10: nsf + site couplings + diagonal LocScale, no STL
           "flow:nsf, diagonal, no STL (old default)": lambda m: AutoFlowGuide(
               m, flow="nsf", full_rank=False, stl=False)}
    if every:
        # the builders meant for guides, named so the rows stay the same as builders are
        # added: maf samples with D passes per layer (iaf is its guide form), residual and
        # continuous flows solve a fixed point or an ODE per sample, surjective flows are not
        # bijections
        out.update({f"flow:{name}": (lambda m, n=name: AutoFlowGuide(m, flow=n))
                    for name in ("iaf", "nsf", "realnvp") if name in pfe.flows.FLOWS})
        out["flow:() diagonal, STL"] = lambda m: AutoFlowGuide(m, full_rank=False)
        out["flow:() no STL"] = lambda m: AutoFlowGuide(m, stl=False)
        out["flow:() STL, no clip"] = lambda m: AutoFlowGuide(m, clip=False)
        out["flow:realnvp + STL"] = lambda m: AutoFlowGuide(m, flow="realnvp", stl=True)
        out["AutoNF(spline_coupling)"] = lambda m: ag.AutoNormalizingFlow(
            m, lambda d: pyro.distributions.transforms.spline_coupling(d, count_bins=8))
    out.update({
        "AutoNormal": lambda m: ag.AutoNormal(m),
        "AutoMVN": lambda m: ag.AutoMultivariateNormal(m),
        "AutoLowRankMVN": lambda m: ag.AutoLowRankMultivariateNormal(m),
        "AutoIAFNormal": lambda m: ag.AutoIAFNormal(m, num_transforms=2),
    })
    if os.environ.get("PFE_BENCH_ZUKO"):  # opt-in: see the module docstring
        out["zuko:NSF"] = ZukoGuide
    return out


OPTIMIZERS = {"adam": lambda: pyro.optim.Adam({"lr": 1e-2}),
              "clipped": lambda: pyro.optim.ClippedAdam({"lr": 1e-2, "clip_norm": 1.0})}


def run_svi(model_items, factories, steps, rounds, diag_samples, log, optim="adam", seed=0):
    rows = []
    for mname, (model, key, exact) in model_items.items():
        runs = {}
        pyro.clear_param_store()
        for gname, make in factories.items():
            pyro.set_rng_seed(seed)
            guide = make(model)
            # distinct param-store names: guides of one class would share parameters
            guide._pyro_name = "".join(c if c.isalnum() else "_" for c in gname)
            svi = SVI(model, guide, OPTIMIZERS[optim](), Trace_ELBO())
            runs[gname] = {"guide": guide, "svi": svi, "losses": [], "times": [], "nan": None}
        per_round = max(1, steps // rounds)
        names = list(runs)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for gname in order:
                run = runs[gname]
                if run["nan"] is not None:
                    continue
                t0 = time.process_time()
                try:
                    for _ in range(per_round):
                        loss = run["svi"].step()
                        if not math.isfinite(loss):
                            raise ValueError(f"loss {loss}")
                        run["losses"].append(loss)
                except (ValueError, RuntimeError) as e:
                    run["nan"] = f"NaN at step {len(run['losses'])}: {str(e)[:40]}"
                    continue
                run["times"].append((time.process_time() - t0) / per_round * 1000)
        for gname, run in runs.items():
            row = {"model": mname, "guide": gname, "optim": optim, "seed": seed}
            if run["nan"] is not None:
                row["status"] = run["nan"]
                rows.append(row)
                log(row)
                continue
            tail = run["losses"][-max(1, len(run["losses"]) // 10):]
            row["train_elbo"] = -float(np.mean(tail))
            try:
                with torch.random.fork_rng():  # the same fresh draws' seed for every guide
                    torch.manual_seed(10_000 + seed)
                    est = diagnostics.log_evidence(model, run["guide"], num_samples=diag_samples)
                # the ELBO of many fresh draws, the same estimator for every guide
                row.update(elbo=est["elbo"], elbo_se=est["elbo_se"], iw=est["log_evidence"],
                           khat=est["khat"])
            except Exception as e:  # noqa: BLE001
                row["status"] = f"diagnostics failed: {str(e)[:40]}"
            row["ms"] = float(np.median(run["times"]))
            if key is not None:
                with torch.no_grad():
                    pred = pyro.infer.Predictive(model, guide=run["guide"], num_samples=5000,
                                                 return_sites=[key])()
                row["w1"] = wasserstein_distance(pred[key].reshape(-1).numpy(),
                                                 exact[:5000].numpy())
                row["w1_exact"] = wasserstein_distance(exact[5000:10000].numpy(),
                                                       exact[:5000].numpy())
            rows.append(row)
            log(row)
            run["guide"].requires_grad_(False)
        yield mname, runs, rows
        rows = []


def mcmc_stats(idata, seconds, train_seconds, divergences):
    import arviz as az

    ess = az.ess(idata, method="bulk")
    rhat = az.rhat(idata)
    min_ess = min(float(ess[v].min()) for v in ess.data_vars)
    max_rhat = max(float(rhat[v].max()) for v in rhat.data_vars)
    return {"div": divergences, "ess": min_ess, "ess_s": min_ess / seconds,
            "ess_s_total": min_ess / (seconds + train_seconds), "rhat": max_rhat,
            "seconds": seconds}


def plain_nuts(model, num_samples, warmup, chains, depth, jit_compile=False):
    start, draws, div = time.process_time(), [], 0
    for _ in range(chains):
        mcmc = MCMC(NUTS(model, max_tree_depth=depth, jit_compile=jit_compile,
                         ignore_jit_warnings=True), num_samples=num_samples,
                    warmup_steps=warmup, disable_progbar=True)
        mcmc.run()
        draws.append(mcmc.get_samples())
        div += len(mcmc.diagnostics()["divergences"]["chain 0"])
    seconds = time.process_time() - start
    samples = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    return diagnostics.to_inference_data(samples), seconds, div


def train(model, guide, steps, optim, jit=False):
    elbo = JitTrace_ELBO(ignore_jit_warnings=True) if jit else Trace_ELBO()
    svi = SVI(model, guide, OPTIMIZERS[optim](), elbo)
    start = time.process_time()
    for _ in range(steps):
        svi.step()
    return time.process_time() - start


def svi_table(rows):
    """Markdown: per model and guide, the median over seeds with the seeds' range."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["guide"], r["optim"]), []).append(r)

    def cell(runs, key, spec=".2f"):
        vals = [r[key] for r in runs if key in r]
        if not vals:
            return "-"
        med = float(np.median(vals))
        if len(vals) == 1:
            return format(med, spec)
        return f"{med:{spec}} ({min(vals):{spec}} to {max(vals):{spec}})"

    out = ["| model | guide | optim | seeds | ELBO (1000 draws) | IW log evidence | k-hat | "
           "ms/step | W1 key marginal (exact-vs-exact) | failures |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, guide, optim), runs in sorted(groups.items(), key=lambda kv: kv[0][0]):
        bad = [r["status"] for r in runs if "status" in r]
        w1 = "-"
        if any("w1" in r for r in runs):
            w1 = f"{cell(runs, 'w1', '.3f')} ({cell(runs[:1], 'w1_exact', '.3f')})"
        out.append(f"| {model} | {guide} | {optim} | {len(runs)} | {cell(runs, 'elbo')} | "
                   f"{cell(runs, 'iw')} | {cell(runs, 'khat')} | {cell(runs, 'ms', '.1f')} | "
                   f"{w1} | {'; '.join(bad) or '-'} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (median and range)")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--depth", type=int, default=None, help="NUTS max tree depth")
    p.add_argument("--only", default=None, help="comma-separated model names")
    p.add_argument("--guides", default=None, help="comma-separated guide names")
    p.add_argument("--every", action="store_true", help="also the ablation guides")
    p.add_argument("--skip-mcmc", action="store_true")
    p.add_argument("--skip-svi", action="store_true")
    p.add_argument("--mcmc", default="nuts,nuts-jit,neutra,neutra-iaf",
                   help="comma-separated MCMC rows: nuts, nuts-jit (Pyro's jit_compile=True), "
                        "neutra (the default AutoFlowGuide), neutra-jit (the same, trained with "
                        "JitTrace_ELBO), neutra-iaf (AutoIAFNormal)")
    p.add_argument("--json", default=None, help="also write the SVI rows to this file")
    p.add_argument("--aggregate", nargs="+", default=None,
                   help="print the SVI table of rows written by earlier --json runs")
    p.add_argument("--optim", default="adam,clipped",
                   help="SVI optimizers, comma-separated: adam (Adam 1e-2) and/or clipped "
                        "(ClippedAdam 1e-2, clip_norm 1)")
    a = p.parse_args(argv)
    if a.aggregate:
        import json

        rows = [r for path in a.aggregate for r in json.load(open(path))]
        print(svi_table(rows))
        return
    steps = a.steps or (500 if a.quick else 2000)
    rounds = a.rounds or (4 if a.quick else 10)
    num_samples = a.num_samples or (200 if a.quick else 500)
    warmup = a.warmup or (200 if a.quick else 500)
    depth = a.depth or (8 if a.quick else 10)
    seeds = [int(x) for x in a.seeds.split(",")]
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    items = models()
    if a.only:
        items = {k: v for k, v in items.items() if k in a.only.split(",")}
    optims = a.optim.split(",")
    if not set(optims) <= set(OPTIMIZERS):
        p.error(f"--optim must name {sorted(OPTIMIZERS)}")
    print(f"# settings: {steps} SVI steps ({', '.join(optims)}, lr 1e-2, 1 particle), "
          f"{rounds} interleaved rounds, seeds {seeds}, "
          f"1000 fresh draws for ELBO/IW/k-hat; NUTS "
          f"{chains_str(a.chains, warmup, num_samples, depth)}; torch threads 1")

    def log(row):
        print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
              file=sys.stderr, flush=True)

    factories = {} if a.skip_svi else guide_factories(a.every)
    if a.guides:
        factories = {k: v for k, v in factories.items() if k in a.guides.split(",")}
    all_rows = []
    for seed in seeds:
        for optim in optims:
            for _, _, rows in run_svi(items if factories else {}, factories, steps, rounds,
                                      1000, log, optim, seed):
                all_rows += rows
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(all_rows, f)
    if all_rows:
        print("\n## SVI\n")
        print(svi_table(all_rows))
    if a.skip_mcmc:
        return
    print("\n## NUTS vs NeuTra\n")
    print("| model | method | seed | divergences | min bulk ESS | ESS/s (sampling) | "
          "ESS/s (incl. guide training) | max R-hat | seconds | neutra_mcmc's warnings |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mname in items:
        model = items[mname][0]
        for seed in seeds:
            results = {}
            methods = a.mcmc.split(",")
            for key, label, jit in (("nuts", "NUTS", False), ("nuts-jit", "NUTS (jit)", True)):
                if key in methods:
                    pyro.set_rng_seed(seed)
                    idata, sec, div = plain_nuts(model, num_samples, warmup, a.chains, depth,
                                                 jit)
                    results[label] = mcmc_stats(idata, sec, 0.0, div)
            for key, label, make, jit in (
                    ("neutra", "NeuTra(default AutoFlowGuide)", AutoFlowGuide, False),
                    ("neutra-jit", "NeuTra(default AutoFlowGuide, JitTrace_ELBO training)",
                     AutoFlowGuide, True),
                    ("neutra-iaf", "NeuTra(AutoIAFNormal)",
                     lambda m: ag.AutoIAFNormal(m, num_transforms=2), False)):
                if key not in methods:
                    continue
                pyro.set_rng_seed(seed)
                pyro.clear_param_store()
                guide = make(model)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    train_s = train(model, guide, steps, "adam", jit)
                start = time.process_time()  # CPU time: neutra_mcmc's own seconds are wall
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", diagnostics.DiagnosticWarning)
                    res = neutra_mcmc(model, guide, num_samples=num_samples,
                                      warmup_steps=warmup, num_chains=a.chains, seed=seed,
                                      max_tree_depth=depth)
                results[label] = mcmc_stats(res.idata, time.process_time() - start, train_s,
                                            res.divergences)
                said = [str(w.message) for w in caught
                        if issubclass(w.category, diagnostics.DiagnosticWarning)]
                results[label]["warned"] = "; ".join(
                    m.split(":")[1].split("(")[0].strip()[:48] for m in said) or "-"
            for label, st in results.items():
                print(f"| {mname} | {label} | {seed} | {st['div']} | {st['ess']:.0f} | "
                      f"{st['ess_s']:.2f} | {st['ess_s_total']:.2f} | {st['rhat']:.3f} | "
                      f"{st['seconds']:.0f} | {st.get('warned', '')} |", flush=True)


def chains_str(chains, warmup, num_samples, depth):
    return f"{chains} chains x ({warmup} warmup + {num_samples} draws), max tree depth {depth}"


if __name__ == "__main__":
    main()
