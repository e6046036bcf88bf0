"""The :class:`Flow` distribution: a Pyro ``TransformedDistribution`` that is also a module."""

import copy
import math

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransform
from torch import nn
from torch.distributions.utils import _sum_rightmost

from .core import FlowLayer

__all__ = ["Flow"]


def _map_tensors(obj, fn):
    """A shallow copy of a distribution with ``fn`` applied to every tensor it holds."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if not isinstance(obj, torch.distributions.Distribution):
        return obj
    new = copy.copy(obj)
    for name, value in vars(obj).items():
        if isinstance(value, (torch.Tensor, torch.distributions.Distribution)):
            setattr(new, name, _map_tensors(value, fn))
    return new


def _reference_tensor(transforms):
    """The first floating parameter or buffer of the layers (for device and dtype), else an
    empty tensor of the default dtype on the CPU."""
    for t in transforms:
        if isinstance(t, nn.Module):
            for tensor in (*t.parameters(), *t.buffers()):
                if tensor.is_floating_point():
                    return tensor
    return torch.empty(0)


class Flow(dist.TransformedDistribution, nn.Module):
    r"""A normalizing flow: ``base`` pushed through ``transforms`` (generative order, z -> x).

    :math:`\log p(x) = \log p(z) + \sum_k V_k`, where :math:`V_k` is each layer's likelihood
    contribution (:math:`\log|\det \partial z_k/\partial x_k|` for a bijection). It is a Pyro
    ``TransformedDistribution`` (use it in ``pyro.sample``) and an ``nn.Module`` (use it with
    ``pyro.module``, ``.to(device)``, ``.double()``, ``state_dict``).

    Scoring the tensor a flow just sampled reuses each layer's cached pair (no inversion).
    With stochastic layers (``is_exact`` False) scoring the same tensor again reuses the same
    draw; ``x.clone()`` draws again.

    Args:
        base: base distribution; ``None`` is a standard normal over the first layer's input,
            on the layers' device and in their dtype (it follows ``.to()``).
        transforms: layers in generative order (any ``torch.distributions.Transform``).
        event_shape: base event shape when ``base`` is None and the first layer cannot tell
            (image layers).
    Shapes: ``sample(shape)``: ``shape + batch_shape + event_shape``; ``log_prob``:
    ``sample_shape + batch_shape``.
    """

    def __init__(self, base=None, transforms=(), event_shape=None, validate_args=None):
        if isinstance(transforms, torch.distributions.Transform):
            transforms = [transforms]
        transforms = list(transforms)
        if base is None:
            if event_shape is None:
                if not transforms or not hasattr(transforms[0], "base_event_shape"):
                    raise ValueError("Flow(base=None) needs event_shape=... or a pyro_flows_ext "
                                     "layer first in transforms to infer the base shape")
                event_shape = transforms[0].base_event_shape()
            event_shape = torch.Size([event_shape] if isinstance(event_shape, int)
                                     else event_shape)
            ref = _reference_tensor(transforms)  # the base follows the layers' device/dtype
            loc = torch.zeros(event_shape, dtype=ref.dtype, device=ref.device)
            base = dist.Normal(loc, torch.ones_like(loc)).to_event(len(event_shape))
            standard_normal = True
        else:
            standard_normal = False
        # torch's Distribution.__init__ calls nn.Module.__init__ through the MRO.
        super().__init__(base, transforms, validate_args=validate_args)
        self.layers = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])
        self._dims = self._event_dims()
        self._standard_normal = standard_normal
        self._log_norm = 0.5 * math.log(2 * math.pi) * self.base_dist.event_shape.numel()
        self._layer_dims = [t.domain.event_dim for t in transforms]

    # -- nn.Module: .to(), .double(), .cuda() also move the base distribution -----------------
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.base_dist = _map_tensors(self.base_dist, fn)
        return self

    def __hash__(self):
        return nn.Module.__hash__(self)

    def __repr__(self):
        return nn.Module.__repr__(self)

    @property
    def is_exact(self):
        """True when ``log_prob`` is the exact log-density (no stochastic layer)."""
        return all(getattr(t, "exact", t.bijective) for t in self.transforms)

    def expand(self, batch_shape, _instance=None):
        """A :class:`Flow` with the base expanded to ``batch_shape`` (what ``pyro.plate`` calls):
        it shares the layers (and their caches) and keeps the checks, the fast path,
        ``sample_and_log_prob`` and ``is_exact``."""
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        shape = batch_shape + self.event_shape
        for t in reversed(self.transforms):
            shape = t.inverse_shape(shape)
        base_batch = shape[: len(shape) - len(self.base_dist.event_shape)]
        new = Flow(self.base_dist.expand(base_batch), self.transforms,
                   validate_args=self._validate_args)
        new._standard_normal, new._log_norm = self._standard_normal, self._log_norm
        return new

    def _event_dims(self):
        """Event dims at the input of each layer (base side first), then the data side."""
        dims = [len(self.event_shape)]
        for t in reversed(self.transforms):
            dims.append(dims[-1] + t.domain.event_dim - t.codomain.event_dim)
        return dims[::-1]

    def _check_value(self, value):
        n = len(self.event_shape)
        if value.dim() < n or value.shape[value.dim() - n:] != self.event_shape:
            raise ValueError(f"Flow.log_prob expects values with event shape "
                             f"{tuple(self.event_shape)} in the rightmost dimensions, got "
                             f"{tuple(value.shape)}")
        ref = _reference_tensor(self.transforms)
        if ref.numel() and (value.dtype != ref.dtype or value.device != ref.device):
            raise TypeError(f"Flow.log_prob got {value.dtype} values on {value.device} for a "
                            f"flow in {ref.dtype} on {ref.device}: convert the values "
                            f"(x.to(dtype={ref.dtype}, device='{ref.device}')) or the flow")
        if not torch.isfinite(value).all():
            raise ValueError("Flow.log_prob got NaN or infinite values; expected finite data")

    def _as_tensor(self, value):
        """Array-likes (numpy arrays, lists) become tensors in the flow's dtype and device."""
        ref = _reference_tensor(self.transforms)
        try:
            return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"Flow.log_prob expects a tensor or a numeric array, got "
                            f"{type(value).__name__} ({e})") from e

    def log_prob(self, value):
        if not torch.is_tensor(value):
            value = self._as_tensor(value)
        if self._validate_args:
            self._check_value(value)
        dims, layer_dims = self._dims, self._layer_dims
        log_prob, x = 0.0, value
        for i in reversed(range(len(self.transforms))):
            t = self.transforms[i]
            if isinstance(t, FlowLayer):
                z, v = t.inverse_with_cache(x)
            else:
                z = t.inv(x)
                v = -t.log_abs_det_jacobian(z, x)
            log_prob = log_prob + _sum_rightmost(v, dims[i] - layer_dims[i])
            x = z
        return log_prob + self._base_log_prob(x)

    def _base_log_prob(self, z):
        """``log p(z)`` summed to the flow's batch shape (a fast path for N(0, I))."""
        base = self.base_dist
        if self._standard_normal:
            n = len(base.event_shape)
            sq = z.square().sum(list(range(-n, 0))) if n else z.square()
            return _sum_rightmost(-0.5 * sq - self._log_norm, self._dims[0] - n)
        return _sum_rightmost(base.log_prob(z), self._dims[0] - len(base.event_shape))

    def sample_and_log_prob(self, sample_shape=()):
        """Draws ``x`` and returns ``(x, log_prob(x))`` in one generative pass."""
        sample_shape = torch.Size(sample_shape)
        base = self.base_dist
        z = base.rsample(sample_shape) if base.has_rsample else base.sample(sample_shape)
        dims, layer_dims = self._dims, self._layer_dims
        log_prob = self._base_log_prob(z)
        for i, t in enumerate(self.transforms):
            if isinstance(t, FlowLayer):
                x, ladj = t.call_with_cache(z)
            else:
                x = t(z)
                ladj = t.log_abs_det_jacobian(z, x)
            log_prob = log_prob - _sum_rightmost(ladj, dims[i] - layer_dims[i])
            z = x
        return z, log_prob

    def condition(self, context):
        """The flow with every conditional layer conditioned on ``context`` (``(*batch, C)``);
        shares parameters and base with ``self``. Condition once per step and use the result
        for both sampling and scoring, so the caches hit."""
        layers = [t.condition(context) if isinstance(t, ConditionalTransform) else t
                  for t in self.transforms]
        batch = torch.broadcast_shapes(self.base_dist.batch_shape, context.shape[:-1])
        new = Flow(self.base_dist.expand(batch), layers, validate_args=self._validate_args)
        new._standard_normal, new._log_norm = self._standard_normal, self._log_norm
        return new

    def clear_cache(self):
        """Forgets every layer's cached pair."""
        for t in self.transforms:
            t.clear_cache() if hasattr(t, "clear_cache") else None
