"""Small real data sets: every builder in ``pfe.flows.FLOWS`` against a full-covariance
Gaussian and zuko's NSF / RealNVP, held-out NLL.

Data (scikit-learn's bundled sets, no download): wine 178 x 13, iris 150 x 4, diabetes
442 x 10, the 8 x 8 digits 1797 x 64 (integer pixels 0..16 plus uniform dequantisation noise
of ``--dequant`` pixel units, default 1, one quantisation step), breast cancer 569 x 30. Each
is split train/test (``--test-fraction``, default 0.3, seeded permutation) and standardised
with the training rows' mean and standard deviation; NLLs are in nats per row in those
standardised units (the same units for every model, so differences are comparable).

Models, all fitted to the same training rows:

* ``gaussian``: full-covariance MLE (mean and biased covariance of the training rows),
  scored with ``torch.distributions.MultivariateNormal``;
* every vector builder of ``pfe.flows.FLOWS`` (image builders such as glow are skipped),
  fitted with ``pfe.infer.fit_density`` at its defaults (only ``num_steps`` may be lowered
  with ``--steps``; validation split,
  evaluation interval, batch size, optimizer and best-step restore are fit_density's own);
* ``zuko NSF`` (``zuko.flows.NSF(D, transforms=3)``, as in ``expressive.py``) and
  ``zuko RealNVP`` (``zuko.flows.RealNVP(D, transforms=8)``, as in ``density.py``), trained
  by a replica of fit_density's loop: the same validation split and minibatch order (same
  seed), Adam(lr 1e-3), the same number of steps, validation every ``eval_every`` steps with
  the best validated parameters restored (fit_density's defaults read from its signature).

One torch thread. zuko is imported here only: importing it switches torch's distribution
argument validation off process-wide.

    PYTHONPATH=. python benchmarks/small_data_zuko.py                 # fit_density defaults
    PYTHONPATH=. python benchmarks/small_data_zuko.py --steps 500     # fast
    PYTHONPATH=. python benchmarks/small_data_zuko.py --sets wine,iris --flows nsf,realnvp

Builders whose training or exact log-density is slow at larger D (``SLOW``: the continuous
flows, the exact-log-det residual flow and iaf, whose log_prob inverts D passes) run only on
data sets with at most ``--slow-max-dim`` features (default 13); their other cells read "skip".
"""

import argparse
import inspect
import math
import statistics
import time

import torch

torch.set_num_threads(1)

import zuko  # noqa: E402  (benchmark only: it disables distribution validation globally)

import pyro_flows_ext as pfe  # noqa: E402
from pyro_flows_ext.infer import fit_density  # noqa: E402

# -- data ------------------------------------------------------------------------------------

def _sklearn(name, dequant):
    import sklearn.datasets as ds
    if name == "wine":
        x = ds.load_wine().data
    elif name == "iris":
        x = ds.load_iris().data
    elif name == "diabetes":
        x = ds.load_diabetes().data
    elif name == "breast_cancer":
        x = ds.load_breast_cancer().data
    elif name == "digits":
        x = ds.load_digits().data
    else:
        raise ValueError(f"unknown data set {name!r}")
    x = torch.as_tensor(x, dtype=torch.float64)
    if name == "digits" and dequant > 0:
        g = torch.Generator().manual_seed(12345)
        x = x + dequant * torch.rand(x.shape, generator=g, dtype=torch.float64)
    return x


SETS = ["wine", "iris", "diabetes", "digits", "breast_cancer"]
SLOW = {"ffjord", "ot_flow", "residual_flow", "iaf"}
SKIP = "skip"


def split(name, test_fraction, seed, dequant):
    """``(train, test)`` float32, standardised with the training rows' statistics."""
    x = _sklearn(name, dequant)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    tr, te = x[perm[n_test:]], x[perm[:n_test]]
    mean, std = tr.mean(0), tr.std(0).clamp_min(1e-12)
    return ((tr - mean) / std).float(), ((te - mean) / std).float()


# -- models ----------------------------------------------------------------------------------

def gaussian_nll(tr, te):
    tr, te = tr.double(), te.double()
    mean = tr.mean(0)
    centred = tr - mean
    cov = centred.T @ centred / len(tr)
    cov = cov + 1e-9 * torch.eye(len(mean), dtype=cov.dtype)
    mvn = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    return -mvn.log_prob(te).mean().item()


