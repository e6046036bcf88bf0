"""Importance-weighted bounds for flows whose ``log_prob`` is a stochastic lower bound."""

import math

import torch
from pyro.infer.importance import vectorized_importance_weights

__all__ = ["iw_dreg_loss", "iw_log_prob"]


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


def iw_dreg_loss(num_particles=16, max_plate_nesting=None):
    r"""An SVI loss: the negative importance-weighted bound (IWAE, Burda et al. 2016)
    :math:`-\log \frac1K \sum_k w_k`, :math:`w_k = p(x, z_k) / q(z_k)`, with the doubly
    reparameterised gradient (DReG, Tucker et al. 2019) :math:`-\sum_k \tilde w_k^2
    \nabla \log w_k` (:math:`\tilde w` the self-normalised weights), which is unbiased and
    whose variance does not grow with ``K``. It trains the guide; a model with parameters
    is refused (theirs is the plain weighted gradient).

    DReG needs a guide whose ``log q`` carries only the path gradient:
    ``AutoFlowGuide(model, stl=True)``. Pyro's ``RenyiELBO`` (alpha < 1) with such a guide is
    *biased* (the dropped score term no longer averages to zero under self-normalised
    weights); with ``RenyiELBO`` use ``stl=False``, with this loss ``stl=True``.

    Usage: ``SVI(model, guide, optim, loss=iw_dreg_loss(16))``. The particles are vectorised
    (an outer plate), so the model must be vectorisable as for
    ``vectorize_particles=True``.

    Args:
        num_particles: ``K``.
        max_plate_nesting: as for Pyro's ELBOs (``None``: found by tracing the guide and the
            model once).
    Returns: ``loss(model, guide, *args, **kwargs)``, a scalar tensor.
    """
    if not (isinstance(num_particles, int) and num_particles >= 1):
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    nesting = [max_plate_nesting, False]  # plate depth, checked

    def loss(model, guide, *args, **kwargs):
        if not nesting[1]:  # once: the model's deepest plate and its parameters
            from ..diagnostics import _plate_depth, _traces  # lazily: diagnostics loads arviz

            model_trace, guide_trace = _traces(model, guide, args, kwargs)
            if any(site["type"] == "param" for site in model_trace.nodes.values()):
                raise NotImplementedError(
                    "iw_dreg_loss trains the guide only: the model has parameters (their "
                    "IWAE gradient needs weights w, not DReG's w^2); train them with "
                    "RenyiELBO(alpha=0) and AutoFlowGuide(..., stl=False)")
            if nesting[0] is None:
                nesting[0] = _plate_depth(model_trace, guide_trace)
            nesting[1] = True
        log_w = vectorized_importance_weights(model, guide, *args, num_samples=num_particles,
                                              max_plate_nesting=nesting[0], **kwargs)[0]
        if getattr(guide, "stl", None) is False:
            raise ValueError("iw_dreg_loss needs a guide whose log q carries only the path "
                             "gradient: build it with AutoFlowGuide(..., stl=True) (this "
                             "guide has stl=False)")
        weights = torch.softmax(log_w.detach(), 0)
        bound = torch.logsumexp(log_w.detach(), 0) - math.log(num_particles)
        surrogate = (weights.square() * log_w).sum()
        return -(surrogate - surrogate.detach() + bound)

    return loss
