"""Continuous flows side by side: our CNF (Hutchinson, exact, Hutchinson + RNODE, trained by
flow matching), OT-Flow, zuko's CNF and a plain torchdiffeq FFJORD written here, on moons,
checkerboard and 8gaussians (FFJORD's scales). One run, one torch thread; the methods'
training steps are interleaved (one step of each in turn) so load on a shared machine falls
on all of them alike, and step times are thread CPU time.

Reported per method and data set: CPU ms per training step (median), function evaluations
per step (forward solve / backward pass; flow matching: network evaluations), test NLL with
the exact trace in eval mode, samples per CPU second.

    OMP_NUM_THREADS=1 python benchmarks/cnf.py --steps 100 --n-test 1000
    OMP_NUM_THREADS=1 python benchmarks/cnf.py --steps 100 --methods fm,otflow,plain --equal-time

Equal-time mode (what the issue's targets are measured by; tables in benchmarks/cnf.md):

    OMP_NUM_THREADS=1 python benchmarks/cnf.py --budget 30 --seeds 0,1 --methods plain,otflow,fm \
        --short otflow=0.34,fm=0.34
    OMP_NUM_THREADS=1 python benchmarks/cnf.py --budget 30 --seeds 0,1,2 \
        --methods zuko,hutchinson,exact,rnode --reference zuko

Every method gets the same thread-CPU-time budget (interleaved steps), the test NLL (exact
trace; OT-Flow with 64 RK4 steps, converged) is taken at CPU-time checkpoints, and each
method's time to reach the reference's final NLL is read off its curve; "speedup" is the
reference's time over the method's. OT-Flow trains at its own learning rate (2e-2, halved
every 150 steps: --otflow-lr, --otflow-drop); the others at --lr (5e-3).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import CLOCK  # noqa: E402

import pyro_flows_ext as pfe  # noqa: E402
from pyro_flows_ext.continuous import regularization  # noqa: E402
from pyro_flows_ext.infer.flow_matching import ot_pairing  # noqa: E402

FLOORS = {"moons": 1.676, "checkerboard": math.log(32), "8gaussians": 2.83}


# -- a plain torchdiffeq FFJORD (the reference's structure, nothing of ours) -----------------

class PlainODEFunc(nn.Module):
    """FFJORD's toy dynamics: concat-squash MLP (64, 64, 64), tanh; Hutchinson with a Gaussian
    probe set once per solve (``self.e``), exact trace by one autograd call per dimension."""

    def __init__(self, dim=2, hidden=(64, 64, 64)):
        super().__init__()
        sizes = [dim, *hidden, dim]
        self.lin = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.gate = nn.ModuleList(nn.Linear(1, b) for b in sizes[1:])
        self.shift = nn.ModuleList(nn.Linear(1, b, bias=False) for b in sizes[1:])
        self.e, self.exact, self.nfe = None, False, 0

    def net(self, t, x):
        tt = t.expand(x.shape[0], 1)
        h = x
        for i, (lin, gate, shift) in enumerate(zip(self.lin, self.gate, self.shift)):
            h = lin(h) * torch.sigmoid(gate(tt)) + shift(tt)
            if i < len(self.lin) - 1:
                h = torch.tanh(h)
        return h

    def forward(self, t, state):
        self.nfe += 1
        x = state[0]
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_()
            dx = self.net(t, x)
            if self.exact:
                div = sum(torch.autograd.grad(dx[:, i].sum(), x, create_graph=True)[0][:, i]
                          for i in range(x.shape[1]))
            else:
                e_dx = torch.autograd.grad(dx, x, self.e, create_graph=True)[0]
                div = (e_dx * self.e).sum(1)
        return dx, -div


class PlainFFJORD(nn.Module):
    def __init__(self, dim=2):
        super().__init__()
        self.func = PlainODEFunc(dim)

    def log_prob(self, x):
        from torchdiffeq import odeint_adjoint

        self.func.exact = not self.training
        self.func.e = torch.randn_like(x)
        zeros = x.new_zeros(len(x))
        ts = torch.tensor([0.0, 1.0])
        z, dlogp = odeint_adjoint(self.func, (x, zeros), ts, rtol=1e-5, atol=1e-5,
                                  method="dopri5", adjoint_params=tuple(self.parameters()))
        z, dlogp = z[-1], dlogp[-1]
        return -0.5 * z.square().sum(1) - math.log(2 * math.pi) - dlogp

    @torch.no_grad()
    def sample(self, n):
        from torchdiffeq import odeint

        self.func.exact = True
        z = torch.randn(n, 2)
        ts = torch.tensor([1.0, 0.0])
        x, _ = odeint(self.func, (z, z.new_zeros(n)), ts, rtol=1e-5, atol=1e-5)
        return x[-1]


# -- the compared methods --------------------------------------------------------------------

class Method:
    def __init__(self, name, module, step, log_prob, sample, nfe):
        self.name, self.module, self.step_fn = name, module, step
        self.log_prob, self.sample, self.nfe = log_prob, sample, nfe
        self.times, self.nfes = [], []


def ours(name, data, lr, **kwargs):
    flow = pfe.flows.ffjord(2, gaussian_start=False, adjoint=True, **kwargs)
    layer = flow.transforms[0]
    opt = torch.optim.Adam(flow.parameters(), lr)

    def step(x):
        loss = -flow.log_prob(x).mean() + regularization(flow)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return Method(name, flow, step, flow.log_prob, lambda n: flow.sample((n,)),
                  lambda: (layer.nfe_forward, layer.nfe_backward))


def flow_matching(data, lr):
    flow = pfe.flows.ffjord(2, gaussian_start=False)
    layer = flow.transforms[0]
    opt = torch.optim.Adam(flow.parameters(), lr)

    def step(x1):
        x0 = torch.randn_like(x1)
        x0 = x0[ot_pairing(x0, x1)]
        t = torch.rand(len(x1))
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        loss = (layer.velocity(t, xt) - (x1 - x0)).square().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return Method("CNF flow matching (OT)", flow, step, flow.log_prob,
                  lambda n: flow.sample((n,)), lambda: (1, 1))


OT_LR = 2e-2  # OT-Flow's own learning rate (--otflow-lr): it trains stably at 4x the CNFs'
OT_DROP = 150  # ... halved every OT_DROP steps (--otflow-drop; 0: constant)


def ot_flow(data, lr, name=None, **kwargs):
    # scored with 64 RK4 steps: converged (a 4-step-trained potential can be stiff enough
    # that the default 12 steps are off by tenths of a nat)
    kwargs.setdefault("eval_steps", 64)
    flow = pfe.flows.ot_flow(2, gaussian_start=False, **kwargs)
    layer = flow.transforms[0]
    opt = torch.optim.Adam(flow.parameters(), OT_LR)
    # halved every OT_DROP steps (Onken et al. halve every 100): at a constant 2e-2 the
    # test NLL oscillates by tenths of a nat once it is near its best
    sched = torch.optim.lr_scheduler.StepLR(opt, OT_DROP, 0.5) if OT_DROP else None

    def step(x):
        loss = -flow.log_prob(x).mean() + regularization(flow)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        return loss.item()

    name = name or f"OT-Flow (RK4 {layer.num_steps} steps)"
    return Method(name, flow, step, flow.log_prob,
                  lambda n: flow.sample((n,)), lambda: (layer.nfe_forward, layer.nfe_backward))


def zuko_cnf(data, lr):
    import zuko  # only in this process: zuko switches off torch's argument validation

    flow = zuko.flows.CNF(2, hidden_features=(64, 64, 64), atol=1e-5, rtol=1e-5)
    counter = {"n": 0}
    flow.transform.ode.register_forward_hook(lambda *a: counter.__setitem__("n", counter["n"] + 1))
    opt = torch.optim.Adam(flow.parameters(), lr)
    last = {"f": 0, "b": 0}

    def step(x):
        counter["n"] = 0
        loss = -flow().log_prob(x).mean()
        last["f"] = counter["n"]
        opt.zero_grad()
        loss.backward()
        last["b"] = counter["n"] - last["f"]
        opt.step()
        return loss.item()

    return Method("zuko CNF (exact)", flow, step, lambda x: flow().log_prob(x),
                  lambda n: flow().sample((n,)), lambda: (last["f"], last["b"]))


def plain(data, lr):
    model = PlainFFJORD()
    opt = torch.optim.Adam(model.parameters(), lr)
    last = {"f": 0, "b": 0}

    def step(x):
        model.func.nfe = 0
        loss = -model.log_prob(x).mean()
        last["f"] = model.func.nfe
        opt.zero_grad()
        loss.backward()
        last["b"] = model.func.nfe - last["f"]
        opt.step()
        return loss.item()

    return Method("plain torchdiffeq FFJORD", model, step, model.log_prob, model.sample,
                  lambda: (last["f"], last["b"]))


BUILDERS = {
    "hutchinson": lambda d, lr: ours("CNF hutchinson", d, lr),
    "exact": lambda d, lr: ours("CNF exact", d, lr, trace="exact"),
    "rnode": lambda d, lr: ours("CNF hutchinson + RNODE (0.1)", d, lr, kinetic_weight=0.1,
                                jacobian_weight=0.1),
    "fm": flow_matching, "otflow": ot_flow, "zuko": zuko_cnf, "plain": plain,
}


def make(key, data, lr):
    """A method by key; ``rnode:W`` is RNODE with both weights ``W``."""
    if key.startswith("rnode:"):
        w = float(key.split(":")[1])
        return ours(f"CNF hutchinson + RNODE ({w:g})", data, lr, kinetic_weight=w,
                    jacobian_weight=w)
    return BUILDERS[key](data, lr)


def run(name, steps, batch, n_test, lr, seed, keys, equal_time):
    torch.manual_seed(seed)
    train = pfe.datasets.toy(name, 20000, seed)
    test = pfe.datasets.toy(name, n_test, seed + 1)
    methods = [make(k, train, lr) for k in keys]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = train[torch.randint(0, len(train), (batch,), generator=gen)]
        for m in methods:  # interleaved: one step of each in turn
            m.module.train()
            start = CLOCK()
            m.step_fn(x)
            m.times.append(CLOCK() - start)
            m.nfes.append(m.nfe())
    if equal_time:  # the cheap methods go on until they have used the plain FFJORD's CPU time
        budget = sum(next(m for m in methods if m.name.startswith("plain")).times)
        for m in methods:
            if m.name.startswith(("CNF flow matching", "OT-Flow")):
                m.module.train()
                while sum(m.times) < budget:
                    x = train[torch.randint(0, len(train), (batch,), generator=gen)]
                    start = CLOCK()
                    m.step_fn(x)
                    m.times.append(CLOCK() - start)
                    m.nfes.append(m.nfe())
                m.name += f" [{len(m.times)} steps]"
    rows = []
    for m in methods:
        m.module.eval()
        start = CLOCK()
        with torch.no_grad():
            nll = -m.log_prob(test).mean().item()
        score_s = CLOCK() - start
        start = CLOCK()
        with torch.no_grad():
            m.sample(1000)
        sample_s = CLOCK() - start
        tail = m.nfes[len(m.nfes) // 2:]  # the second half of training
        rows.append({"data": name, "method": m.name,
                     "ms_per_step": 1e3 * statistics.median(m.times),
                     "nfe_forward": statistics.mean(f for f, _ in tail),
                     "nfe_backward": statistics.mean(b for _, b in tail),
                     "test_nll": nll, "floor": FLOORS[name],
                     "score_per_s": n_test / score_s, "samples_per_s": 1000 / sample_s})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _crossing(curve, target):
    """CPU seconds at which a curve of ``(seconds, steps, nll)`` checkpoints first reaches
    ``target`` (linear between checkpoints; ``None`` if it never does)."""
    prev = (0.0, math.inf)
    for sec, _, nll in curve:
        if nll <= target:
            t0, n0 = prev
            if not math.isfinite(n0):
                return sec
            return t0 + (sec - t0) * (n0 - target) / (n0 - nll)
        prev = (sec, nll)
    return None


def run_budget(name, budget, batch, n_test, lr, seed, keys, checkpoints, short, reference,
               targets=None):
    """Equal CPU-time budgets: every method trains (interleaved, one step of each in turn
    while it still has budget) until its own thread CPU time reaches ``budget`` seconds
    (``short * budget`` for the methods in ``short``'s keys), with the test NLL (exact trace,
    eval mode, not timed) at CPU-time checkpoints ``budget * checkpoints``. The reference's
    final NLL is the target; each method's time to reach it is read off its curve. Without
    the reference among ``keys``, ``targets[(name, seed)] = (target, reference's time)`` from
    an earlier run of it (``--targets``)."""
    torch.manual_seed(seed)
    train = pfe.datasets.toy(name, 20000, seed)
    test = pfe.datasets.toy(name, n_test, seed + 1)
    methods = [make(k, train, lr) for k in keys]
    for key, m in zip(keys, methods):
        m.key = key
        frac = short.get(key, 1.0)
        m.marks = [budget * c for c in checkpoints if c <= frac + 1e-9]
        m.curve = []
    gen = torch.Generator().manual_seed(seed)
    active = list(methods)
    while active:
        x = train[torch.randint(0, len(train), (batch,), generator=gen)]
        for m in list(active):
            m.module.train()
            start = CLOCK()
            m.step_fn(x)
            m.times.append(CLOCK() - start)
            m.nfes.append(m.nfe())
            used = sum(m.times)
            if used >= m.marks[len(m.curve)]:
                m.module.eval()
                with torch.no_grad():
                    nll = -m.log_prob(test).mean().item()
                m.curve.append((used, len(m.times), nll))
                if len(m.curve) == len(m.marks):
                    active.remove(m)
    ref = next((m for m in methods if m.key == reference), None)
    if ref is None:
        target, ref_time = targets[(name, seed)]
    else:
        target = ref.curve[-1][2]
        ref_time = _crossing(ref.curve, target)
    rows = []
    for m in methods:
        reach = _crossing(m.curve, target)
        tail = m.nfes[len(m.nfes) // 2:]
        rows.append({"data": name, "seed": seed, "method": m.name, "key": m.key,
                     "steps": len(m.times), "cpu_s": sum(m.times),
                     "ms_per_step": 1e3 * statistics.median(m.times),
                     "nfe_forward": statistics.mean(f for f, _ in tail),
                     "nfe_backward": statistics.mean(b for _, b in tail),
                     "final_nll": m.curve[-1][2], "target": target,
                     "reach_s": reach, "speedup": None if reach is None else ref_time / reach,
                     "curve": m.curve, "floor": FLOORS[name]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--data", default="moons,checkerboard,8gaussians")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--methods", default=",".join(BUILDERS),
                        help=f"comma-separated subset of {','.join(BUILDERS)}")
    parser.add_argument("--equal-time", action="store_true",
                        help="after the interleaved steps, train flow matching and OT-Flow on "
                             "until each has used the plain FFJORD's CPU time")
    parser.add_argument("--budget", type=float, default=None,
                        help="equal CPU-time mode: seconds of thread CPU time per method")
    parser.add_argument("--checkpoints", default="0.05,0.1,0.15,0.2,0.25,0.33,0.5,0.75,1",
                        help="fractions of --budget at which the test NLL is taken")
    parser.add_argument("--short", default="",
                        help="key=fraction,...: methods that stop at that fraction of --budget")
    parser.add_argument("--reference", default="plain",
                        help="method whose final NLL is the target in --budget mode")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (--budget mode)")
    parser.add_argument("--targets", default=None,
                        help="JSON of an earlier --budget run holding the reference's rows, "
                             "when the reference is not rerun")
    parser.add_argument("--otflow-lr", type=float, default=OT_LR)
    parser.add_argument("--otflow-drop", type=int, default=OT_DROP)
    args = parser.parse_args()
    globals()["OT_LR"], globals()["OT_DROP"] = args.otflow_lr, args.otflow_drop
    torch.set_num_threads(1)
    start = time.time()
    rows = []
    if args.budget:
        checkpoints = [float(c) for c in args.checkpoints.split(",")]
        short = {k: float(v) for k, v in (p.split("=") for p in args.short.split(",") if p)}
        seeds = [int(s) for s in (args.seeds or str(args.seed)).split(",")]
        targets = None
        if args.targets:
            with open(args.targets) as f:
                targets = {(r["data"], r["seed"]): (r["final_nll"], r["reach_s"])
                           for r in json.load(f) if r["key"] == args.reference}
        for name in args.data.split(","):
            for seed in seeds:
                rows += run_budget(name, args.budget, args.batch, args.n_test, args.lr, seed,
                                   args.methods.split(","), checkpoints, short, args.reference,
                                   targets)
        print(f"\nbudget {args.budget} s CPU per method, batch {args.batch}, lr {args.lr}; "
              f"{time.time() - start:.0f} s wall")
        print(f"{'data':<13}{'seed':>4}  {'method':<36}{'steps':>6}{'ms/step':>9}{'NFE f/b':>10}"
              f"{'NLL':>8}{'target':>8}{'reach s':>9}{'speedup':>8}")
        for r in rows:
            reach = "-" if r["reach_s"] is None else f"{r['reach_s']:.1f}"
            speed = "-" if r["speedup"] is None else f"{r['speedup']:.1f}"
            print(f"{r['data']:<13}{r['seed']:>4}  {r['method']:<36}{r['steps']:>6}"
                  f"{r['ms_per_step']:>9.1f}{r['nfe_forward']:>5.0f}/{r['nfe_backward']:<4.0f}"
                  f"{r['final_nll']:>8.3f}{r['target']:>8.3f}{reach:>9}{speed:>8}")
    else:
        for name in args.data.split(","):
            rows += run(name, args.steps, args.batch, args.n_test, args.lr, args.seed,
                        args.methods.split(","), args.equal_time)
        print(f"\n{args.steps} steps, batch {args.batch}, lr {args.lr}, {args.n_test} test "
              f"points; {time.time() - start:.0f} s wall")
        print(f"{'data':<13}{'method':<40}{'ms/step':>9}{'NFE f/b':>12}{'NLL':>8}{'floor':>7}"
              f"{'samples/s':>11}")
        for r in rows:
            print(f"{r['data']:<13}{r['method']:<40}{r['ms_per_step']:>9.1f}"
                  f"{r['nfe_forward']:>6.0f}/{r['nfe_backward']:<5.0f}{r['test_nll']:>8.3f}"
                  f"{r['floor']:>7.3f}{r['samples_per_s']:>11.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
