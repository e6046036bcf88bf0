"""torch.compile benchmark: eager vs compiled training steps and log_prob, per builder.

For each builder (default settings, 2-D moons, minibatch 512, one CPU thread):

a. graph report: ``torch._dynamo.explain`` of the training loss ``-flow.log_prob(x).mean()``
   (train mode) and of ``flow.log_prob`` (eval mode): graph count and break reasons;
b. compile time: the first compiled training step (forward + backward) and the first
   compiled eval ``log_prob`` call, reported separately from the rates;
c. training steps/s: ``loss = nll(x)``, ``zero_grad``, ``backward``, ``Adam.step``, with
   ``nll`` eager or :func:`pyro_flows_ext._compile.compiled_nll` (inductor, dynamic=False);
d. log_prob throughput (points/s) on 4096 points under ``torch.no_grad()`` in eval mode.

c and d run in interleaved rounds (each round times eager and compiled once, the order
alternating), timed with the thread's CPU clock; the table gives medians and the ratio
compiled / eager. Both variants train the same flow object, so they see the same parameters.

    python benchmarks/compile.py [--builders realnvp nsf ...] [--rounds R] [--steps N]
    python benchmarks/compile.py --explain-only        # graph counts only (fast)
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

import pyro_flows_ext as pfe  # noqa: E402
from pyro_flows_ext._compile import compiled_nll, graph_report  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _common import CLOCK  # noqa: E402

BUILDERS = ["realnvp", "nsf", "maf", "iaf", "residual_flow"]


def build(name, seed=0):
    torch.manual_seed(seed)
    flow = pfe.flows.FLOWS[name](2)
    data = pfe.datasets.toy("moons", 4096, seed)
    pfe.infer.fit_density(flow, data, num_steps=1, progress=False)  # data-dependent init
    flow.train()
    return flow, data


def explain(name):
    flow, data = build(name)
    x = data[:512]
    train_graphs, train_breaks = graph_report(lambda v: -flow.log_prob(v).mean(), x)
    flow.eval()
    with torch.no_grad():
        eval_graphs, eval_breaks = graph_report(flow.log_prob, x)
    return train_graphs, train_breaks, eval_graphs, eval_breaks


def step_block(flow, opt, nll, data, steps, gen):
    def run():
        for _ in range(steps):
            loss = nll(data[torch.randint(0, len(data), (512,), generator=gen)])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return run


def bench(name, rounds, steps):
    flow, data = build(name)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
    eager, compiled = compiled_nll(flow, enabled=False), compiled_nll(flow, enabled=True)
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    step_block(flow, opt, compiled, data, 1, gen)()
    compile_train = time.perf_counter() - start

    flow.eval()
    test = data[:4096]
    lp_eager = flow.log_prob
    lp_compiled = torch.compile(flow.log_prob, dynamic=False)
    start = time.perf_counter()
    with torch.no_grad():
        lp_compiled(test)
    compile_eval = time.perf_counter() - start
    with torch.no_grad():
        diff = (lp_compiled(test) - lp_eager(test)).abs().max().item()

    rates = {k: [] for k in ("train_eager", "train_compiled", "lp_eager", "lp_compiled")}
    for r in range(rounds):
        order = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
        for which in order:
            flow.train()
            nll = eager if which == "eager" else compiled
            t0 = CLOCK()
            step_block(flow, opt, nll, data, steps, gen)()
            rates[f"train_{which}"].append(steps / (CLOCK() - t0))
            flow.eval()
            lp = lp_eager if which == "eager" else lp_compiled
            with torch.no_grad():
                t0 = CLOCK()
                for _ in range(5):
                    lp(test)
                rates[f"lp_{which}"].append(5 * len(test) / (CLOCK() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return med, compile_train, compile_eval, diff


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--builders", nargs="+", default=BUILDERS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--explain-only", action="store_true")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("\n| builder | train graphs | eval graphs | break reasons |\n|---|---|---|---|")
    for name in args.builders:
        tg, tb, eg, eb = explain(name)
        print(f"| {name} | {tg} | {eg} | {'; '.join(tb + eb) or 'none'} |", flush=True)
    if args.explain_only:
        return
    print("\n| builder | compile train (s) | compile eval (s) | train steps/s eager | compiled "
          "| ratio | log_prob pts/s eager | compiled | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.builders:
        med, ct, ce, diff = bench(name, args.rounds, args.steps)
        print(f"| {name} | {ct:.1f} | {ce:.1f} | {med['train_eager']:.1f} | "
              f"{med['train_compiled']:.1f} | {med['train_compiled'] / med['train_eager']:.2f} | "
              f"{med['lp_eager']:.3g} | {med['lp_compiled']:.3g} | "
              f"{med['lp_compiled'] / med['lp_eager']:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
