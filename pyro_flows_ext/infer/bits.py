r"""Bits per dimension of discrete (``k``-level) data: the dequantization bound, its
importance-weighted estimate, and the per-pixel categorical baseline.

For :math:`x \in \{0, \dots, k-1\}^D` scored by a flow whose data end is a dequantization
(:class:`~pyro_flows_ext.surjections.UniformDequantization` or
:class:`~pyro_flows_ext.surjections.VariationalDequantization`, usually after a
:class:`~pyro_flows_ext.transforms.Logit`), ``flow.log_prob(x)`` is a draw of
:math:`\log p(x + u) - \log q(u \mid x)` with :math:`u \sim q`; its mean is a lower bound on
:math:`\log P(x)` and bits/dim is :math:`-\log P(x) / (D \ln 2)`, so the values here are upper
bounds on the model's true bits/dim (the IW one tighter).
"""

import math

import torch

from .bounds import iw_log_prob

__all__ = ["bits_per_dim", "categorical_bits_per_dim", "iw_bits_per_dim"]


def _dequantizer(flow):
    t = flow.transforms[-1] if getattr(flow, "transforms", None) else None
    if not getattr(t, "discrete", False):
        raise ValueError("bits/dim of discrete data needs a flow whose data end (last layer) is "
                         "a dequantization (UniformDequantization or VariationalDequantization, "
                         "e.g. pfe.flows.glow(shape, dequantize='uniform', k=...)); this flow "
                         f"ends with {type(t).__name__}, so its log_prob is a continuous density")
    return t


def _prepare(flow, x):
    from .density import as_data

    _dequantizer(flow).check_data(torch.as_tensor(x))
    return as_data(x, flow)


def _scored(flow, x, score, chunk_size):
    """``score(part)`` over chunks of ``x`` in eval mode without gradients, concatenated."""
    was_training = flow.training
    flow.eval()
    try:
        with torch.no_grad():
            return torch.cat([score(part) for part in x.split(chunk_size)])
    finally:
        flow.train(was_training)


def _to_bits(log_p, flow, per_example):
    bits = -log_p / (flow.event_shape.numel() * math.log(2))
    return bits if per_example else bits.mean().item()


def bits_per_dim(flow, x, chunk_size=1000, per_example=False):
    r"""The dequantization bound in bits per dimension, :math:`-\log P(x) / (D \ln 2)` with
    one draw of the noise per event (:math:`E[\text{result}] \ge` the model's bits/dim).

    Args:
        flow: a :class:`~pyro_flows_ext.Flow` whose last layer is a dequantization.
        x: integer levels ``(N, *event_shape)`` (any numeric dtype).
        chunk_size: events scored per call.
        per_example: return the ``(N,)`` values instead of their mean.
    Returns: the mean over the events (a float), or an ``(N,)`` tensor. Scored in eval mode
    without gradients.
    """
    x = _prepare(flow, x)
    return _to_bits(_scored(flow, x, flow.log_prob, chunk_size), flow, per_example)


def iw_bits_per_dim(flow, x, num_samples=100, chunk_size=None, per_example=False):
    r"""Importance-weighted bits/dim: :math:`-\log \frac1K \sum_k P_k(x) / (D \ln 2)` over
    ``K = num_samples`` draws of the dequantization noise (:func:`~.iw_log_prob`), what SurVAE
    Flows and Flow++ report with ``K = 1000``; it decreases towards the model's bits/dim as
    ``K`` grows.

    Args:
        flow, x, per_example: as in :func:`bits_per_dim`.
        num_samples: ``K``.
        chunk_size: events per call (default: about 4096 scored images per call, events times
            draws).
    """
    x = _prepare(flow, x)
    if chunk_size is None:
        chunk_size = max(1, 4096 // num_samples)
    draws = max(1, min(num_samples, 4096 // chunk_size))

    def score(part):
        return iw_log_prob(flow, part, num_samples, chunk_size=draws)

    return _to_bits(_scored(flow, x, score, chunk_size), flow, per_example)


def categorical_bits_per_dim(train, test, k):
    r"""The independent per-pixel categorical baseline: each dimension ``d`` gets
    :math:`P_d(v) = (n_d(v) + 1) / (N + k)` from its counts in ``train`` (add-one / Laplace
    smoothing), and the test bits/dim is
    :math:`-\frac{1}{N' D} \sum_{n, d} \log_2 P_d(x_{nd})`, in closed form.

    Args:
        train: integer levels ``(N, *event)``.
        test: integer levels ``(N', *event)``.
        k: number of levels.
    Returns: a float.
    """
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    for name, t in (("train", train), ("test", test)):
        if t.is_floating_point() and not torch.equal(t, t.floor()):
            raise ValueError(f"{name} must hold integer levels 0 .. {k - 1}")
        if t.numel() and (t.min() < 0 or t.max() > k - 1):
            raise ValueError(f"{name} must hold levels 0 .. {k - 1}, got values from "
                             f"{t.min().item():g} to {t.max().item():g}")
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"train and test events differ: {tuple(train.shape[1:])} vs "
                         f"{tuple(test.shape[1:])}")
    a, b = train.reshape(len(train), -1).long(), test.reshape(len(test), -1).long()
    counts = torch.zeros(a.shape[1], k, dtype=torch.float64)
    counts.scatter_add_(1, a.T, torch.ones(a.T.shape, dtype=torch.float64))
    log_p = torch.log(counts + 1) - math.log(len(a) + k)  # (D, k)
    picked = log_p.gather(1, b.T)  # (D, N')
    return (-picked.mean() / math.log(2)).item()
