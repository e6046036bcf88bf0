"""Importance-weighted bounds for flows whose ``log_prob`` is a stochastic lower bound."""

import math

import torch

__all__ = ["iw_log_prob"]


def iw_log_prob(flow, x, num_samples=100, chunk_size=None):
    r"""The importance-weighted bound :math:`\log \frac1K \sum_{k=1}^K \exp \ell_k(x)` on
    :math:`\log p(x)`, where :math:`\ell_k` are ``K`` independent draws of
    ``flow.log_prob(x)`` (each a lower bound whose exp is unbiased, e.g. through
    :class:`~pyro_flows_ext.surjections.Augment`). It is a lower bound on :math:`\log p(x)`
    that never decreases in expectation as ``K`` grows and tends to :math:`\log p(x)`
    (Burda et al., 2016). For an exact flow (``flow.is_exact``) it is ``flow.log_prob(x)``.

    The draws come from scoring ``x.expand((k,) + x.shape)``: a new tensor, so every
    stochastic layer draws afresh (and independently along the new dimension). Gradients
    flow, so the bound can also be a training objective (IWAE).

    Args:
        flow: a :class:`~pyro_flows_ext.Flow` (or anything with ``log_prob``).
        x: values ``(*batch, *event)``.
        num_samples: ``K``.
        chunk_size: draws scored per call (default: as many as keep about a million
            events per call); the chunks are combined exactly.
    Returns: ``(*batch)`` tensor.
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if getattr(flow, "is_exact", False):
        return flow.log_prob(x)
    event = len(getattr(flow, "event_shape", ()))
    n_events = max(math.prod(x.shape[: x.dim() - event]), 1)
    if chunk_size is None:
        chunk_size = max(1, min(num_samples, 1_000_000 // n_events))
    parts, done = [], 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        parts.append(torch.logsumexp(flow.log_prob(x.expand((k,) + x.shape)), 0))
        done += k
    total = torch.logsumexp(torch.stack(parts), 0) if len(parts) > 1 else parts[0]
    return total - math.log(num_samples)
