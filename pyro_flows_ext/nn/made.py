"""MADE: a masked autoencoder whose outputs for variable ``i`` see only earlier variables."""

import torch
from torch import nn

from .mlp import MLP


class MADE(nn.Module):
    r"""Masked autoencoder for distribution estimation (Germain et al., 2015).

    :math:`\theta_i = f_i(x_{<i}, c)`: the ``params`` outputs of variable ``i`` depend only
    on the variables before ``i`` in ``order`` and on the context ``c`` (which every output
    may see). Hidden degrees cycle through ``1 .. D-1``.

    Args:
        dim: number of variables ``D``.
        params: outputs per variable ``P``.
        hidden_dims: hidden layer sizes.
        context_dim: context size ``C`` (0: none).
        order: permutation of ``range(D)`` listing the variables in autoregressive order
            (default ``0, 1, ..., D-1``).
        activation: activation module class.
        zero_init: zero the output layer (the flow layer then starts at the identity).
        readout_scale: multiplies the output layer (see :class:`MLP`).
    Shapes: ``x`` ``(*batch, D)``, ``context`` ``(*batch', C)`` -> ``(*broadcast batch, D, P)``.

    References: Germain, Gregor, Murray, Larochelle. MADE. ICML 2015.
    """

    def __init__(self, dim, params, hidden_dims=(64, 64), context_dim=0, order=None,
                 activation=nn.ReLU, zero_init=True, readout_scale=1.0):
        super().__init__()
        order = torch.arange(dim) if order is None else torch.as_tensor(order, dtype=torch.long)
        if sorted(order.tolist()) != list(range(dim)):
            raise ValueError(f"order must be a permutation of range({dim}), got {order.tolist()}")
        self.dim, self.params, self.context_dim = dim, params, context_dim
        rank = torch.empty(dim, dtype=torch.long)
        rank[order] = torch.arange(1, dim + 1)  # degree of each input variable
        self.register_buffer("order", order)
        self.register_buffer("rank", rank)
        in_deg = torch.cat([rank, torch.zeros(context_dim, dtype=torch.long)])  # context: 0
        masks, prev = [], in_deg
        for h in hidden_dims:
            deg = (torch.arange(h) % max(dim - 1, 1) + 1 if dim > 1
                   else torch.zeros(h, dtype=torch.long))
            masks.append(deg[:, None] >= prev[None, :])
            prev = deg
        out_deg = rank.repeat_interleave(params)  # output j * P + p belongs to variable j
        masks.append(out_deg[:, None] > prev[None, :])
        self.net = MLP(len(in_deg), dim * params, tuple(hidden_dims), activation, zero_init, masks,
                       readout_scale)
        # a direct context -> output path: the first variable in `order` has no hidden unit
        # it may read, but its outputs must still see the context
        self.context_out = (nn.Linear(context_dim, dim * params, bias=False) if context_dim
                            else None)
        if zero_init and self.context_out is not None:
            nn.init.zeros_(self.context_out.weight)

    def forward(self, x, context=None):
        if not self.context_dim:
            return self.net(x).unflatten(-1, (self.dim, self.params))
        if context is None:
            raise ValueError(f"MADE has context_dim={self.context_dim}: pass context=...")
        batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
        x = x.expand(batch + x.shape[-1:]).reshape(-1, x.shape[-1])
        context = context.expand(batch + context.shape[-1:]).reshape(-1, self.context_dim)
        y = self.net(torch.cat([x, context], dim=-1)) + self.context_out(context)
        return y.reshape(batch + (self.dim, self.params))
