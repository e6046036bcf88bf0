"""Image density modelling on scikit-learn's digits (issue 14), in one run, on one CPU thread.

Test bits/dim on the 8x8 digits (17 levels, the fixed 1437 / 360 split of
``pfe.datasets.digits``) for

* ``glow-slice``: ``pfe.flows.glow((1, 8, 8), factor_out="slice")`` (two scales, Glow's
  split: the dropped half gets a Gaussian from a ResNet on the kept half),
* ``glow-maxpool``: the same with SurVAE's max-pool factor-out (hidden width matched),
* ``glow-slice-0.25``: the slice keeping a quarter of the squeezed channels, i.e. as many
  values as max-pooling keeps (the control that separates "fewer values kept" from
  "max instead of slice"),
* ``glow-slice-vdq``: ``glow-slice`` with variational dequantization (Flow++),
* ``realnvp-flat``: ``pfe.flows.realnvp(64)`` on the flattened 64-D vectors (hidden width
  matched), with the same Logit + uniform dequantization,
* ``normflows-glow``: normflows' ``MultiscaleFlow`` of ``GlowBlock`` s (the library's Glow
  recipe, two scales, hidden width matched) on ``(x + u) / 17``, if normflows imports,
* ``categorical``: independent per-pixel categoricals with add-one smoothing, fitted on the
  1437 training images, in closed form.

Every flow models ``k = 17``-level data through dequantization, so both numbers are upper
bounds on its bits/dim: ``bound`` is the single-draw dequantization bound
(``pfe.infer.bits_per_dim``: :math:`E_u[-\\log p(x + u) + \\log q(u|x)] / (D \\ln 2)`), ``iw``
the importance-weighted estimate over ``K`` draws (``pfe.infer.iw_bits_per_dim``; SurVAE
reports ``K = 1000``). Same budget for every flow: ``--steps`` Adam steps (lr 2e-3, cosine
decay), batch 64, the same minibatch sequence; 287 of the 1437 training images are held out
and each flow keeps its parameters from the best of ``--rounds`` validations (digits
overfit). Training runs in interleaved rounds (each round trains every model one block of
steps, in a rotating order) and speeds are medians over rounds of thread CPU time:
training images/s, and sampling images/s (1000 images under ``torch.no_grad()``).

    PYTHONPATH=. python benchmarks/images.py           # 1000 steps, K = 1000 (~10 CPU min)
    PYTHONPATH=. python benchmarks/images.py --quick   # 200 steps, K = 20 (~1.5 CPU min)

Result (defaults: 1000 steps, K = 1000, seed 0; one thread on a 2-core machine shared with
other work, so the speeds are thread CPU time: 23 minutes of wall time there, about 10 CPU
minutes, 5 of training and 4 of IW estimates):

| model | params | bits/dim (bound) | bits/dim (IW) | val bits/dim | train img/s | sample img/s |
|---|---|---|---|---|---|---|
| glow-slice | 121,520 | 2.119 | 1.976 | 2.140 | 1,273 | 14,911 |
| glow-maxpool | 123,280 | 2.178 | 2.053 | 2.203 | 1,104 | 8,635 |
| glow-slice-0.25 | 115,320 | 2.106 | 1.976 | 2.126 | 1,245 | 14,631 |
| glow-slice-vdq | 127,958 | 2.055 | 1.929 | 2.053 | 861 | 6,941 |
| realnvp-flat | 122,816 | 2.258 | 2.139 | 2.260 | 5,210 | 56,808 |
| normflows-glow | 121,344 | 2.407 | 2.271 | 2.409 | 1,181 | 8,250 |
| categorical | 1,088 | 2.422 | - | - | - | - |

SurVAE's claim that max-pool factor-out beats slicing does not hold at this scale: max-pool
is 0.06 (bound) / 0.08 (IW) bits/dim behind the half slice and 0.07 / 0.08 behind the
quarter slice, which keeps the same number of values (SurVAE's own CIFAR-10 numbers, 3.08
for slicing vs 3.09 for max-pooling, are parity, not a win). The quarter slice is as good as
the half slice, so it is not the number of values kept. Scored layer by layer (32 hidden
channels, 400 ``fit_density`` steps, both dropping 48 of 64 values at the first scale),
MaxPool2d contributes -53.5 nats per image (the position of each window's maximum and three
gaps, predicted from the maxima at the same location by an MLP over channels, without
spatial context) against -37.1 for ChannelSlice (a Gaussian from a convolutional ResNet over
the kept channels); the Glow steps on its data side recover about 12 of the 16 nats, leaving 3.7
nats (0.08 bits/dim) per image. (Before the truncated-normal gaps of commit 9543930, the
softplus-normal gaps' density vanished at d = 0, where the gaps of flat backgrounds pile up,
and max-pool stalled at 3.5 bits/dim.) The flat RealNVP is 0.14 (bound) / 0.16 (IW)
bits/dim behind the slice Glow but trains 4.1x faster; normflows' Glow recipe (no logit,
diagonal Gaussian bases) is 0.29 / 0.30 behind ours at the same size and speed. Variational
dequantization gains 0.06 (bound) and 0.05 (IW) bits/dim. Digits overfit: the validation
bits/dim stop improving after about 600-900 steps, and the best validated parameters are
kept.
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

import pyro_flows_ext as pfe  # noqa: E402
from pyro_flows_ext.infer import (  # noqa: E402
    bits_per_dim,
    categorical_bits_per_dim,
    iw_bits_per_dim,
)
from pyro_flows_ext.surjections import UniformDequantization  # noqa: E402
from pyro_flows_ext.transforms import Logit  # noqa: E402

K_LEVELS, D, BATCH, N_VAL = 17, 64, 64, 287
HIDDEN, STEPS_PER_LEVEL = 32, 4


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def matched(build, target, widths):
    """The width among ``widths`` whose model's parameter count is closest to ``target``."""
    return min(widths, key=lambda w: abs(n_params(build(w)) - target))


