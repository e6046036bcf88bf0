r"""Time-conditioned networks for continuous flows: :math:`f(t, x, c) \in \mathbb{R}^D`.

Two layer kinds, as in the tutorial's ``ConcatDense`` and in FFJORD:

* ``concat``: :math:`W [h, t] + b` (time appended to every layer's input);
* ``concatsquash``: :math:`(W h + b) \odot \sigma(a t + a_0) + u t` (FFJORD's
  ``ConcatSquashLinear``: time gates and shifts every unit).

Activations must be smooth (an adaptive ODE solver assumes a smooth vector field), so ReLU
is refused.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConcatLinear", "ConcatSquashLinear", "TimeMLP"]

_ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "silu": nn.SiLU}


class ConcatLinear(nn.Module):
    r""":math:`W [h, t] + b`: a linear layer with time appended to its input.

    Shapes: ``t``: scalar or ``(*batch)``; ``h``: ``(*batch, in_dim)`` ->
    ``(*batch, out_dim)``."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(in_dim + 1, out_dim)

    def forward(self, t, h):
        # W [h, t] + b = W_h h + (W_t t + b): the time column is added, never concatenated
        t = torch.as_tensor(t, dtype=h.dtype, device=h.device)
        w = self.linear.weight
        return F.linear(h, w[:, :-1]) + (t.unsqueeze(-1) * w[:, -1] + self.linear.bias)


class ConcatSquashLinear(nn.Module):
    r""":math:`(W h + b) \odot \sigma(a t + a_0) + u t` (FFJORD's ``ConcatSquashLinear``).

    Shapes: as :class:`ConcatLinear`."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(1, out_dim)
        self.shift = nn.Linear(1, out_dim, bias=False)

    def forward(self, t, h):
        # one time for the batch (an ODE solve) costs one row; per-row times broadcast too
        t = torch.as_tensor(t, dtype=h.dtype, device=h.device).unsqueeze(-1)
        return self.linear(h) * torch.sigmoid(self.gate(t)) + self.shift(t)


_LAYERS = {"concat": ConcatLinear, "concatsquash": ConcatSquashLinear}


class TimeMLP(nn.Module):
    r"""A time-conditioned MLP :math:`f(t, x, c)`: ``dim (+ context_dim) -> hidden_dims ->
    dim``, every layer a :class:`ConcatLinear` or :class:`ConcatSquashLinear`.

    Args:
        dim: state size :math:`D` (input and output).
        hidden_dims: hidden sizes.
        context_dim: size of a context :math:`c` appended to the input (0: none).
        layer: ``'concatsquash'`` (FFJORD's default) or ``'concat'``.
        activation: ``'tanh'``, ``'softplus'``, ``'elu'`` or ``'silu'`` (smooth).
        zero_init: zero the last layer's weights, so the field starts at :math:`f = 0`
            (the flow starts at the identity, and the first solves take few steps).
    Shapes: ``t``: scalar (or ``(*batch)``); ``x``: ``(*batch, D)``; ``c``:
    ``(*batch, C)``; output ``(*batch, D)``.
    """

    def __init__(self, dim, hidden_dims=(64, 64, 64), context_dim=0, layer="concatsquash",
                 activation="tanh", zero_init=True):
        super().__init__()
        if layer not in _LAYERS:
            raise ValueError(f"unknown layer {layer!r}; expected one of {sorted(_LAYERS)}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of "
                             f"{sorted(_ACTIVATIONS)} (ODE fields must be smooth: no ReLU)")
        self.dim, self.context_dim = dim, context_dim
        sizes = [dim + context_dim, *hidden_dims, dim]
        self.layers = nn.ModuleList(_LAYERS[layer](a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = _ACTIVATIONS[activation]()
        if zero_init:
            last = self.layers[-1]
            lin = last.linear
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
            if isinstance(last, ConcatSquashLinear):
                nn.init.zeros_(last.shift.weight)

    def forward(self, t, x, context=None):
        h = x if context is None else torch.cat([x, context], -1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < last:
                h = self.act(h)
        return h