FIT_DEFAULTS = {k: v.default for k, v in inspect.signature(fit_density).parameters.items()
                if v.default is not inspect.Parameter.empty}


class _Zuko(torch.nn.Module):
    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def log_prob(self, x):
        return self.flow().log_prob(x)


try:  # fit_density's own split, batch order and cadence where the installed version has them
    from pyro_flows_ext.infer.density import _batches as _fit_batches
    from pyro_flows_ext.infer.density import default_eval_every, default_patience, split_data
    _NEW_PROTOCOL = True
except ImportError:
    _NEW_PROTOCOL = False


def _protocol(n_steps):
    """``(val_fraction, eval_every, patience, validate_at_step_0)`` fit_density uses."""
    val_fraction = FIT_DEFAULTS.get("val_fraction", 0.1)
    eval_every = FIT_DEFAULTS.get("eval_every", 100)
    patience = FIT_DEFAULTS.get("patience", None)
    if _NEW_PROTOCOL:
        eval_every = eval_every or default_eval_every(n_steps)
        if patience == "auto":
            patience = default_patience(n_steps, eval_every)
    return val_fraction, eval_every, patience, _NEW_PROTOCOL


def _split(data, seed):
    val_fraction = _protocol(0)[0]
    if _NEW_PROTOCOL:
        train, val = split_data(data, val_fraction, seed)
        return train, (val if len(val) else train), None
    generator = torch.Generator().manual_seed(seed)
    n_val = int(round(len(data) * val_fraction))
    perm = torch.randperm(len(data), generator=generator)
    train, val = data[perm[n_val:]], data[perm[:n_val]]
    return train, (val if len(val) else train), generator


def _old_batches(n, batch_size, generator):
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i:i + batch_size]


def fit_zuko(model, data, num_steps, seed=0, lr=1e-3):
    """A replica of fit_density's loop for a zuko flow (split, minibatch order, Adam 1e-3,
    validation cadence, step-0 validation and early stopping where fit_density has them,
    best validated parameters restored)."""
    train, val, generator = _split(data, seed)
    _, eval_every, patience, at_zero = _protocol(num_steps)
    batch_size = min(FIT_DEFAULTS.get("batch_size", 512), len(train))
    batches = (_fit_batches(len(train), batch_size, seed) if _NEW_PROTOCOL
               else _old_batches(len(train), batch_size, generator))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    state = {"best": math.inf, "bad": 0,
             "best_state": {k: v.clone() for k, v in model.state_dict().items()}}

    def validate():
        model.eval()
        with torch.no_grad():
            v = -model.log_prob(val).mean().item()
        model.train()
        if v < state["best"]:
            state["best"], state["bad"] = v, 0
            state["best_state"] = {k: x.clone() for k, x in model.state_dict().items()}
        else:
            state["bad"] += 1

    model.train()
    if at_zero:
        validate()
    for step in range(num_steps):
        loss = -model.log_prob(train[next(batches)]).mean()
        if not math.isfinite(loss.item()):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == num_steps:
            validate()
            if patience is not None and state["bad"] >= patience:
                break
    model.load_state_dict(state["best_state"])
    model.eval()
    return model


@torch.no_grad()
def _test_nll(log_prob, te):
    lp = log_prob(te)
    return -lp.mean().item()


def run_cell(model_name, tr, te, steps, seed):
    dim = tr.shape[-1]
    torch.manual_seed(seed)
    if model_name == "gaussian":
        return gaussian_nll(tr, te)
    if model_name == "zuko NSF":
        model = fit_zuko(_Zuko(zuko.flows.NSF(dim, transforms=3)), tr, steps, seed=seed)
        return _test_nll(model.log_prob, te)
    if model_name == "zuko RealNVP":
        model = fit_zuko(_Zuko(zuko.flows.RealNVP(dim, transforms=8)), tr, steps, seed=seed)
        return _test_nll(model.log_prob, te)
    flow = pfe.flows.FLOWS[model_name](dim)
    fit_density(flow, tr, num_steps=steps, progress=False, seed=seed)
    flow.eval()
    return _test_nll(flow.log_prob, te)