# -- the compared models -----------------------------------------------------------------------

class Ours:
    """A pfe flow over integer images ``(N, 1, 8, 8)`` (``flat``: over ``(N, 64)``)."""

    def __init__(self, name, flow, flat=False):
        self.name, self.module, self.flat = name, flow, flat

    def view(self, x):
        return x.reshape(len(x), D) if self.flat else x

    def nll(self, x):
        return -self.module.log_prob(self.view(x)).mean()

    def bits(self, x):
        return bits_per_dim(self.module, self.view(x))

    def iw_bits(self, x, k):
        return iw_bits_per_dim(self.module, self.view(x), num_samples=k)

    @torch.no_grad()
    def sample(self, n):
        return self.module.sample((n,)).reshape(n, 1, 8, 8)


class NormflowsGlow:
    """normflows' Glow recipe (MultiscaleFlow, GlowBlocks, Squeeze/Merge, diagonal Gaussian
    bases) on ``y = (x + u) / k`` in ``[0, 1)``; ``log P(x) >= log p(y) - D log k``."""

    def __init__(self, hidden, levels=2, steps=STEPS_PER_LEVEL):
        import normflows as nf

        self.name = "normflows-glow"
        q0, merges, flows = [], [], []
        for i in range(levels):
            block = [nf.flows.GlowBlock(2 ** (levels + 1 - i), hidden, split_mode="channel",
                                        scale=True) for _ in range(steps)]
            flows.append(block + [nf.flows.Squeeze()])
            if i > 0:
                merges.append(nf.flows.Merge())
                shape = (2 ** (levels - i), 8 // 2 ** (levels - i), 8 // 2 ** (levels - i))
            else:
                shape = (2 ** (levels + 1), 8 // 2 ** levels, 8 // 2 ** levels)
            q0.append(nf.distributions.DiagGaussian(shape))
        self.module = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)

    def _log_p(self, x):
        y = (x + torch.rand_like(x)) / K_LEVELS
        return self.module.log_prob(y, None) - D * math.log(K_LEVELS)

    def nll(self, x):
        return -self._log_p(x).mean()

    @torch.no_grad()
    def bits(self, x):
        self.module.eval()
        return (-self._log_p(x) / (D * math.log(2))).mean().item()

    @torch.no_grad()
    def iw_bits(self, x, k):
        self.module.eval()
        out = []
        for part in x.split(max(1, 4096 // k)):  # k draws of a few images in one batch
            lp = self._log_p(part.repeat(k, 1, 1, 1)).view(k, len(part))
            out.append(torch.logsumexp(lp, 0) - math.log(k))
        return (-torch.cat(out) / (D * math.log(2))).mean().item()

    @torch.no_grad()
    def sample(self, n):
        y, _ = self.module.sample(n)
        return (y * K_LEVELS).floor().clamp(0, K_LEVELS - 1)


def glow(factor_out, hidden, dequantize="uniform", slice_fraction=0.5):
    return pfe.flows.glow((1, 8, 8), levels=2, steps_per_level=STEPS_PER_LEVEL,
                          hidden_channels=hidden, factor_out=factor_out, dequantize=dequantize,
                          k=K_LEVELS, slice_fraction=slice_fraction)


def flat_realnvp(hidden):
    inner = pfe.flows.realnvp(D, num_layers=8, hidden_dims=(hidden, hidden),
                              gaussian_start=False)
    return pfe.Flow(None, list(inner.transforms) + [Logit(D, scale=K_LEVELS),
                                                    UniformDequantization(K_LEVELS)])


def build_models(use_normflows):
    target = n_params(glow("slice", HIDDEN))
    models = [Ours("glow-slice", glow("slice", HIDDEN))]
    w = matched(lambda h: glow("maxpool", h), target, range(HIDDEN, 2 * HIDDEN + 1, 2))
    models.append(Ours("glow-maxpool", glow("maxpool", w)))
    w = matched(lambda h: glow("slice", h, slice_fraction=0.25), target,
                range(HIDDEN - 8, HIDDEN + 9, 2))
    models.append(Ours("glow-slice-0.25", glow("slice", w, slice_fraction=0.25)))
    models.append(Ours("glow-slice-vdq", glow("slice", HIDDEN, "variational")))
    w = matched(flat_realnvp, target, range(32, 257, 4))
    models.append(Ours("realnvp-flat", flat_realnvp(w), flat=True))
    if use_normflows:
        try:
            w = matched(lambda h: NormflowsGlow(h).module, target, range(16, 129, 4))
            models.append(NormflowsGlow(w))
        except Exception as e:  # normflows missing or its API changed: report, go on
            print(f"normflows' Glow skipped: {type(e).__name__}: {e}")
    return models


# -- training and evaluation -------------------------------------------------------------------

def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def val_nll(model, val):
    model.module.eval()
    torch.manual_seed(123)  # the same noise draws for every validation
    return model.nll(val).item()


def run(args):
    torch.manual_seed(args.seed)
    train_all, test = pfe.datasets.digits("train").double(), pfe.datasets.digits("test").double()
    perm = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(args.seed))
    val, train = train_all[perm[:N_VAL]].float(), train_all[perm[N_VAL:]].float()
    test = test.float()
    models = build_models(not args.no_normflows)
    for m in models:
        m.opt = torch.optim.Adam(m.module.parameters(), lr=args.lr)
        m.sched = torch.optim.lr_scheduler.CosineAnnealingLR(m.opt, args.steps)
        m.best, m.best_state, m.train_rates, m.sample_rates = math.inf, None, [], []
        m.module.train()
        m.nll(train[:512]).detach()  # data-dependent initialisation (ActNorm) on a batch
    per_round = max(1, args.steps // args.rounds)
    gen = torch.Generator().manual_seed(args.seed)
    done = 0
    for r in range(args.rounds):
        steps = per_round if r < args.rounds - 1 else args.steps - done
        batches = [torch.randint(0, len(train), (BATCH,), generator=gen) for _ in range(steps)]
        order = models[r % len(models):] + models[: r % len(models)]
        for m in order:
            m.module.train()
            start = CLOCK()
            for idx in batches:
                loss = m.nll(train[idx])
                m.opt.zero_grad()
                loss.backward()
                m.opt.step()
                m.sched.step()
            m.train_rates.append(steps * BATCH / max(CLOCK() - start, 1e-9))
            v = val_nll(m, val)
            if v < m.best:
                m.best, m.best_state = v, snapshot(m.module)
            start = CLOCK()
            torch.manual_seed(r)
            m.sample(1000)
            m.sample_rates.append(1000 / max(CLOCK() - start, 1e-9))
        done += steps
        print(f"round {r + 1}/{args.rounds}: step {done}; validation NLL (nats/image) "
              + ", ".join(f"{m.name} {m.best:.1f}" for m in models), flush=True)
    rows = []
    for m in models:
        m.module.load_state_dict(m.best_state)
        m.module.eval()
        torch.manual_seed(args.seed)
        bound = m.bits(test)
        start = CLOCK()
        torch.manual_seed(args.seed)
        iw = m.iw_bits(test, args.iw_samples)
        rows.append({"model": m.name, "params": n_params(m.module), "bound": bound, "iw": iw,
                     "val_bits": m.best / (D * math.log(2)),
                     "train_img_s": statistics.median(m.train_rates),
                     "sample_img_s": statistics.median(m.sample_rates),
                     "iw_seconds": CLOCK() - start})
    rows.append({"model": "categorical", "params": D * K_LEVELS,
                 "bound": categorical_bits_per_dim(train_all, test, K_LEVELS), "iw": None})
    return rows


def table(rows, args):
    lines = [f"digits 8x8, 17 levels; test bits/dim (360 images); {args.steps} steps, batch "
             f"{BATCH}, K = {args.iw_samples} for the IW estimate; thread CPU time, 1 thread",
             "", "| model | params | bits/dim (bound) | bits/dim (IW) | val bits/dim | "
             "train img/s | sample img/s |", "|---|---|---|---|---|---|---|"]
    def cell(r, key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"

    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {cell(r, 'bound', '.3f')} | "
                     f"{cell(r, 'iw', '.3f')} | {cell(r, 'val_bits', '.3f')} | "
                     f"{cell(r, 'train_img_s', ',.0f')} | {cell(r, 'sample_img_s', ',.0f')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iw-samples", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-normflows", action="store_true")
    parser.add_argument("--quick", action="store_true", help="200 steps, 4 rounds, K = 20")
    parser.add_argument("--out", default=None, help="also write results.json and table.md here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.iw_samples = 200, 4, 20
    rows = run(args)
    text = table(rows, args)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
