"""Pieces shared by the benchmark scripts (imported from the scripts' own folder)."""

import importlib.util
import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CPU time of this thread: unlike wall time it does not count time spent descheduled while
# other processes share the cores (it still counts cache and memory-bandwidth contention).
CLOCK = time.thread_time


def load_example(name):
    """The module ``examples/models/<name>.py`` (its model and, where known, exact answers)."""
    spec = importlib.util.spec_from_file_location(
        "ex_" + name, os.path.join(ROOT, "examples", "models", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Peer:
    """One compared flow: a module (for parameters and train/eval), ``log_prob`` and
    ``sample(n)``."""

    def __init__(self, name, module, log_prob, sample):
        self.name, self.module, self.log_prob, self.sample = name, module, log_prob, sample

    def num_params(self):
        return sum(p.numel() for p in self.module.parameters())


def train(peer, data, steps, gen, batch=512):
    """``steps`` optimiser steps (``peer.opt``) on minibatches drawn with ``gen``; returns
    the last loss."""
    peer.module.train()
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=gen)]
        loss = -peer.log_prob(x).mean()
        peer.opt.zero_grad()
        loss.backward()
        peer.opt.step()
    return loss.item()


def rate(fn, n):
    """``n`` divided by the thread CPU time ``fn()`` takes."""
    start = CLOCK()
    fn()
    return n / max(CLOCK() - start, 1e-9)


@torch.no_grad()
def test_nll(peer, test):
    """Mean negative log-likelihood of ``test`` in eval mode."""
    peer.module.eval()
    return -peer.log_prob(test).mean().item()