def _fmt(v, digits=2):
    if v is SKIP:
        return SKIP
    if v is None:
        return "err"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=FIT_DEFAULTS.get("num_steps", 2000),
                        help="training steps (default: fit_density's default)")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--flows", default=None, help="builders (default: all of FLOWS)")
    parser.add_argument("--no-zuko", action="store_true")
    parser.add_argument("--seeds", default="0", help="split/initialisation seeds; median")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--slow-max-dim", type=int, default=13,
                        help=f"largest D on which {sorted(SLOW)} run")
    parser.add_argument("--dequant", type=float, default=1.0,
                        help="width of the uniform noise added to the digits' pixels")
    args = parser.parse_args()

    sets = args.sets.split(",")
    flows = (args.flows.split(",") if args.flows else
             [n for n, b in pfe.flows.FLOWS.items() if not getattr(b, "image", False)])
    models = ["gaussian"] + flows + ([] if args.no_zuko else ["zuko NSF", "zuko RealNVP"])
    seeds = [int(s) for s in args.seeds.split(",")]
    shown = ("batch_size", "val_fraction", "eval_every", "patience")
    fit_defaults = {k: FIT_DEFAULTS[k] for k in shown if k in FIT_DEFAULTS}
    print(f"torch {torch.__version__}, zuko {zuko.__version__}, threads "
          f"{torch.get_num_threads()}; {args.steps} steps; fit_density defaults "
          f"{fit_defaults} "
          f"(zuko loop: val_fraction, eval_every, patience, step-0 validation = "
          f"{_protocol(args.steps)}); "
          f"test fraction {args.test_fraction}; seeds {seeds} (median); digits dequantisation "
          f"U(0, {args.dequant})", flush=True)

    table, times, shapes = {}, {}, {}
    for name in sets:
        for model in models:
            if model in SLOW and _sklearn(name, 0).shape[-1] > args.slow_max_dim:
                table[model, name], times[model, name] = SKIP, 0.0
                continue
            vals, t0 = [], time.perf_counter()
            for seed in seeds:
                tr, te = split(name, args.test_fraction, seed, args.dequant)
                shapes[name] = (len(tr), len(te), tr.shape[-1])
                try:
                    v = run_cell(model, tr, te, args.steps, seed)
                except Exception as e:  # a failing cell is reported, the table goes on
                    print(f"  {model} on {name}: {type(e).__name__}: {e}", flush=True)
                    v = None
                vals.append(v)
            ok = [v for v in vals if v is not None]
            table[model, name] = (statistics.median([v if math.isfinite(v) else math.inf
                                                     for v in ok]) if ok else None)
            times[model, name] = time.perf_counter() - t0
            print(f"  {name:14s} {model:14s} NLL {_fmt(table[model, name], 3):>9s} "
                  f"({times[model, name]:.1f} s)", flush=True)

    head = "| model | " + " | ".join(
        f"{n} ({shapes[n][2]}-D, {shapes[n][0]}/{shapes[n][1]})" for n in sets) + " |"
    sep = "|---|" + "---:|" * len(sets)
    print("\n### Held-out NLL (nats per row, standardised units; lower is better)\n")
    print(head)
    print(sep)
    for model in models:
        print(f"| {model} | " + " | ".join(_fmt(table[model, n]) for n in sets) + " |")

    print("\n### Difference to the Gaussian (model NLL - Gaussian NLL; < 0: better than the "
          "Gaussian)\n")
    print(head)
    print(sep)
    for model in models[1:]:
        cells = []
        for n in sets:
            v, g = table[model, n], table["gaussian", n]
            cells.append(SKIP if v is SKIP else "err" if v is None else _fmt(v - g))
        print(f"| {model} | " + " | ".join(cells) + " |")

    print("\n### Ratio to the Gaussian (model NLL / Gaussian NLL; only meaningful where the "
          "Gaussian NLL is positive)\n")
    print(head)
    print(sep)
    for model in models[1:]:
        cells = []
        for n in sets:
            v, g = table[model, n], table["gaussian", n]
            cells.append(SKIP if v is SKIP else "err" if v is None or g <= 0
                         else _fmt(v / g, 3))
        print(f"| {model} | " + " | ".join(cells) + " |")

    worse = [(m, n, table[m, n] - table["gaussian", n]) for m in models[1:] for n in sets
             if table[m, n] not in (None, SKIP) and table[m, n] > table["gaussian", n]]
    ran = sum(table[m, n] is not SKIP for m in models[1:] for n in sets)
    print(f"\ncells worse than the Gaussian: {len(worse)} of {ran} run"
          + "".join(f"\n  {m} on {n}: +{d:.2f} nats" for m, n, d in worse))
    print(f"total time {sum(times.values()):.0f} s")


if __name__ == "__main__":
    main()
