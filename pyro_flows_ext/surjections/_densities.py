"""Conditional densities used inside surjections: discrete choices (signs, pieces, positions)
and the continuous part a surjection drops or adds.

Each has ``log_prob(y, c)`` and ``sample_and_log_prob(c)`` (a reparameterised draw with its
log-density in one pass), so a layer never scores its own draw twice.
"""

import math

import torch
from torch import nn

from ..nn import MADE, MLP
from ..transforms.element_maps import soft_clamp

__all__ = ["AutoregressiveCategorical", "ConditionalNormal", "FlowDensity", "as_density",
           "gumbel_argmax", "softplus_inverse"]


def gumbel_argmax(logits):
    """A draw from ``Categorical(logits=logits)`` over the last dimension (``-inf`` entries are
    never drawn), by the Gumbel-max trick."""
    u = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    return (logits - (-u.log()).log()).argmax(-1)


def softplus_inverse(d):
    r""":math:`\log(e^d - 1) = d + \log(1 - e^{-d})` for ``d > 0`` (stable for large ``d``)."""
    return d + torch.log(-torch.expm1(-d))


class AutoregressiveCategorical(nn.Module):
    r"""A distribution over ``D`` discrete choices :math:`k_i \in \{0, \dots, K-1\}` given a
    context ``c``: :math:`p(k \mid c) = \prod_i p(k_i \mid k_{<i}, c)`, a :class:`MADE` whose
    ``K`` logits for choice ``i`` see ``k_{<i}`` and ``c``; so it can express any joint
    distribution of the choices (e.g. "both signs equal"), not only independent ones.
    Zero-initialised: uniform at the start. ``mask`` (``(*batch, D, K)`` booleans) restricts
    each choice to the allowed classes and renormalises over them.

    Scoring costs one MADE pass; sampling costs ``D``.
    """

    def __init__(self, dim, num_classes, context_dim, hidden_dims=(32, 32)):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.made = MADE(dim, num_classes, tuple(hidden_dims), context_dim)

    def _encode(self, k, dtype):
        return k.to(dtype) * (2.0 / (self.num_classes - 1)) - 1.0  # classes spread over [-1, 1]

    def log_probs(self, k, context, mask=None):
        """``(*batch, D, K)`` log-probabilities of every class of every choice given ``k_{<i}``."""
        logits = self.made(self._encode(k, context.dtype), context)
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf)
        return logits.log_softmax(-1)

    def log_prob(self, k, context, mask=None):
        """``log p(k | c)``, shape ``batch``."""
        lp = self.log_probs(k, context, mask)
        return lp.gather(-1, k.unsqueeze(-1)).squeeze(-1).sum(-1)

    def sample_and_log_prob(self, context, mask=None):
        """``(k, log p(k | c))``: ``k`` of shape ``(*batch, D)`` (long), one choice per pass."""
        batch = context.shape[:-1] if mask is None else torch.broadcast_shapes(
            context.shape[:-1], mask.shape[:-2])
        k = torch.zeros(batch + (self.dim,), dtype=torch.long, device=context.device)
        total = 0.0
        for i in range(self.dim):
            lp = self.log_probs(k, context, mask)[..., i, :]
            ki = gumbel_argmax(lp)
            k = k.clone()
            k[..., i] = ki
            total = total + lp.gather(-1, ki.unsqueeze(-1)).squeeze(-1)
        return k, total


class ConditionalNormal(nn.Module):
    r"""Diagonal Gaussian :math:`N(y;\ \mu(c), \mathrm{diag}\,\sigma(c)^2)` with
    :math:`(\mu, \log\sigma) = \mathrm{MLP}(c)`, the log-scale soft-clamped to ``[-clamp,
    clamp]``. Zero-initialised: :math:`N(0, I)` at the start.

    Shapes: ``c`` ``(*batch, C)``; ``y`` ``(*batch, D)``; log-densities ``batch``.
    """

    exact = True

    def __init__(self, dim, context_dim, hidden_dims=(64, 64), clamp=5.0):
        super().__init__()
        self.dim, self.clamp = dim, float(clamp)
        self.net = MLP(context_dim, 2 * dim, tuple(hidden_dims))

    def params(self, c):
        loc, raw = self.net(c).chunk(2, -1)
        return loc, soft_clamp(raw, self.clamp)

    def _log_density(self, eps, log_scale):
        return (-0.5 * eps.square() - log_scale).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def log_prob(self, y, c):
        loc, log_scale = self.params(c)
        return self._log_density((y - loc) * torch.exp(-log_scale), log_scale)

    def sample_and_log_prob(self, c):
        loc, log_scale = self.params(c)
        eps = torch.randn_like(loc)
        return loc + eps * log_scale.exp(), self._log_density(eps, log_scale)


class FlowDensity(nn.Module):
    """A conditional :class:`~pyro_flows_ext.Flow` (built with ``context_dim=C``) as a
    surjection's conditional density: ``flow.condition(c)`` scores and samples."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow
        self.exact = bool(getattr(flow, "is_exact", True))

    def log_prob(self, y, c):
        return self.flow.condition(c).log_prob(y)

    def sample_and_log_prob(self, c):
        return self.flow.condition(c).sample_and_log_prob(())


def as_density(density, dim, context_dim, hidden_dims):
    """``density`` as a conditional density of ``dim`` values given ``context_dim`` ones:
    ``None`` gives a :class:`ConditionalNormal`; a :class:`~pyro_flows_ext.Flow` is wrapped;
    any module with ``log_prob(y, c)`` and ``sample_and_log_prob(c)`` is used as it is."""
    if density is None:
        return ConditionalNormal(dim, context_dim, hidden_dims)
    if isinstance(density, torch.distributions.Distribution):
        shape = tuple(density.event_shape)
        if shape != (dim,):
            raise ValueError(f"the conditional density must have event shape ({dim},), got "
                             f"{shape}")
        return FlowDensity(density)
    if not (hasattr(density, "log_prob") and hasattr(density, "sample_and_log_prob")):
        raise TypeError("density must be None, a conditional Flow, or a module with "
                        "log_prob(y, c) and sample_and_log_prob(c)")
    return density
