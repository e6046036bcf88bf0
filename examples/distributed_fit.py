"""Data-parallel density fitting with ``torchrun``: every process runs this script.

Run (one node, 2 processes, 1 thread each)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/distributed_fit.py

or as one plain process: ``python examples/distributed_fit.py``. Every rank builds the same
flow and loads the same data; ``fit_density`` sees the process group and trains data-parallel
(each rank scores its share of every global minibatch, gradients are all-reduced); rank 0
writes the checkpoint and prints. ``--resume`` continues from rank 0's checkpoint.
"""

import argparse

import torch
import torch.distributed as dist

import pyro_flows_ext as pfe
from pyro_flows_ext import distributed as D
from pyro_flows_ext.infer.density import fit_density, mean_nll


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow", default="realnvp")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=512, help="global minibatch")
    parser.add_argument("--checkpoint", default="runs/distributed_moons.pt")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    started = D.init_from_env()  # gloo on CPU (pass device="cuda" for nccl, one GPU per rank)
    try:
        train = pfe.datasets.toy("moons", 20_000, seed=0)
        test = pfe.datasets.toy("moons", 5_000, seed=1)
        torch.manual_seed(0)  # the same flow on every rank and in every run (rank 0's is used)
        flow = pfe.flows.get_builder(args.flow)(2)
        history = fit_density(flow, train, num_steps=args.steps, batch_size=args.batch_size,
                              checkpoint=args.checkpoint, resume=args.resume,
                              progress=D.is_main_process())
        if D.is_main_process():
            print(f"{D.get_world_size()} process(es), {len(history['loss'])} steps: "
                  f"best validation NLL {history['best_val_nll']:.4f} at step "
                  f"{history['best_step']}, test NLL {mean_nll(flow, test):.4f}; "
                  f"checkpoint {args.checkpoint}")
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
