"""Data-parallel throughput: ``fit_density`` in 2 gloo processes vs 1, on this machine.

```
PYTHONPATH=. python benchmarks/distributed.py            # 5 rounds, 100 steps each
PYTHONPATH=. python benchmarks/distributed.py --quick    # 2 rounds, 30 steps
PYTHONPATH=. python benchmarks/distributed.py --batch-size 4096 --flows realnvp
```

One launch of 2 processes (1 torch thread each) runs every measurement, so the rounds can
interleave: in each round every (flow, processes) pair is timed once, in a rotating order;
the 1-process runs are rank 0 alone (``distributed=False``) while rank 1 waits in a
barrier. A measurement is the wall time of ``fit_density`` over ``--steps`` steps of a global
minibatch of ``--batch-size`` rows (2-D moons, 20k rows; one validation of 64 rows at each
end), after a warm-up fit; throughput = rows per second = steps * batch / time. Reported:
medians over rounds and the median of the per-round ratios 2-process / 1-process; also the
time of one gradient all-reduce (the flow's parameters) and the load average, because the
machine is shared: 2 processes can only beat 1 when a second core is actually free.

Measured here (2 cores shared with other jobs, load average 6-9 throughout, so every number
is noisy; the per-round ratios show the spread):

| flow | batch | 1 proc (rows/s) | 2 procs (rows/s) | 2/1 (rounds) | all-reduce (ms) |
|---|---|---|---|---|---|
| realnvp | 1024 | 34,769 | 23,090 | 0.78 (0.56, 0.78, 1.49, 0.79, 0.52) | 10.9 |
| nsf | 1024 | 25,346 | 18,918 | 0.75 (0.76, 0.75, 0.83, 0.40, 0.68) | 3.8 |
| realnvp | 4096 | 17,270 | 22,757 | 1.09 (1.43, 0.90, 1.12, 1.09, 1.04) | 5.2 |
| nsf | 4096 | 22,615 | 24,456 | 1.13 (1.13, 1.06, 0.90, 1.16, 1.24) | 11.7 |

(batch 1024: 100 steps x 5 rounds; 4096: 50 steps x 5 rounds.) With no free core a second
process only adds the all-reduce (a few ms per step on a loaded machine, where a rank
waiting for a descheduled peer counts too) and halves nothing; at batch 4096 the halved
compute per rank outweighs it. On an idle 2-core machine expect up to ~2x at large batches.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import pyro_flows_ext as pfe  # noqa: E402
from pyro_flows_ext import distributed as D  # noqa: E402
from pyro_flows_ext.infer.density import fit_density  # noqa: E402


def _time_fit(name, steps, batch, distributed):
    torch.manual_seed(0)
    flow = pfe.flows.get_builder(name)(2)
    train = pfe.datasets.toy("moons", 20_000, seed=0)
    val = pfe.datasets.toy("moons", 64, seed=1)
    kwargs = dict(batch_size=batch, val_data=val, patience=None, progress=False,
                  distributed=distributed)
    fit_density(flow, train, num_steps=5, eval_every=5, **kwargs)  # warm-up
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    fit_density(flow, train, num_steps=steps, eval_every=steps, **kwargs)
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    if distributed:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slower rank sets the pace
    return elapsed.item(), flow


def _allreduce_ms(flow, reps=50):
    params = [p for p in flow.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        D.all_reduce_gradients(params, 1.0, [0.0, 0.0])
    return 1e3 * (time.perf_counter() - start) / reps


def worker(flows, batch, steps, rounds):
    rank = D.get_rank()
    pairs = [(name, nproc) for name in flows for nproc in (1, 2)]
    times = {pair: [] for pair in pairs}
    comm = {}
    for r in range(rounds):
        for name, nproc in pairs[r % len(pairs):] + pairs[:r % len(pairs)]:
            if nproc == 1:
                if rank == 0:
                    times[name, 1].append(_time_fit(name, steps, batch, False)[0])
                dist.barrier()
            else:
                elapsed, flow = _time_fit(name, steps, batch, True)
                times[name, 2].append(elapsed)
                if name not in comm:
                    comm[name] = _allreduce_ms(flow)
    return {"times": times, "comm": comm, "params": {
        name: sum(p.numel() for p in pfe.flows.get_builder(name)(2).parameters())
        for name in flows}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", nargs="+", default=["realnvp", "nsf"])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 30, 2
    load_before = os.getloadavg()
    result = D.launch(worker, 2, args.flows, args.batch_size, args.steps, args.rounds,
                      timeout=3600)[0]
    load_after = os.getloadavg()
    rows_per_run = args.steps * args.batch_size
    print(f"2 processes vs 1, gloo on CPU, 1 thread each; global batch {args.batch_size}, "
          f"{args.steps} steps x {args.rounds} interleaved rounds (medians); "
          f"{os.cpu_count()} cores; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after\n")
    print("| flow | params | 1 process (rows/s) | 2 processes (rows/s) | ratio 2/1 "
          "| all-reduce (ms) |")
    print("|---|---|---|---|---|---|")
    for name in args.flows:
        one, two = result["times"][name, 1], result["times"][name, 2]
        ratios = [a / b for a, b in zip(one, two)]
        print(f"| {name} | {result['params'][name]:,} | "
              f"{rows_per_run / statistics.median(one):,.0f} | "
              f"{rows_per_run / statistics.median(two):,.0f} | "
              f"{statistics.median(ratios):.2f} (rounds: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}) | {result['comm'][name]:.2f} |")


if __name__ == "__main__":
    main()
